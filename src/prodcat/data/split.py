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
    groups, labels = np.asarray(groups, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    span = int(labels.max(initial=0)) - int(labels.min(initial=0)) + 1
    if len(groups) and abs(int(groups.max())) < 2**62 // span:  # one int64 key per (group, label): a fast 1-D sort
        low = int(labels.min())
        keys, counts = np.unique(groups * span + (labels - low), return_counts=True)
        pairs = np.stack([keys // span, keys % span + low], axis=1)
    else:
        pairs, counts = np.unique(np.stack([groups, labels], axis=1), axis=0, return_counts=True)
    best = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))  # per group: largest count first, then smallest label
    first = np.r_[True, pairs[best][1:, 0] != pairs[best][:-1, 0]]
    ids = pairs[best][first, 0]
    return ids, pairs[best][first, 1], np.bincount(np.searchsorted(ids, groups), minlength=len(ids))


def _group_table(labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`majority` for groups given as row ids in [0, n) (what `duplicate_groups` returns), fast on 7 M products:
    singletons (most products) take their own label, only products in shared groups are sorted."""
    sizes = np.bincount(groups, minlength=len(labels))
    roots = np.flatnonzero(sizes)
    label = labels[roots].copy()
    shared = np.flatnonzero(sizes[groups] > 1)
    if len(shared):
        ids, shared_label, _ = majority(groups[shared], labels[shared])
        label[np.searchsorted(roots, ids)] = shared_label
    return roots, label, sizes[roots]


def _shuffled_by(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Order by label, random within each label: one int64 sort key where labels fit in 31 bits (5x a lexsort)."""
    tiebreak = rng.integers(0, 2**32, len(label), dtype=np.int64)
    low = int(label.min(initial=0))
    if int(label.max(initial=0)) - low < 2**31:
        return np.argsort(((label - low) << 32) | tiebreak, kind="stable")
    return np.lexsort((tiebreak, label))


def grouped_split(
    labels: np.ndarray, groups: np.ndarray, val_fraction: float, holdout_fraction: float, seed: int
) -> np.ndarray:
    """Split code per product (0 train, 1 val, 2 holdout, see `SPLITS`); every group lands on one side.

    Groups are stratified by their majority label: the groups of one label are shuffled and, laid end to end, fill
    floor(n * f + u) products of val, then of holdout (n products with that label, u ~ U[0, 1) per label and split,
    so small labels get the exact expected share). A group that starts inside a target goes there whole (overshoot
    below one group); a group larger than both targets (a placeholder's products) stays in train, out of the
    queue, and so does the last product of each label, so every label keeps training products. Vectorised: 7 M
    products take a few seconds.
    """
    labels, groups = np.asarray(labels, dtype=np.int64), np.asarray(groups, dtype=np.int64)
    codes = np.zeros(len(labels), dtype=np.int8)
    if not len(labels) or val_fraction + holdout_fraction <= 0:
        return codes
    if groups.min() < 0 or groups.max() >= len(groups):  # arbitrary ids: renumber as the first row of each group
        _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
        groups = first[inverse.reshape(-1)]
    roots, label, size = _group_table(labels, groups)
    rng = np.random.default_rng(seed)
    order = _shuffled_by(label, rng)
    label, size = label[order], size[order]
    start = np.flatnonzero(np.r_[True, label[1:] != label[:-1]])
    count = np.diff(np.r_[start, len(label)])
    totals = np.bincount(labels)[label[start]]  # every product of the label, wherever its group went
    draws = rng.random((len(start), 2))
    n_val = np.minimum(np.floor(totals * val_fraction + draws[:, 0]).astype(np.int64), totals - 1)
    n_holdout = np.floor(totals * holdout_fraction + draws[:, 1]).astype(np.int64)
    n_holdout = np.minimum(n_holdout, np.maximum(totals - 1 - n_val, 0))
    n_val, n_holdout, totals = np.repeat(n_val, count), np.repeat(n_holdout, count), np.repeat(totals, count)
    fits = size <= np.maximum(n_val, n_holdout)  # larger groups stay in train and take no place in the queue
    queued = np.where(fits, size, 0)
    cumulative = np.cumsum(queued)
    before = cumulative - queued - np.repeat(cumulative[start] - queued[start], count)  # queued ahead, same label
    side = np.where(before < n_val, 1, np.where(before < n_val + n_holdout, 2, 0))
    code_of_root = np.zeros(len(labels), dtype=np.int8)
    code_of_root[roots[order]] = np.where(fits & (before + size < totals), side, 0)
    return code_of_root[groups]
