"""Product-level stratified split: disjoint, stratified, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from prodcat.data.split import stratified_split


def zipf_labels(categories: int = 400, seed: int = 0) -> np.ndarray:
    """Long-tailed category sizes (1 to ~2,000 products), shuffled, like the real catalog."""
    rng = np.random.default_rng(seed)
    sizes = np.maximum(1, (2000 / np.arange(1, categories + 1) ** 0.9).astype(np.int64))
    return rng.permutation(np.repeat(np.arange(categories), sizes))


def test_one_flag_per_product():
    labels = zipf_labels()
    is_val = stratified_split(labels, 0.1, seed=0)
    # One boolean per product: a product is in exactly one of train and val.
    assert is_val.shape == labels.shape and is_val.dtype == bool
    assert 0 < is_val.sum() < len(labels)


def test_stratified_per_category():
    labels = zipf_labels()
    fraction = 0.1
    is_val = stratified_split(labels, fraction, seed=3)
    sizes = np.bincount(labels)
    val = np.bincount(labels, weights=is_val)
    big = sizes >= 50
    assert np.abs(val[big] / sizes[big] - fraction).max() <= 1 / 50 + 1e-9  # floor(n f + u): within one product
    assert abs(is_val.mean() - fraction) < 0.01
    # Small categories get validation products too, in expectation n * f.
    small = (sizes >= 2) & (sizes < 50)
    assert abs(val[small].sum() / (sizes[small] * fraction).sum() - 1) < 0.25


def test_every_category_keeps_a_training_product():
    labels = np.concatenate([np.arange(50), np.repeat([100, 101], 2), np.repeat(200, 10)])
    for seed in range(20):
        is_val = stratified_split(labels, 0.5, seed)
        assert not is_val[:50].any()  # single-product categories always train
        for label in (100, 101, 200):
            assert (~is_val[labels == label]).any()


def test_deterministic_by_seed():
    labels = zipf_labels()
    first = stratified_split(labels, 0.05, seed=7)
    assert np.array_equal(first, stratified_split(labels.copy(), 0.05, seed=7))
    assert not np.array_equal(first, stratified_split(labels, 0.05, seed=8))


@pytest.mark.parametrize("labels", [np.zeros(0, dtype=np.int64), np.arange(10)])
def test_zero_fraction_and_empty(labels):
    assert not stratified_split(labels, 0.0, seed=0).any()
    assert stratified_split(labels, 0.3, seed=0).shape == labels.shape


def test_zero_fraction_on_a_big_catalog():
    assert not stratified_split(zipf_labels(), 0.0, seed=1).any()
