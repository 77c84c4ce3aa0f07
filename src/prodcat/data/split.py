"""Train / val / holdout split by product, stratified by leaf, grouped by duplicates, deterministic from a seed."""

from __future__ import annotations

import numpy as np

__all__ = ["SPLITS", "stratified_split", "grouped_split", "majority"]

SPLITS = ("train", "val", "holdout")  # codes 0, 1, 2 of `grouped_split`


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation products (one entry per product, so no product straddles two splits).

    Each category sends floor(n * f + u) of its n products to validation, u ~ U[0, 1) drawn per category, so the
    expected share is exactly f even for small categories; a category always keeps at least one training product,
    hence single-product categories stay in train. Vectorised: 7 M products take about a second.
    """
    labels = np.asarray(labels, dtype=np.int64)
    codes = grouped_split(labels, np.arange(len(labels)), val_fraction, 0.0, seed)
    return codes == 1


def majority(groups: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group ids, their majority label, their size): the most frequent label of each group, ties to the smallest."""
    order = np.lexsort((labels, groups))
    g, lab = groups[order], labels[order]
    run_start = np.flatnonzero(np.r_[True, (g[1:] != g[:-1]) | (lab[1:] != lab[:-1])])
    run_size = np.diff(np.r_[run_start, len(g)])
    run_group, run_label = g[run_start], lab[run_start]
    # Within each group, the largest run wins; lexsort's last key is primary, so sort by (group, -size, label).
    best = np.lexsort((run_label, -run_size, run_group))
    first = np.r_[True, run_group[best][1:] != run_group[best][:-1]]
    ids = run_group[best][first]
    sizes = np.bincount(np.searchsorted(ids, g), minlength=len(ids))
    return ids, run_label[best][first], sizes


def grouped_split(
    labels: np.ndarray, groups: np.ndarray, val_fraction: float, holdout_fraction: float, seed: int
) -> np.ndarray:
    """Split code per product (0 train, 1 val, 2 holdout, see `SPLITS`); every group lands on one side.

    Groups are stratified by their majority label: the groups of one label are shuffled, and laid end to end
    they fill floor(n * f + u) products of val, then of holdout (n products with that label, u ~ U[0, 1) per label
    and split, so small labels get the exact expected share). A group that starts inside a target goes there whole
    (overshoot below one group); a group larger than both targets, and the last group of every label, stay in
    train, so every label keeps training products. Vectorised: 7 M products take a few seconds.
    """
    labels, groups = np.asarray(labels, dtype=np.int64), np.asarray(groups, dtype=np.int64)
    codes = np.zeros(len(labels), dtype=np.int8)
    if not len(labels) or val_fraction + holdout_fraction <= 0:
        return codes
    ids, label, size = majority(groups, labels)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(ids)), label))  # by label, shuffled within
    label, size = label[order], size[order]
    start = np.flatnonzero(np.r_[True, label[1:] != label[:-1]])
    count = np.diff(np.r_[start, len(label)])
    totals = np.add.reduceat(size, start)
    draws = rng.random((len(start), 2))
    n_val = np.floor(totals * val_fraction + draws[:, 0]).astype(np.int64)
    n_holdout = np.floor(totals * holdout_fraction + draws[:, 1]).astype(np.int64)
    n_val, n_holdout = np.minimum(n_val, totals - 1), np.minimum(n_holdout, np.maximum(totals - 1 - n_val, 0))
    cumulative = np.cumsum(size)
    before = cumulative - size - np.repeat(cumulative[start] - size[start], count)  # products ahead, same label
    n_val, n_holdout = np.repeat(n_val, count), np.repeat(n_holdout, count)
    usable = (size <= np.maximum(n_val, n_holdout)) & (before + size < np.repeat(totals, count))
    side = np.where(before < n_val, 1, np.where(before < n_val + n_holdout, 2, 0))
    group_code = np.zeros(len(ids), dtype=np.int8)
    group_code[order] = np.where(usable, side, 0)
    codes[:] = group_code[np.searchsorted(ids, groups)]
    return codes
