"""The gated product head: permutation invariance over a product's pictures, mask handling for 1-4 pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prodcat.model import build_classifier, create_head, is_product_head

torch.set_num_threads(2)


def _head(in_shape: tuple[int, ...] = (8,)) -> torch.nn.Module:
    torch.manual_seed(0)
    head = create_head("gated_product", in_shape, gate_dim=6).eval()
    with torch.no_grad():  # non-trivial gate: the weights must really differ between pictures
        for param in head.parameters():
            param.normal_()
    return head


@pytest.mark.parametrize("in_shape", [(8,), (2, 2, 8)])
def test_permutation_invariant_over_pictures(in_shape: tuple[int, ...]) -> None:
    head = _head(in_shape)
    features = torch.randn(5, 4, *in_shape)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    expected = head(features, mask)
    weights = head.picture_weights(features, mask)
    assert not torch.allclose(weights[0], torch.full((4,), 0.25))  # the gate weighs pictures unequally
    for seed in range(3):
        order = torch.from_numpy(np.random.default_rng(seed).permutation(4))
        torch.testing.assert_close(head(features[:, order], mask[:, order]), expected, atol=1e-5, rtol=1e-5)


def test_mask_ignores_padding_and_matches_unpadded_products() -> None:
    head = _head()
    features = torch.randn(4, 4, 8)
    for count in range(1, 5):
        mask = torch.zeros(1, 4, dtype=torch.bool)
        mask[0, :count] = True
        padded = features[:1].clone()
        padded[0, count:] = float("nan")  # whatever a padded slot holds never reaches the result
        out = head(padded, mask)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, head(features[:1, :count]), atol=1e-5, rtol=1e-5)
        weights = head.picture_weights(padded, mask)[0]
        assert torch.all(weights[count:] == 0) and torch.isclose(weights.sum(), torch.tensor(1.0))
    # one picture: weight 1, the embedding is the picture itself (what `linear` gives), with or without a K axis
    torch.testing.assert_close(head(features[:, 0]), features[:, 0])


def test_brute_force_weighted_sum() -> None:
    head = _head()
    features, mask = torch.randn(3, 4, 8), torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out = head(features, mask)
    for p in range(3):
        pictures = features[p, mask[p]]
        scores = torch.stack([head.gate(x).squeeze() for x in pictures])
        torch.testing.assert_close(out[p], (torch.softmax(scores, 0)[:, None] * pictures).sum(0), atol=1e-5, rtol=1e-5)


def test_rejects_bad_masks() -> None:
    head = _head()
    with pytest.raises(ValueError, match="at least one picture"):
        head(torch.randn(2, 3, 8), torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be"):
        head(torch.randn(2, 3, 8), torch.ones(2, 4, dtype=torch.bool))


def test_classifier_reads_products_and_single_pictures() -> None:
    model = build_classifier("gated_product", "softmax", (8,), 5, dropout=0.0).eval()
    assert model.reads_products and is_product_head(model.head)
    features, mask = torch.randn(3, 4, 8), torch.ones(3, 4, dtype=torch.bool)
    assert model(features, mask).shape == (3, 5)
    assert model(features[:, 0]).shape == (3, 5)  # pictures one by one
    linear = build_classifier("linear", "softmax", (8,), 5, dropout=0.0)
    with pytest.raises(ValueError, match="reads single pictures"):
        linear(features, mask)
