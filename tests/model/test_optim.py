"""Optimizers by name (the rule never depends on the loss), the row-wise one: lazy updates, agreement with
references, the same rule with dense (DDP) gradients, exact resume through safetensors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prodcat.checkpoint import _join_tensors, _split_tensors
from prodcat.model import (
    HIER_HEAD,
    RowWiseAdamW,
    RowWiseSGD,
    build_classifier,
    build_optimizer,
    list_losses,
    list_optimizers,
    rowwise_output,
)

torch.set_num_threads(2)


def _sampled_model(num_classes: int = 30):
    torch.manual_seed(0)
    return build_classifier("mlp", "sampled", (8,), num_classes, hidden_dim=6, dropout=0.0, num_sampled=4)


def _step(model, optimizer, features: torch.Tensor, target: torch.Tensor, candidates) -> None:
    optimizer.zero_grad(set_to_none=True)
    model.output(model.head(features), target, candidates).backward()
    optimizer.step()


@pytest.mark.parametrize("name", ["rowwise_adamw", "rowwise_sgd"])
def test_only_touched_rows_change(name: str) -> None:
    model = _sampled_model()
    optimizer = build_optimizer(model, name, lr=0.1, weight_decay=0.1)
    before = copy.deepcopy(model.state_dict())
    features, target = torch.randn(3, 8), torch.tensor([2, 2, 17])
    candidates = model.output.sample()
    model.output(model.head(features), target, candidates).backward()
    assert model.output.weight.grad.is_sparse and model.output.bias.grad.is_sparse
    assert not model.head.fc.weight.grad.is_sparse
    optimizer.step()
    touched = torch.zeros(30, dtype=torch.bool)
    touched[target] = True
    touched[candidates.ids] = True
    changed = (model.output.weight != before["output.weight"]).any(1)
    assert torch.equal(changed, touched)
    assert torch.equal(model.output.bias != before["output.bias"], touched)
    assert not torch.equal(model.head.fc.weight, before["head.fc.weight"])  # dense part trained as usual


def _reference_rowwise_adamw(
    param: torch.Tensor, grads: list[torch.Tensor], lr: float, beta2: float, eps: float, weight_decay: float
) -> torch.Tensor:
    """Row by row, in float64, from the formula in optim.py's docstring."""
    param = param.double().clone()
    row_sq = torch.zeros(param.shape[0], dtype=torch.float64)
    row_step = torch.zeros(param.shape[0], dtype=torch.float64)
    for grad in grads:
        dense = grad.to_dense().double()
        for row in grad.coalesce().indices()[0].tolist():
            row_step[row] += 1
            row_sq[row] = beta2 * row_sq[row] + (1 - beta2) * (dense[row] ** 2).mean()
            v_hat = row_sq[row] / (1 - beta2 ** row_step[row])
            param[row] = param[row] * (1 - lr * weight_decay) - lr * dense[row] / (v_hat.sqrt() + eps)
    return param


def test_rowwise_adamw_matches_reference_implementation() -> None:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(10, 3))
    start = param.detach().clone()
    optimizer = RowWiseAdamW(
        [{"params": [param], "rowwise": True}], lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1
    )
    grads = []
    for step in range(5):
        rows = torch.tensor([step % 10, 3, 3, (7 * step) % 10])  # repeated rows are summed
        grads.append(torch.sparse_coo_tensor(rows.unsqueeze(0), torch.randn(4, 3), (10, 3), check_invariants=True))
        param.grad = grads[-1]
        optimizer.step()
    want = _reference_rowwise_adamw(start, grads, lr=0.05, beta2=0.99, eps=1e-6, weight_decay=0.1)
    torch.testing.assert_close(param.detach().double(), want, rtol=1e-5, atol=1e-6)
    touched = {row for grad in grads for row in grad.coalesce().indices()[0].tolist()}
    untouched = [row for row in range(10) if row not in touched]
    assert untouched and torch.equal(param.detach()[untouched], start[untouched])


