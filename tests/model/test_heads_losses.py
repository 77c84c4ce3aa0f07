"""Every registered head and loss on tiny inputs: shapes, finiteness, gradients, normalised log-probs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prodcat.model import (
    _fused,
    create_head,
    create_loss,
    is_product_head,
    list_heads,
    list_losses,
    register_head,
    register_loss,
)
from prodcat.model.losses import adaptive_cutoffs

torch.set_num_threads(2)

IN_SHAPES = [(16,), (3, 3, 8)]
NUM_CLASSES = 8
LOSS_KWARGS = {"sampled": {"num_sampled": 3}}


def _head(name: str, in_shape: tuple[int, ...]):
    return create_head(name, in_shape, **({} if name in ("linear", "gated_product") else {"hidden_dim": 12}))


def test_registries_list_the_contract_names() -> None:
    assert {"linear", "mlp", "conv", "hier", "gated_product"} <= set(list_heads())  # hier too, like every other
    assert {"softmax", "sampled", "adaptive"} <= set(list_losses())


def test_hier_is_a_registered_head_built_into_a_per_level_classifier() -> None:
    from prodcat.model import HierarchicalClassifier, build_classifier, is_hierarchical_head

    assert is_hierarchical_head(create_head("hier", (8,), hidden_dim=4))
    assert not any(is_hierarchical_head(create_head(name, (8,))) for name in list_heads() if name != "hier")
    levels = {"leaf_level1": [0, 0, 1, 1], "leaf_level2": [0, 1, 2, 3]}
    model = build_classifier("hier", "softmax", (8,), 4, hidden_dim=4, **levels)
    assert isinstance(model, HierarchicalClassifier) and model.head.out_dim == 4


def test_registries_refuse_duplicates_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_head("linear")(lambda in_shape: None)
    with pytest.raises(ValueError, match="already registered"):
        register_loss("softmax")(lambda in_dim, num_classes: None)
    with pytest.raises(ValueError, match="unknown head 'nope'"):
        create_head("nope", (4,))
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        create_loss("nope", 4, 5)


@pytest.mark.parametrize("in_shape", IN_SHAPES)
@pytest.mark.parametrize("name", list_heads())
def test_head_shapes_dtype_and_gradients(name: str, in_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    head = _head(name, in_shape).train()
    # the store's dtype; a product head gets products of 3 pictures (with one, its gate has nothing to weigh)
    features = torch.randn(4, *([3] if is_product_head(head) else []), *in_shape).half()
    embedding = head(features)
    assert embedding.shape == (4, head.out_dim)
    assert embedding.dtype == torch.float32 and torch.isfinite(embedding).all()
    if not list(head.parameters()):
        return  # linear: identity (+ pool); nothing to train
    embedding.square().sum().backward()
    for pname, param in head.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", list_heads())
def test_head_rejects_wrong_row_shape(name: str) -> None:
    head = _head(name, (3, 3, 8))
    with pytest.raises(ValueError, match="expects rows of shape"):
        head(torch.randn(2, 3, 3, 9))


def test_linear_head_pools_spatial_maps() -> None:
    head = create_head("linear", (2, 3, 5))
    features = torch.randn(2, 2, 3, 5)
    assert head.out_dim == 5
    torch.testing.assert_close(head(features), features.mean(dim=(1, 2)))


@pytest.mark.parametrize("name", list_losses())
def test_loss_shapes_gradients_and_normalisation(name: str) -> None:
    torch.manual_seed(0)
    loss_fn = create_loss(name, 12, NUM_CLASSES, **LOSS_KWARGS.get(name, {}))
    embedding = torch.randn(NUM_CLASSES, 12, requires_grad=True)
    target = torch.arange(NUM_CLASSES)  # every class (and adaptive cluster) appears
    loss = loss_fn(embedding, target)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(embedding.grad).all() and embedding.grad.abs().sum() > 0
    for pname, param in loss_fn.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, pname
    with torch.no_grad():
        log_probs = loss_fn.log_probs(embedding)
        assert log_probs.shape == (NUM_CLASSES, NUM_CLASSES)
        torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(NUM_CLASSES))
        torch.testing.assert_close(loss_fn.full_loss(embedding, target), F.nll_loss(log_probs, target))


def test_sampled_loss_gradient_touches_only_true_and_sampled_rows() -> None:
    torch.manual_seed(1)
    loss_fn = create_loss("sampled", 6, 30, num_sampled=4, seed=3)
    embedding = torch.randn(3, 6)
    target = torch.tensor([0, 5, 5])
    candidates = loss_fn.sample()
    loss_fn(embedding, target, candidates).backward()
    touched = torch.zeros(30, dtype=torch.bool)
    touched[target] = True
    touched[candidates.ids] = True
    row_norm = loss_fn.weight.grad.abs().sum(1)
    assert (row_norm[~touched] == 0).all() and (row_norm[touched] > 0).all()
    assert (loss_fn.bias.grad[~touched] == 0).all()


def test_adaptive_cutoffs_are_valid_for_any_size() -> None:
    assert adaptive_cutoffs(5270) == [264, 1054]
    assert adaptive_cutoffs(8) == [2]
    for num_classes in range(3, 200):
        cutoffs = adaptive_cutoffs(num_classes)
        sizes = np.diff([*cutoffs, num_classes])
        assert cutoffs == sorted(set(cutoffs)) and 1 <= cutoffs[0] and (sizes >= 2).all(), (num_classes, cutoffs)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("block_elements", [1 << 18, 7])
def test_fused_softmax_matches_torch_cross_entropy(
    monkeypatch: pytest.MonkeyPatch, label_smoothing: float, block_elements: int
) -> None:
    monkeypatch.setattr(_fused, "_BLOCK_ELEMENTS", block_elements)  # 7 -> one row per block
    torch.manual_seed(0)
    loss_fn = create_loss("softmax", 5, 11, label_smoothing=label_smoothing).double()
    embedding = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 11, (6,))
    (3.0 * loss_fn(embedding, target)).backward()
    fused = [embedding.grad.clone(), loss_fn.weight.grad.clone(), loss_fn.bias.grad.clone()]
    value = loss_fn(embedding, target).detach()
    embedding.grad = loss_fn.weight.grad = loss_fn.bias.grad = None
    reference = F.cross_entropy(
        F.linear(embedding, loss_fn.weight, loss_fn.bias), target, label_smoothing=label_smoothing
    )
    (3.0 * reference).backward()
    torch.testing.assert_close(value, reference.detach())
    for got, want in zip(fused, [embedding.grad, loss_fn.weight.grad, loss_fn.bias.grad], strict=True):
        torch.testing.assert_close(got, want)
