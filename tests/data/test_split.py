"""Product-level stratified split: disjoint, stratified, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from prodcat.data.split import grouped_split, majority, stratified_split


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


# -- three-way, grouped ---------------------------------------------------------------------------------------------
def grouped_labels(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Zipf labels with duplicate groups: a third of the products in groups of 2-12 (mostly one label)."""
    rng = np.random.default_rng(seed)
    labels = zipf_labels(seed=seed)
    groups = np.arange(len(labels))
    start = 0
    while start < len(labels) // 3:
        size = int(rng.integers(2, 13))
        groups[start : start + size] = start
        start += size
    order = rng.permutation(len(labels))  # groups scattered over the catalog, ids still the smallest row
    return labels[order], groups[order]


def test_groups_land_on_one_side_and_fractions_hold():
    labels, groups = grouped_labels()
    codes = grouped_split(labels, groups, 0.1, 0.1, seed=0)
    assert codes.shape == labels.shape and set(np.unique(codes).tolist()) == {0, 1, 2}
    for group in np.unique(groups[groups != np.arange(len(groups))])[:500]:
        assert len(np.unique(codes[groups == group])) == 1
    shares = np.bincount(codes, minlength=3) / len(codes)
    assert abs(shares[1] - 0.1) < 0.015 and abs(shares[2] - 0.1) < 0.015


def test_grouped_split_is_stratified_and_every_label_keeps_training_products():
    labels, groups = grouped_labels(seed=1)
    codes = grouped_split(labels, groups, 0.1, 0.1, seed=2)
    sizes = np.bincount(labels)
    for side in (1, 2):
        share = np.bincount(labels, weights=codes == side, minlength=len(sizes))
        big = sizes >= 300
        assert np.abs(share[big] / sizes[big] - 0.1).max() < 0.05
    assert (np.bincount(labels, weights=codes == 0, minlength=len(sizes)) > 0).all()


def test_a_group_larger_than_the_targets_stays_in_train():
    labels = np.zeros(100, dtype=np.int64)
    groups = np.where(np.arange(100) < 40, 0, np.arange(100))  # 40 products share pictures
    for seed in range(10):
        codes = grouped_split(labels, groups, 0.1, 0.1, seed)
        assert not codes[:40].any() and (codes == 1).sum() > 0 and (codes == 2).sum() > 0


def test_grouped_split_is_deterministic_and_seeded():
    labels, groups = grouped_labels()
    first = grouped_split(labels, groups, 0.05, 0.05, seed=4)
    assert np.array_equal(first, grouped_split(labels.copy(), groups.copy(), 0.05, 0.05, seed=4))
    assert not np.array_equal(first, grouped_split(labels, groups, 0.05, 0.05, seed=5))
    assert not grouped_split(labels, groups, 0.0, 0.0, seed=4).any()


def test_majority_label_ties_go_to_the_smallest():
    ids, label, size = majority(np.array([5, 5, 2, 2, 2, 9]), np.array([3, 1, 4, 4, 0, 7]))
    assert ids.tolist() == [2, 5, 9] and label.tolist() == [4, 1, 7] and size.tolist() == [3, 2, 1]