def test_rowwise_adamw_with_all_rows_and_width_one_is_adamw_without_momentum() -> None:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(6, 1))
    dense_param = torch.nn.Parameter(param.detach().clone())
    rowwise = RowWiseAdamW([{"params": [param], "rowwise": True}], lr=0.01, betas=(0.0, 0.999), weight_decay=0.05)
    adamw = torch.optim.AdamW([dense_param], lr=0.01, betas=(0.0, 0.999), weight_decay=0.05)
    for _ in range(6):
        grad = torch.randn(6, 1)
        param.grad = grad.to_sparse()
        dense_param.grad = grad.clone()
        rowwise.step()
        adamw.step()
    torch.testing.assert_close(param.detach(), dense_param.detach())


def test_dense_groups_behave_like_torch_adamw_and_hooks_run_once() -> None:
    model = _sampled_model()
    twin = copy.deepcopy(model)
    optimizer = build_optimizer(model, "rowwise_adamw", lr=0.01, weight_decay=0.1)
    # The twin: torch's own AdamW on the head (same decay / no-decay split), RowWiseAdamW on the output only.
    twin.output.sparse_grad = True
    head_groups = [
        {"params": [twin.head.fc.weight], "weight_decay": 0.1},
        {"params": [twin.head.fc.bias, *twin.head.norm.parameters()], "weight_decay": 0.0},
    ]
    twin_optimizers = [
        torch.optim.AdamW(head_groups, lr=0.01),  # also patches AdamW.step with torch's hooks
        RowWiseAdamW(
            [
                {"params": [twin.output.weight], "rowwise": True, "weight_decay": 0.1},
                {"params": [twin.output.bias], "rowwise": True, "weight_decay": 0.0},
            ],
            lr=0.01,
        ),
    ]
    calls = []
    optimizer.register_step_post_hook(lambda *args: calls.append(1))
    features, target = torch.randn(4, 8), torch.tensor([1, 2, 3, 4])
    for _ in range(3):
        candidates = model.output.sample()
        _step(model, optimizer, features, target, candidates)
        for twin_optimizer in twin_optimizers:
            twin_optimizer.zero_grad()
        twin.output(twin.head(features), target, candidates).backward()
        for twin_optimizer in twin_optimizers:
            twin_optimizer.step()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, twin.state_dict()[key])
    assert len(calls) == 3


def test_scheduler_reaches_rowwise_groups() -> None:
    optimizer = build_optimizer(_sampled_model(), "rowwise_adamw", lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    optimizer.step()
    scheduler.step()
    assert all(group["lr"] == pytest.approx(0.05) for group in optimizer.param_groups)
    assert any(group["rowwise"] for group in optimizer.param_groups)


def test_unknown_optimizer_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="rowwise_adamw"):
        build_optimizer(build_classifier("linear", "softmax", (8,), 5), "adam")


def _output_params(model) -> set[int]:
    outputs = [model.output, *(getattr(model, f"level{i}_output", None) for i in (1, 2))]
    return {id(p) for output in outputs if output is not None for p in output.parameters()}


@pytest.mark.parametrize("head", ["linear", HIER_HEAD])
@pytest.mark.parametrize("loss", list_losses())
@pytest.mark.parametrize("name", list_optimizers())
def test_the_name_alone_decides_the_rule_for_every_loss_and_head(name: str, loss: str, head: str) -> None:
    """adamw is dense AdamW for the sampled loss too; rowwise_adamw is row-wise for softmax and adaptive too."""
    levels = dict(leaf_level1=[i % 3 for i in range(12)], leaf_level2=[i % 6 for i in range(12)])
    model = build_classifier(head, loss, (8,), 12, hidden_dim=6, num_sampled=4, **levels)
    optimizer = build_optimizer(model, name)
    assert isinstance(optimizer, RowWiseAdamW if name.endswith("adamw") else RowWiseSGD)
    outputs = _output_params(model)
    for group in optimizer.param_groups:
        for param in group["params"]:
            assert group["rowwise"] == (rowwise_output(name) and id(param) in outputs)
    assert any(g["rowwise"] for g in optimizer.param_groups) == name.startswith("rowwise_")
    model.loss(torch.randn(5, 8), {"leaf": torch.arange(5)}).backward()
    sparse = [p.grad.is_sparse for p in model.output.parameters() if p.grad is not None]
    assert sparse and all(s == (loss == "sampled" and rowwise_output(name)) for s in sparse)
    optimizer.step()  # every combination steps


