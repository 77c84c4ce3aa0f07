"""build_classifier over every head (and hier) x every loss; hierarchy-consistent decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prodcat.model import HIER_HEAD, HierarchicalClassifier, build_classifier, list_heads, list_losses

torch.set_num_threads(2)

NUM_CLASSES = 12
LEAF_LEVEL2 = np.array([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 5])  # 6 level-2 parents
LEVEL2_LEVEL1 = np.array([0, 0, 1, 1, 2, 2])  # 3 level-1 parents
LEAF_LEVEL1 = LEVEL2_LEVEL1[LEAF_LEVEL2]
IN_SHAPE = (2, 2, 8)


def _build(head: str, loss: str, **kwargs: object):
    return build_classifier(
        head,
        loss,
        IN_SHAPE,
        NUM_CLASSES,
        hidden_dim=10,
        dropout=0.1,
        num_sampled=4,
        leaf_level1=LEAF_LEVEL1,
        leaf_level2=LEAF_LEVEL2,
        **kwargs,
    )


@pytest.mark.parametrize("loss", list_losses())
@pytest.mark.parametrize("head", list_heads())
def test_classifier_outputs_loss_and_gradients(head: str, loss: str) -> None:
    torch.manual_seed(0)
    model = _build(head, loss).train()
    features = torch.randn(NUM_CLASSES, *IN_SHAPE).half()
    targets = {"leaf": torch.arange(NUM_CLASSES)}
    if model.reads_products:  # products of 1-3 pictures, so the gate has pictures to weigh
        product_features = torch.randn(NUM_CLASSES, 3, *IN_SHAPE).half()
        mask = torch.arange(3)[None, :] <= (torch.arange(NUM_CLASSES) % 3)[:, None]
        value = model.loss(product_features, {**targets, "mask": mask})
    else:
        value = model.loss(features, targets)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        log_probs = model(features)
        levels = model.level_log_probs(features)
    assert log_probs.shape == (NUM_CLASSES, NUM_CLASSES)
    assert set(levels) == {"leaf", "level1", "level2"}
    for name, width in (("leaf", NUM_CLASSES), ("level1", 3), ("level2", 6)):
        assert levels[name].shape == (NUM_CLASSES, width)
        torch.testing.assert_close(levels[name].exp().sum(1), torch.ones(NUM_CLASSES))
    torch.testing.assert_close(levels["leaf"], log_probs)
    level2_by_hand = torch.stack([log_probs[:, LEAF_LEVEL2 == j].logsumexp(1) for j in range(6)], 1)
    torch.testing.assert_close(levels["level2"], level2_by_hand)


def test_flat_classifier_without_maps_reports_leaf_only() -> None:
    model = build_classifier("linear", "softmax", (8,), 5, dropout=0.0)
    assert set(model.level_log_probs(torch.randn(2, 8))) == {"leaf"}
    assert not any("leaf_level" in key for key in model.state_dict())


def test_hier_needs_maps() -> None:
    with pytest.raises(ValueError, match="leaf_level1 and leaf_level2"):
        build_classifier(HIER_HEAD, "softmax", (8,), NUM_CLASSES)
    with pytest.raises(ValueError, match="leaf_level1 must be"):
        build_classifier(HIER_HEAD, "softmax", (8,), NUM_CLASSES, leaf_level1=[0, 1], leaf_level2=LEAF_LEVEL2)


def test_hier_decoding_combines_the_three_levels() -> None:
    torch.manual_seed(0)
    model = _build(HIER_HEAD, "softmax").eval()
    assert isinstance(model, HierarchicalClassifier)
    features = torch.randn(3, *IN_SHAPE)
    with torch.no_grad():
        raw = model.head_log_probs(features)
        decoded = model(features)
    by_hand = raw["leaf"] + raw["level1"][:, LEAF_LEVEL1] + raw["level2"][:, LEAF_LEVEL2]
    torch.testing.assert_close(decoded, F.log_softmax(by_hand, 1))
    torch.testing.assert_close(decoded.exp().sum(1), torch.ones(3))

    with torch.no_grad():
        model.level1_output.bias[2] += 3.0  # make level-1 parent 2 more likely
        after = model(features)
    under_parent = torch.as_tensor(LEAF_LEVEL1 == 2)
    assert (after[:, under_parent] > decoded[:, under_parent]).all()
    assert (after[:, ~under_parent] < decoded[:, ~under_parent]).all()

    with torch.no_grad():
        model.level2_output.bias[3] -= 3.0  # and level-2 parent 3 less likely
        last = model(features)
    under_level2 = torch.as_tensor(LEAF_LEVEL2 == 3)
    assert (last[:, under_level2] < after[:, under_level2]).all()


@pytest.mark.parametrize("loss", ["softmax", "sampled"])
def test_hier_loss_is_the_weighted_sum(loss: str) -> None:
    torch.manual_seed(0)
    model = _build(HIER_HEAD, loss, hier_weights=(0.5, 0.25, 2.0)).eval()
    features = torch.randn(4, *IN_SHAPE)
    leaf = torch.tensor([0, 5, 9, 11])
    level1, level2 = torch.as_tensor(LEAF_LEVEL1[leaf.numpy()]), torch.as_tensor(LEAF_LEVEL2[leaf.numpy()])
    torch.manual_seed(1)
    derived = model.loss(features, {"leaf": leaf})
    torch.manual_seed(1)
    given = model.loss(features, {"leaf": leaf, "level1": level1, "level2": level2})
    torch.testing.assert_close(derived, given)
    if loss == "softmax":
        embedding = model.head(features)
        want = (
            0.5 * F.cross_entropy(model.level1_output.logits(embedding), level1)
            + 0.25 * F.cross_entropy(model.level2_output.logits(embedding), level2)
            + 2.0 * F.cross_entropy(model.output.logits(embedding), leaf)
        )
        torch.testing.assert_close(given, want)


def test_options_reach_the_right_parts() -> None:
    model = build_classifier(
        "mlp",
        "sampled",
        (8,),
        50,
        hidden_dim=6,
        num_sampled=7,
        sampler="unigram",
        class_counts=np.arange(50) + 1,
        with_replacement=True,
        logq_correction=False,
    )
    assert model.head.out_dim == 6 and model.output.in_dim == 6
    assert model.output.num_sampled == 7 and model.output.with_replacement and not model.output.logq_correction
    smoothed = build_classifier("linear", "softmax", (8,), 5, label_smoothing=0.2)
    assert smoothed.output.label_smoothing == 0.2
