"""The same model code on a GPU: fused kernels, sparse gradients and row-wise updates on CUDA tensors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from prodcat.model import build_classifier, build_optimizer, create_loss, list_heads, list_losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def test_fused_softmax_on_cuda_matches_torch() -> None:
    torch.manual_seed(0)
    loss_fn = create_loss("softmax", 16, 300, label_smoothing=0.1).to(CUDA)
    embedding = torch.randn(8, 16, device=CUDA, requires_grad=True)
    target = torch.randint(0, 300, (8,), device=CUDA)
    loss_fn(embedding, target).backward()
    fused = [embedding.grad.clone(), loss_fn.weight.grad.clone(), loss_fn.bias.grad.clone()]
    embedding.grad = loss_fn.weight.grad = loss_fn.bias.grad = None
    F.cross_entropy(F.linear(embedding, loss_fn.weight, loss_fn.bias), target, label_smoothing=0.1).backward()
    for got, want in zip(fused, [embedding.grad, loss_fn.weight.grad, loss_fn.bias.grad], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_sampled_step_on_cuda_matches_cpu() -> None:
    torch.manual_seed(0)
    cpu_model = build_classifier("mlp", "sampled", (16,), 500, hidden_dim=8, dropout=0.0, num_sampled=20)
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    optimizers = [build_optimizer(m, "rowwise_adamw", lr=0.01) for m in (cpu_model, gpu_model)]
    features, target = torch.randn(6, 16), torch.tensor([0, 0, 3, 499, 20, 7])
    for _ in range(3):
        candidates = cpu_model.output.sample()
        for model, optimizer in zip((cpu_model, gpu_model), optimizers, strict=True):
            device = next(model.parameters()).device
            optimizer.zero_grad(set_to_none=True)
            model.output(model.head(features.to(device)), target.to(device), candidates).backward()
            assert model.output.weight.grad.is_sparse
            optimizer.step()
    for key, value in cpu_model.state_dict().items():
        torch.testing.assert_close(gpu_model.state_dict()[key].cpu(), value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss", list_losses())
@pytest.mark.parametrize("head", list_heads())
def test_every_head_and_loss_trains_on_cuda_with_autocast(head: str, loss: str) -> None:
    torch.manual_seed(0)
    model = build_classifier(
        head,
        loss,
        (2, 2, 8),
        12,
        hidden_dim=16,
        num_sampled=4,
        leaf_level1=[i % 3 for i in range(12)],
        leaf_level2=[i % 6 for i in range(12)],
    ).to(CUDA)
    optimizer = build_optimizer(model, "rowwise_adamw" if loss == "sampled" else "adamw")
    features = torch.randn(12, 2, 2, 8, device=CUDA).half()
    targets = {"leaf": torch.arange(12, device=CUDA)}
    for autocast in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            value = model.loss(features, targets)
        assert torch.isfinite(value)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
    with torch.no_grad():
        levels = model.eval().level_log_probs(features)
    for log_probs in levels.values():
        torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(12, device=CUDA))