def test_rowwise_softmax_updates_every_row_by_the_row_rule() -> None:
    """softmax + rowwise_adamw: dense gradients touch every row, so every row follows the reference formula."""
    torch.manual_seed(0)
    model = build_classifier("linear", "softmax", (3,), 6, dropout=0.0)
    optimizer = build_optimizer(model, "rowwise_adamw", lr=0.05, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-6)
    start, grads = model.output.weight.detach().clone(), []
    for _ in range(3):
        optimizer.zero_grad()
        model.loss(torch.randn(4, 3), {"leaf": torch.tensor([0, 1, 2, 5])}).backward()
        grads.append(model.output.weight.grad.to_sparse(sparse_dim=1))
        optimizer.step()
    want = _reference_rowwise_adamw(start, grads, lr=0.05, beta2=0.99, eps=1e-6, weight_decay=0.1)
    torch.testing.assert_close(model.output.weight.detach().double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["rowwise_adamw", "rowwise_sgd"])
def test_dense_stand_in_for_sparse_gradients_keeps_the_rule(name: str) -> None:
    """What DDP runs (dense gradients, `sparse_grad=False`) updates exactly what the sparse path updates."""
    sparse_model = _sampled_model()
    dense_model = copy.deepcopy(sparse_model)
    sparse_opt = build_optimizer(sparse_model, name, lr=0.05, weight_decay=0.1)
    dense_opt = build_optimizer(dense_model, name, lr=0.05, weight_decay=0.1, sparse_grad=False)
    assert not dense_model.output.sparse_grad
    for _ in range(4):
        features, target, candidates = torch.randn(4, 8), torch.randint(0, 30, (4,)), sparse_model.output.sample()
        _step(sparse_model, sparse_opt, features, target, candidates)
        _step(dense_model, dense_opt, features, target, candidates)
        assert not dense_model.output.weight.grad.is_sparse
    for key, value in sparse_model.state_dict().items():
        torch.testing.assert_close(dense_model.state_dict()[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["rowwise_adamw", "rowwise_sgd"])
def test_state_dict_round_trip_through_safetensors_resumes_exactly(name: str, tmp_path: Path) -> None:
    model = _sampled_model()
    optimizer = build_optimizer(model, name, lr=0.05)
    batches = [(torch.randn(4, 8), torch.randint(0, 30, (4,)), model.output.sample()) for _ in range(5)]
    for batch in batches[:3]:
        _step(model, optimizer, *batch)

    # The checkpoint format's serializer: tensors to safetensors, the rest to a JSON skeleton.
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors(optimizer.state_dict(), "optim", tensors)
    save_file(tensors, tmp_path / "optimizer.safetensors")
    (tmp_path / "optimizer.json").write_text(json.dumps(skeleton))
    save_file(model.state_dict(), tmp_path / "model.safetensors")

    resumed = _sampled_model()
    resumed.load_state_dict(load_file(tmp_path / "model.safetensors"))
    resumed_optimizer = build_optimizer(resumed, name, lr=0.05)
    state = _join_tensors(
        json.loads((tmp_path / "optimizer.json").read_text()), load_file(tmp_path / "optimizer.safetensors")
    )
    resumed_optimizer.load_state_dict(state)
    again: dict[str, torch.Tensor] = {}
    _split_tensors(resumed_optimizer.state_dict(), "optim", again)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    if name == "rowwise_adamw":
        assert any(key.endswith("row_sq") for key in tensors)

    for batch in batches[3:]:
        _step(model, optimizer, *batch)
        _step(resumed, resumed_optimizer, *batch)
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
