"""`prodcat evaluate`: image, product and taxonomy-level metrics of a run on a split of its feature store.

Select on val, report on the holdout: the checkpoint (`best`, chosen on val top-1 during training), the product
aggregation (`--aggregation auto`) and the auto-accept threshold are all chosen on `val`; every number is then
reported on `holdout` (by default), which nothing was tuned on. `--split val` reports on the selection split itself
and says so ("optimistic"). Every headline accuracy carries its n and a 95% interval over products: Wilson for a
proportion of products, a bootstrap over products otherwise (image accuracy, whose images cluster in products;
macro accuracy).

Outputs in `RUN/eval/`:
  metrics.json        every number (the Predictor reads `product.aggregation` and `confidence.threshold` from it)
  predictions.parquet one row per product: product_id, num_images, true label, top-3 labels and probabilities
  curves.json         the coverage / accuracy / threshold curve of the auto-accept choice (plain numbers)
  config.json, prior.json
Figures and the levers table as Markdown are drawn from these files by `prodcat.report.runs` (the CLI's `evaluate`
and `prodcat report` call it): evaluation hands plain data to the report and never imports plotting.

The split is read in chunks of whole products, and only compact results (top-k labels, the true class's
log-probability) are kept, so no (images x categories) array of the full split is ever held: the real validation
split (about 600k images x 5,270 categories) fits in a few hundred MB.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from prodcat.config import EvalConfig, TrainConfig, save_config
from prodcat.data.catalog import load_catalog
from prodcat.data.taxonomy import Taxonomy
from prodcat.evaluate import levers
from prodcat.features.loaders import product_sorted_rows
from prodcat.features.store import FeatureStore
from prodcat.predict.calibration import (
    ECE_BINS,
    PRIOR_FILE,
    ProductCalibration,
    choose_tau,
    expected_calibration_error,
    fit_temperature,
    log_prior,
    nll,
    reliability,
    save_prior,
)
from prodcat.predict.predictor import AGGREGATIONS, Predictor, aggregate_products
from prodcat.utils import get_logger, progress, write_json, write_parquet

__all__ = [
    "evaluate",
    "SplitError",
    "proportion_ci",
    "bootstrap_ci",
    "macro_accuracy",
    "train_pictures_per_leaf",
    "frequency_thresholds",
    "protocol_label",
    "summary_lines",
    "Collected",
    "collect",
    "top_k",
    "accuracy_block",
    "taxonomy_block",
    "frequency_groups",
    "confusions",
    "confidence_curve",
    "choose_threshold",
    "select",
    "Variant",
    "search_val",
    "compute_metrics",
    "product_hits",
    "ProductHits",
    "CURVES_FILE",
    "TOP_K",
    "GALLERY_TOP",
]

TOP_K = 5  # top-k kept per image and product (top-5 accuracy)
GALLERY_TOP = 3  # predictions.parquet keeps the top 3
FREQUENCY_GROUPS = ("head", "medium", "tail")
SELECTION_SPLIT = "val"  # every choice evaluation makes (aggregation, threshold) is made here
# Cdiscount's full train.bson: 12,371,293 pictures over 5,270 leaves. There, > 1,000 / 100-1,000 / < 100 pictures
# per leaf gives 1,532 head / 2,686 medium / 1,052 tail leaves (images_per_category.json).
FULL_SCALE_PICTURES_PER_LEAF = 12_371_293 / 5_270
FULL_SCALE_THRESHOLDS = (100.0, 1000.0)  # (tail below, head above), pictures per leaf
Z95 = 1.959963984540054  # two-sided 95% normal quantile
COVERAGE_POINTS = (0.5, 0.8, 0.9, 1.0)
CURVES_FILE = "curves.json"  # the confidence curve the report draws (coverage / accuracy against the threshold)
CURVE_POINTS = 2000  # at most this many points of it: a figure needs no more, and 350k products would be 20 MB
log = get_logger("prodcat.evaluate.evaluation")


class SplitError(ValueError):
    """The feature store lacks a split evaluation needs, or its rows cannot be evaluated."""


@dataclasses.dataclass
class Collected:
    """Compact results of one pass over a split (products sorted by id, their images contiguous)."""

    image_label: np.ndarray  # (N,) true leaf label
    image_top: np.ndarray  # (N, k) predicted labels, best first
    image_true_logprob: np.ndarray  # (N,)
    product_id: np.ndarray  # (P,)
    product_label: np.ndarray  # (P,)
    num_images: np.ndarray  # (P,) images evaluated (valid rows of the store)
    product_top: dict[str, np.ndarray]  # aggregation -> (P, k) labels
    product_top_prob: dict[str, np.ndarray]  # aggregation -> (P, k) probabilities
    product_true_logprob: dict[str, np.ndarray]  # aggregation -> (P,)
    heads: dict[str, np.ndarray] | None = None  # hier: "image_<out>" (N,) and "<aggregation>_<out>" (P,) argmax
    variants: dict[str, Variant] | None = None  # the chosen aggregation under other calibrations (levers)
    timing: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds spent applying each variant


@dataclasses.dataclass
class Variant:
    """Top-1 of the chosen aggregation under one calibration: label, probability and the true leaf's log-prob."""

    top1: np.ndarray  # (P,)
    prob: np.ndarray  # (P,)
    true_logprob: np.ndarray  # (P,)


# -- small exact pieces (tested against brute force) -----------------------------------------------------------------
def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) of the k best columns per row, best first; ties inside the k by lower label."""
    k = min(k, scores.shape[1])
    # torch.topk is several times faster than numpy's argpartition on (4096, 5270) rows and uses every thread.
    values, labels = torch.from_numpy(np.ascontiguousarray(scores)).topk(k, dim=1)
    values, labels = values.numpy(), labels.numpy()
    order = np.lexsort((labels, -values), axis=1)
    return np.take_along_axis(labels, order, axis=1), np.take_along_axis(values, order, axis=1)


def accuracy_block(top: np.ndarray, label: np.ndarray, true_logprob: np.ndarray | None) -> dict[str, Any]:
    """top-1, top-5 (or top-k when fewer classes) and NLL loss; loss is None where scores are not probabilities."""
    hit = top == label[:, None]
    return {
        "count": int(len(label)),
        "top1": float(hit[:, 0].mean()) if len(label) else 0.0,
        "top5": float(hit[:, :TOP_K].any(axis=1).mean()) if len(label) else 0.0,
        "loss": None if true_logprob is None else float(-np.mean(true_logprob)) if len(label) else 0.0,
    }


def taxonomy_block(pred: np.ndarray, label: np.ndarray, taxonomy: Taxonomy) -> dict[str, Any]:
    """Accuracy of the predicted leaf at level 1, level 2 and leaf, and how bad the leaf errors are."""
    level1_ok = taxonomy.leaf_level1[pred] == taxonomy.leaf_level1[label]
    level2_ok = taxonomy.leaf_level2[pred] == taxonomy.leaf_level2[label]  # (level1, level2) pairs: implies level 1
    wrong = pred != label
    errors = int(wrong.sum())

    def share(mask: np.ndarray) -> float | None:
        return float(mask[wrong].mean()) if errors else None

    return {
        "level1": float(level1_ok.mean()) if len(label) else 0.0,
        "level2": float(level2_ok.mean()) if len(label) else 0.0,
        "leaf": float((~wrong).mean()) if len(label) else 0.0,
        "severity": {
            "errors": errors,
            "same_level2": share(level2_ok),  # wrong leaf, right level-2 group: a near miss
            "same_level1": share(level1_ok),  # includes same_level2
            "other_level1": share(~level1_ok),  # wrong department altogether
        },
    }


def proportion_ci(successes: int, n: int, z: float = Z95) -> list[float]:
    """Wilson score interval of a binomial proportion (95% by default); [0, 1] when n is 0.

    Wilson rather than the normal approximation: it stays inside [0, 1] and keeps its coverage near 0 % and 100 %,
    where small splits and auto-accepted subsets live.
    """
    if n <= 0:
        return [0.0, 1.0]
    share = successes / n
    denominator = 1.0 + z * z / n
    centre = (share + z * z / (2 * n)) / denominator
    half = z / denominator * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def bootstrap_ci(
    statistics: dict[str, Callable[[np.ndarray], float]],
    num_products: int,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile 95% intervals of statistics of products, by resampling products with replacement.

    Each statistic takes `weights` (P,), how many times each product was drawn, so one draw serves every statistic
    and no resampled copy of the data is built.
    """
    if num_products == 0 or resamples == 0:
        return {name: [0.0, 1.0] for name in statistics}
    rng = np.random.default_rng(seed)
    values = {name: np.empty(resamples) for name in statistics}
    for index in range(resamples):
        weights = np.bincount(rng.integers(0, num_products, num_products), minlength=num_products)
        for name, statistic in statistics.items():
            values[name][index] = statistic(weights)
    return {name: [float(v) for v in np.quantile(value, [0.025, 0.975])] for name, value in values.items()}


def macro_accuracy(hits: np.ndarray, totals: np.ndarray, label: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean per-leaf recall over the leaves present: leaf recall = sum(hits) / sum(totals) over its items.

    For products `hits` is 0/1 and `totals` 1; for images per product, hits = correct images, totals = images.
    `weights` (bootstrap draw counts) multiplies both.
    """
    if weights is not None:
        hits, totals = hits * weights, totals * weights
    leaf_hits = np.bincount(label, weights=hits)
    leaf_totals = np.bincount(label, weights=totals)
    present = leaf_totals > 0
    return float((leaf_hits[present] / leaf_totals[present]).mean()) if present.any() else 0.0


def train_pictures_per_leaf(store: FeatureStore, num_classes: int) -> np.ndarray:
    """Pictures per leaf in the store's train split (every row, valid or not: a picture of a train product)."""
    rows = store.split_indices("train", valid_only=False)
    labels = store.column("label")[rows].astype(np.int64)
    return np.bincount(labels[labels >= 0], minlength=num_classes)[:num_classes]


def frequency_thresholds(train_pictures: np.ndarray) -> dict[str, Any]:
    """Head / medium / tail thresholds in train pictures per leaf: Cdiscount's, scaled to this data's size.

    At full scale a leaf with > 1,000 pictures is head, < 100 tail. Smaller sets scale both by their mean train
    pictures per leaf over the full set's (2,347): a subsample of every leaf scales with its total pictures, a demo
    with fewer leaves drawn from the real tail keeps the real shares of head, medium and tail leaves.
    """
    counts = np.asarray(train_pictures)
    present = counts > 0
    mean = float(counts[present].mean()) if present.any() else 0.0
    scale = mean / FULL_SCALE_PICTURES_PER_LEAF
    tail_below, head_above = (value * scale for value in FULL_SCALE_THRESHOLDS)
    return {
        "head_above": head_above,
        "tail_below": tail_below,
        "scale": scale,
        "unit": "train-split pictures per leaf",
        "rule": f"head > {head_above:,.1f}, medium {tail_below:,.1f}-{head_above:,.1f}, tail < {tail_below:,.1f} "
        f"train pictures per leaf (Cdiscount's 1,000 / 100 at full scale, times {scale:.4g})",
    }


def frequency_groups(train_pictures: np.ndarray, thresholds: dict[str, Any] | None = None) -> np.ndarray:
    """Per leaf: 0 head, 1 medium, 2 tail by train pictures (see `frequency_thresholds`); -1 no train picture."""
    counts = np.asarray(train_pictures)
    thresholds = thresholds or frequency_thresholds(counts)
    group = np.where(counts > thresholds["head_above"], 0, np.where(counts < thresholds["tail_below"], 2, 1))
    return np.where(counts > 0, group, -1).astype(np.int64)


def confusions(pred: np.ndarray, label: np.ndarray, taxonomy: Taxonomy, top: int = 10) -> list[dict[str, Any]]:
    """The `top` most frequent (true, predicted) leaf pairs among errors, ties by true then predicted label."""
    wrong = pred != label
    if not wrong.any():
        return []
    num_classes = np.int64(taxonomy.num_classes)
    pairs, counts = np.unique(label[wrong].astype(np.int64) * num_classes + pred[wrong], return_counts=True)
    order = np.lexsort((pairs, -counts))[:top]
    per_true = np.bincount(label, minlength=taxonomy.num_classes)
    result = []
    for pair, count in zip(pairs[order].tolist(), counts[order].tolist(), strict=True):
        true_label, pred_label = divmod(pair, int(num_classes))
        result.append(
            {
                "true": taxonomy.describe(true_label),
                "predicted": taxonomy.describe(pred_label),
                "count": int(count),
                "share_of_errors": count / int(wrong.sum()),
                "share_of_true": count / int(per_true[true_label]),  # of the true category's products
                "same_level2": bool(taxonomy.leaf_level2[true_label] == taxonomy.leaf_level2[pred_label]),
                "same_level1": bool(taxonomy.leaf_level1[true_label] == taxonomy.leaf_level1[pred_label]),
            }
        )
    return result


def confidence_curve(score: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """Accept every product whose score >= t, for each distinct score t: coverage and accuracy of the accepted.

    Points are ordered by decreasing threshold (increasing coverage); ties are accepted together.
    """
    order = np.argsort(-score, kind="stable")
    sorted_score, hits = score[order], np.cumsum(correct[order])
    ends = np.flatnonzero(np.r_[sorted_score[1:] != sorted_score[:-1], True])
    accepted = ends + 1
    return {
        "threshold": sorted_score[ends],
        "coverage": accepted / max(len(score), 1),
        "accuracy": hits[ends] / accepted,
    }


def choose_threshold(curve: dict[str, np.ndarray], target: float) -> dict[str, Any]:
    """The lowest threshold (largest coverage) whose accepted products reach `target` accuracy."""
    reaching = np.flatnonzero(curve["accuracy"] >= target - 1e-12)
    if not len(reaching):
        best = float(curve["accuracy"].max()) if len(curve["accuracy"]) else 0.0
        return {
            "threshold": None,
            "coverage": 0.0,
            "accuracy": None,
            "note": f"no threshold reaches {target:.1%} product accuracy (best {best:.1%} at any coverage): "
            "every product goes to a person",
        }
    point = int(reaching[-1])
    return {
        "threshold": float(curve["threshold"][point]),
        "coverage": float(curve["coverage"][point]),
        "accuracy": float(curve["accuracy"][point]),
        "note": None,
    }


# -- the pass over the split -------------------------------------------------------------------------------------------
def _product_rows(store: FeatureStore, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(store rows sorted by product then image, product ids, start of each product in rows, product labels)."""
    rows, product_id, starts = product_sorted_rows(store, split)
    if not len(rows):
        raise SplitError(f"{store.path}: no valid {split!r} images in this feature store")
    labels = store.column("label")[rows].astype(np.int64)
    if (labels < 0).any():
        raise SplitError(f"{store.path}: split {split!r} has unlabelled rows (label -1); evaluate needs labels")
    product_label = labels[starts]
    counts = np.diff(np.r_[starts, len(rows)])
    mixed = np.flatnonzero(np.repeat(product_label, counts) != labels)
    if len(mixed):
        raise ValueError(f"{store.path}: product {int(product_id[mixed[0]])} has images with different labels")
    return rows, product_id[starts], starts, product_label


def _chunks(starts: np.ndarray, total: int, size: int) -> Iterator[tuple[int, int]]:
    """Product ranges [p, q) holding about `size` images (always at least one product)."""
    bounds = np.r_[starts, total]
    first = 0
    while first < len(starts):
        last = int(np.searchsorted(bounds, bounds[first] + size, side="right")) - 1
        last = min(max(last, first + 1), len(starts))
        yield first, last
        first = last


def _own_head_log_probs(model: torch.nn.Module, features: torch.Tensor) -> dict[str, torch.Tensor]:
    # The hier classifier's level_log_probs sums the *decoded* leaf distribution; its heads' own outputs are
    # head_log_probs. Use the latter when it exists, so "level-1 head accuracy" means the level-1 head.
    if hasattr(model, "head_log_probs"):
        return model.head_log_probs(features)
    return model.level_log_probs(features)


@torch.inference_mode()
def _head_argmax(
    predictor: Predictor, features: np.ndarray, product_index: np.ndarray, num_products: int, batch_size: int
) -> dict[str, np.ndarray]:
    """Argmax of each output of a hierarchical model, per image and per product (each aggregation)."""
    outputs: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(features), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(features[start : start + batch_size], dtype=np.float32))
        for name, value in _own_head_log_probs(predictor.model, batch.to(predictor.device)).items():
            outputs.setdefault(name, []).append(value.float().cpu().numpy())
    result = {}
    for name, parts in outputs.items():
        log_probs = np.concatenate(parts)
        result[f"image_{name}"] = log_probs.argmax(axis=1)
        for method in AGGREGATIONS:
            aggregated = aggregate_products(log_probs, product_index, num_products, method)
            result[f"{method}_{name}"] = aggregated.argmax(axis=1)
    return result


def collect(
    predictor: Predictor,
    store: FeatureStore,
    split: str,
    batch_size: int = 4096,
    heads: bool = False,
    calibration: ProductCalibration | None = None,
    variants: dict[str, ProductCalibration] | None = None,
    aggregation: str | None = None,
) -> Collected:
    """One pass over `split`: image log-probs through the Predictor, products combined by every aggregation, then
    `calibration` (logit adjustment, temperature) applied to each; `variants` keeps the top-1 of `aggregation` under
    other calibrations too (the levers' arms)."""
    rows, product_id, starts, product_label = _product_rows(store, split)
    calibration = calibration or ProductCalibration()
    timing: dict[str, float] = {}
    counts = np.diff(np.r_[starts, len(rows)])
    parts: dict[str, list[np.ndarray]] = {}

    def keep(name: str, value: np.ndarray) -> None:
        parts.setdefault(name, []).append(value)

    bar = progress(total=len(rows), desc=f"evaluate {split}", unit="image")
    for first, last in _chunks(starts, len(rows), batch_size):
        lo, hi = int(starts[first]), int(starts[last]) if last < len(starts) else len(rows)
        features = store.read(rows[lo:hi])
        log_probs = predictor.log_probs_from_features(features, batch_size)
        labels = np.repeat(product_label[first:last], counts[first:last])
        top, _ = top_k(log_probs, TOP_K)
        keep("image_top", top)
        keep("image_true", log_probs[np.arange(len(labels)), labels])
        product_index = np.repeat(np.arange(last - first), counts[first:last])
        for method in predictor.aggregations:  # a product head adds its own (image top-1: single pictures through it)
            raw = predictor.product_log_probs_from_features(
                features, product_index, last - first, method, log_probs=log_probs
            )
            if method == aggregation:
                _keep_variants(raw, product_label[first:last], variants or {}, keep, timing)
            aggregated = calibration(raw)
            labels_top, scores_top = top_k(aggregated, TOP_K)
            keep(f"{method}_top", labels_top)
            keep(f"{method}_prob", np.exp(scores_top))
            keep(f"{method}_true", aggregated[np.arange(last - first), product_label[first:last]])
        if heads:
            for name, value in _head_argmax(predictor, features, product_index, last - first, batch_size).items():
                keep(f"head:{name}", value)
        bar.update(hi - lo)
    bar.close()
    joined = {name: np.concatenate(value) for name, value in parts.items()}
    head_parts = {name[5:]: value for name, value in joined.items() if name.startswith("head:")}
    kept = {
        name: Variant(joined[f"variant:{name}:top1"], joined[f"variant:{name}:prob"], joined[f"variant:{name}:true"])
        for name in (variants or {})
        if aggregation is not None
    }
    return Collected(
        image_label=np.repeat(product_label, counts),
        image_top=joined["image_top"],
        image_true_logprob=joined["image_true"],
        product_id=product_id,
        product_label=product_label,
        num_images=counts,
        product_top={m: joined[f"{m}_top"] for m in predictor.aggregations},
        product_top_prob={m: joined[f"{m}_prob"] for m in predictor.aggregations},
        product_true_logprob={m: joined[f"{m}_true"] for m in predictor.aggregations},
        heads=head_parts or None,
        variants=kept or None,
        timing=timing,
    )


def _keep_variants(
    raw: np.ndarray,
    labels: np.ndarray,
    variants: dict[str, ProductCalibration],
    keep: Callable[[str, np.ndarray], None],
    timing: dict[str, float],
) -> None:
    """Top-1 label, probability and true log-prob of one chunk's products under each variant (timed)."""
    for name, variant in variants.items():
        start = time.perf_counter()
        scores = variant(raw)
        timing[name] = timing.get(name, 0.0) + time.perf_counter() - start
        best = scores.argmax(axis=1)
        rows = np.arange(len(labels))
        keep(f"variant:{name}:top1", best)
        keep(f"variant:{name}:prob", np.exp(scores[rows, best]))
        keep(f"variant:{name}:true", scores[rows, labels])


# -- selection on val ------------------------------------------------------------------------------------------------
def _product_hits(data: Collected, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 hit, top-5 hit) per product for one aggregation."""
    hit = data.product_top[method] == data.product_label[:, None]
    return hit[:, 0], hit[:, :TOP_K].any(axis=1)


def select(data: Collected, config: EvalConfig) -> dict[str, Any]:
    """The choices evaluation makes, from the selection split only: product aggregation, then the threshold."""
    hits = {method: _product_hits(data, method) for method in data.product_top}
    top1 = {method: float(hit[0].mean()) for method, hit in hits.items()}
    if config.aggregation == "auto":
        # Best top-1; top-5 breaks ties, then the order of AGGREGATIONS (mean_prob first).
        order = list(hits)
        key = {method: (top1[method], float(hits[method][1].mean()), -order.index(method)) for method in hits}
        chosen = max(order, key=key.__getitem__)
        chosen_by = f"auto: best product top-1 on {SELECTION_SPLIT}"
    else:
        chosen, chosen_by = config.aggregation, "config"
    curve = confidence_curve(data.product_top_prob[chosen][:, 0], hits[chosen][0])
    return {
        "split": SELECTION_SPLIT,
        "n": int(len(data.product_label)),
        "images": int(len(data.image_label)),
        "aggregation": chosen,
        "aggregation_chosen_by": chosen_by,
        "aggregation_top1": top1,
        "threshold": choose_threshold(curve, config.target_accuracy),
    }


def search_val(
    predictor: Predictor, store: FeatureStore, aggregation: str, prior_log: np.ndarray, config: EvalConfig
) -> dict[str, Any]:
    """One pass over val with the chosen aggregation: product top-1 and macro accuracy for every tau of the grid
    (tau picked for `config.objective`), then T fitted on the tau-adjusted product log-probabilities of up to
    `config.calibration_products` val products drawn at random (the NLL of one scalar needs no more)."""
    start = time.perf_counter()
    rows, _, starts, product_label = _product_rows(store, SELECTION_SPLIT)
    counts = np.diff(np.r_[starts, len(rows)])
    grid = config.tau_grid
    hits = np.zeros((len(grid), len(starts)), dtype=bool)
    rng = np.random.default_rng(0)
    kept_index = np.sort(rng.choice(len(starts), min(len(starts), config.calibration_products), replace=False))
    kept = np.zeros((len(kept_index), predictor.taxonomy.num_classes), np.float32)
    shift = -prior_log[None, :]
    for first, last in _chunks(starts, len(rows), config.batch_size):
        lo, hi = int(starts[first]), int(starts[last]) if last < len(starts) else len(rows)
        features = store.read(rows[lo:hi])
        log_probs = predictor.log_probs_from_features(features, config.batch_size)
        product_index = np.repeat(np.arange(last - first), counts[first:last])
        aggregated = predictor.product_log_probs_from_features(
            features, product_index, last - first, aggregation, log_probs=log_probs
        )
        for index, tau in enumerate(grid):  # argmax needs no renormalisation
            hits[index, first:last] = (aggregated + tau * shift).argmax(axis=1) == product_label[first:last]
        mine = kept_index[(kept_index >= first) & (kept_index < last)]
        kept[np.searchsorted(kept_index, mine)] = aggregated[mine - first]
    ones = np.ones(len(starts))
    top1 = hits.mean(axis=1)
    macro = np.array([macro_accuracy(hit.astype(np.float64), ones, product_label) for hit in hits])
    tau = choose_tau(grid, top1, macro, config.objective)
    search_seconds = time.perf_counter() - start
    start = time.perf_counter()
    adjusted = ProductCalibration(tau, prior_log).adjust(kept)
    kept_labels = product_label[kept_index]
    temperature = fit_temperature(adjusted, kept_labels) if config.calibrate else 1.0
    return {
        "tau": tau,
        "temperature": temperature,
        "grid": list(grid),
        "val_top1": top1.tolist(),
        "val_macro": macro.tolist(),
        "val_products": int(len(starts)),
        "tau_seconds": search_seconds,
        "fit_products": int(len(kept_index)),
        "fit_seconds": time.perf_counter() - start,
        "fit_memory_mb": kept.nbytes / 2**20,
        "val_nll_before": nll(adjusted, kept_labels),
        "val_nll_after": nll(adjusted, kept_labels, temperature),
    }


def _calibrated_threshold(data: Collected, chosen: str, target: float) -> dict[str, Any]:
    """The auto-accept threshold, chosen on val's calibrated product probabilities."""
    curve = confidence_curve(data.product_top_prob[chosen][:, 0], _product_hits(data, chosen)[0])
    return choose_threshold(curve, target)


# -- metrics on the reported split -----------------------------------------------------------------------------------
def _image_hits_per_product(data: Collected, rank: int) -> np.ndarray:
    """Correct images per product (within the top `rank`); images are contiguous per product."""
    hit = (data.image_top[:, :rank] == data.image_label[:, None]).any(axis=1)
    return np.add.reduceat(hit.astype(np.float64), np.r_[0, np.cumsum(data.num_images)[:-1]])


def _intervals(data: Collected, chosen: str, resamples: int) -> dict[str, list[float]]:
    """Bootstrap intervals over products of what is not a proportion of products."""
    images = data.num_images.astype(np.float64)
    image_top1, image_top5 = _image_hits_per_product(data, 1), _image_hits_per_product(data, TOP_K)
    product_hit = _product_hits(data, chosen)[0].astype(np.float64)
    ones, label = np.ones_like(product_hit), data.product_label
    statistics: dict[str, Callable[[np.ndarray], float]] = {
        # Images of one product are not independent draws: resample products, take the ratio of images.
        # einsum, not `@`: a BLAS dot of 350k items can be 30x slower on a busy many-threaded host.
        "image_top1": lambda w: float(np.einsum("i,i->", w, image_top1) / np.einsum("i,i->", w, images)),
        "image_top5": lambda w: float(np.einsum("i,i->", w, image_top5) / np.einsum("i,i->", w, images)),
        "image_macro": lambda w: macro_accuracy(image_top1, images, label, w),
        "product_macro": lambda w: macro_accuracy(product_hit, ones, label, w),
    }
    return bootstrap_ci(statistics, len(label), resamples)


def _image_metrics(data: Collected, intervals: dict[str, list[float]]) -> dict[str, Any]:
    block = accuracy_block(data.image_top, data.image_label, data.image_true_logprob)
    hits = _image_hits_per_product(data, 1)
    return {
        **block,
        "n": int(len(data.image_label)),
        "products": int(len(data.product_label)),
        "top1_ci95": intervals["image_top1"],
        "top5_ci95": intervals["image_top5"],
        "macro": macro_accuracy(hits, data.num_images.astype(np.float64), data.product_label),
        "macro_ci95": intervals["image_macro"],
        "ci95_method": "bootstrap over products (images of a product are resampled together)",
    }


def _product_metrics(data: Collected, selection: dict[str, Any], intervals: dict[str, list[float]]) -> dict[str, Any]:
    methods = {}
    for method in data.product_top:
        # vote's scores are vote shares with a tiny tie-break, not a probability model: its NLL means nothing.
        true_logprob = None if method == "vote" else data.product_true_logprob[method]
        methods[method] = accuracy_block(data.product_top[method], data.product_label, true_logprob)
    chosen = selection["aggregation"]
    top1_hit, top5_hit = _product_hits(data, chosen)
    n = int(len(data.product_label))
    by_num_images = {}
    for method in data.product_top:
        correct = _product_hits(data, method)[0]
        by_num_images[method] = {
            str(k): {"products": int((data.num_images == k).sum()), "top1": float(correct[data.num_images == k].mean())}
            for k in np.unique(data.num_images).tolist()
        }
    return {
        "aggregation": chosen,
        "chosen_by": selection["aggregation_chosen_by"],
        "chosen_on": selection["split"],
        **{k: methods[chosen][k] for k in ("top1", "top5", "loss")},
        "n": n,
        "count": n,
        "top1_ci95": proportion_ci(int(top1_hit.sum()), n),
        "top5_ci95": proportion_ci(int(top5_hit.sum()), n),
        "macro": macro_accuracy(top1_hit.astype(np.float64), np.ones(n), data.product_label),
        "macro_ci95": intervals["product_macro"],
        "ci95_method": "Wilson for top-1 / top-5; bootstrap over products for macro",
        "methods": methods,
        "by_num_images": by_num_images,
        "notes": {"vote": "loss is None: vote scores are vote shares, not probabilities"},
    }


def _frequency_metrics(data: Collected, chosen: str, train_pictures: np.ndarray) -> dict[str, Any]:
    thresholds = frequency_thresholds(train_pictures)
    group = frequency_groups(train_pictures, thresholds)
    product_correct = _product_hits(data, chosen)[0]
    image_correct = data.image_top[:, 0] == data.image_label
    result: dict[str, Any] = {"thresholds": thresholds}
    names = dict(enumerate(FREQUENCY_GROUPS)) | {-1: "unseen"}
    for index, name in names.items():
        leaves = np.flatnonzero(group == index)
        products = group[data.product_label] == index
        if index == -1 and not products.any():
            continue
        images = group[data.image_label] == index
        hits = product_correct[products]
        result[name] = {
            "categories": int(len(leaves)),
            "categories_evaluated": int(len(np.unique(data.product_label[products]))),
            "train_pictures_min": int(train_pictures[leaves].min()) if len(leaves) else 0,
            "train_pictures_max": int(train_pictures[leaves].max()) if len(leaves) else 0,
            "train_pictures_share": float(train_pictures[leaves].sum() / max(int(train_pictures.sum()), 1)),
            "products": int(products.sum()),
            "product_top1": float(hits.mean()) if products.any() else None,
            "product_top1_ci95": proportion_ci(int(hits.sum()), int(products.sum())) if products.any() else None,
            "product_macro": macro_accuracy(hits.astype(np.float64), np.ones(len(hits)), data.product_label[products])
            if products.any()
            else None,
            "images": int(images.sum()),
            "image_top1": float(image_correct[images].mean()) if images.any() else None,
        }
    return result


def _confidence_metrics(
    data: Collected, chosen: str, target: float, picked: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The threshold picked on the selection split, applied to this split: what it really accepts."""
    score = data.product_top_prob[chosen][:, 0]
    correct = _product_hits(data, chosen)[0]
    curve = confidence_curve(score, correct)
    threshold = picked["threshold"]
    accepted = np.zeros(len(score), bool) if threshold is None else score >= threshold
    count, hits = int(accepted.sum()), int(correct[accepted].sum())
    at_coverage = {}
    for share in COVERAGE_POINTS:
        point = min(int(np.searchsorted(curve["coverage"], share - 1e-12)), len(curve["coverage"]) - 1)
        at_coverage[f"{share:g}"] = {
            "threshold": float(curve["threshold"][point]),
            "coverage": float(curve["coverage"][point]),
            "accuracy": float(curve["accuracy"][point]),
        }
    return {
        "target_accuracy": target,
        "threshold": threshold,
        "chosen_on": SELECTION_SPLIT,
        "coverage": float(accepted.mean()) if len(score) else 0.0,
        "accuracy": hits / count if count else None,
        "accepted": count,
        "accuracy_ci95": proportion_ci(hits, count) if count else None,
        "selection": {key: picked[key] for key in ("coverage", "accuracy")},
        "note": picked["note"],
        "score": f"top probability of the {chosen} product distribution",
        "rule": "auto-accept a product when its score >= threshold; send the rest to a person",
        "at_coverage": at_coverage,
    }, curve


def _head_metrics(data: Collected, chosen: str, taxonomy: Taxonomy) -> dict[str, Any]:
    """Own accuracy of each output of a hierarchical model (before hierarchical decoding)."""
    assert data.heads is not None
    truth = {
        "leaf": (data.image_label, data.product_label),
        "level1": (taxonomy.leaf_level1[data.image_label], taxonomy.leaf_level1[data.product_label]),
        "level2": (taxonomy.leaf_level2[data.image_label], taxonomy.leaf_level2[data.product_label]),
    }
    result: dict[str, Any] = {"aggregation": chosen}
    for name, (image_truth, product_truth) in truth.items():
        if f"image_{name}" not in data.heads:
            continue
        result[f"{name}_head"] = {
            "image": float((data.heads[f"image_{name}"] == image_truth).mean()),
            "product": float((data.heads[f"{chosen}_{name}"] == product_truth).mean()),
        }
    return result


def protocol_label(split: str, products: int, images: int) -> str:
    """How a number was obtained, e.g. "selected on val, reported on holdout, n = 312 products (540 images)"."""
    caveat = {"holdout": "", SELECTION_SPLIT: ": optimistic", "train": ": optimistic (the head was trained on it)"}
    return (
        f"selected on {SELECTION_SPLIT}, reported on {split}{caveat.get(split, '')}, "
        f"n = {products:,} products ({images:,} images)"
    )


def compute_metrics(
    data: Collected,
    taxonomy: Taxonomy,
    config: EvalConfig,
    selection: dict[str, Any],
    train_pictures: np.ndarray,
) -> tuple[dict[str, Any], dict]:
    """Every metric of `data` (the reported split) for the choices in `selection`; also the confidence curve."""
    chosen = selection["aggregation"]
    intervals = _intervals(data, chosen, config.bootstrap_resamples)
    image_pred, product_pred = data.image_top[:, 0], data.product_top[chosen][:, 0]
    confidence, curve = _confidence_metrics(data, chosen, config.target_accuracy, selection["threshold"])
    products, images = int(len(data.product_label)), int(len(data.image_label))
    metrics = {
        "split": config.split,
        "selection_split": SELECTION_SPLIT,
        "protocol": protocol_label(config.split, products, images),
        "optimistic": config.split != "holdout",
        "images": images,
        "products": products,
        "interval": f"95% over products: Wilson for proportions of products, bootstrap "
        f"({config.bootstrap_resamples:,} resamples of products) for image and macro accuracy",
        "seed_spread": "n/a (one training seed per run: compare / sweep give the spread over seeds)",
        "image": _image_metrics(data, intervals),
        "product": _product_metrics(data, selection, intervals),
        "taxonomy": {
            "image": taxonomy_block(image_pred, data.image_label, taxonomy),
            "product": taxonomy_block(product_pred, data.product_label, taxonomy),
            "frequency": _frequency_metrics(data, chosen, train_pictures),
            "confusions": confusions(product_pred, data.product_label, taxonomy),
        },
        "confidence": confidence,
        "selection": selection,
    }
    if data.heads:
        metrics["hier"] = _head_metrics(data, chosen, taxonomy)
    return metrics, curve


def _group_accuracy(correct: np.ndarray, label: np.ndarray, group: np.ndarray) -> dict[str, Any]:
    """Product top-1 per head / medium / tail group (leaves by train pictures), with its n."""
    result = {}
    for index, name in enumerate(FREQUENCY_GROUPS):
        mine = group[label] == index
        result[name] = {"products": int(mine.sum()), "top1": float(correct[mine].mean()) if mine.any() else None}
    return result


def _arm_block(variant: Variant, label: np.ndarray, group: np.ndarray) -> dict[str, Any]:
    correct = variant.top1 == label
    return {
        "top1": float(correct.mean()) if len(label) else 0.0,
        "macro": macro_accuracy(correct.astype(np.float64), np.ones(len(label)), label),
        "groups": _group_accuracy(correct, label, group),
    }


def _adjustment_metrics(
    data: Collected, search: dict[str, Any], config: EvalConfig, train_pictures: np.ndarray
) -> dict[str, Any]:
    """Lever 3 (long tail): tau chosen on val for the objective; top-1, macro and head / medium / tail before and
    after on the reported split."""
    assert data.variants is not None
    group = frequency_groups(train_pictures)
    return {
        "tau": search["tau"],
        "objective": config.objective,
        "chosen_on": SELECTION_SPLIT,
        "formula": "log_softmax(product log-prob - tau * log prior), before twins and temperature",
        "prior": f"train-split pictures per leaf (a leaf without any counts as 1), RUN/eval/{PRIOR_FILE}",
        "val": {
            "n": search["val_products"],
            "grid": search["grid"],
            "top1": search["val_top1"],
            "macro": search["val_macro"],
        },
        "split": config.split,
        "n": int(len(data.product_label)),
        "before": _arm_block(data.variants["base"], data.product_label, group),
        "after": _arm_block(data.variants["adjusted"], data.product_label, group),
        "note": levers.LEVERS_NOTE,
    }


def _accepted(prob: np.ndarray, correct: np.ndarray, picked: dict[str, Any]) -> dict[str, Any]:
    """What a threshold picked on val accepts on this split."""
    threshold = picked["threshold"]
    accepted = np.zeros(len(prob), bool) if threshold is None else prob >= threshold
    count = int(accepted.sum())
    return {
        "threshold": threshold,
        "coverage": float(accepted.mean()) if len(prob) else 0.0,
        "accuracy": float(correct[accepted].mean()) if count else None,
        "accepted": count,
    }


def _calibration_metrics(
    data: Collected, search: dict[str, Any], split: str, selection: dict[str, Any]
) -> dict[str, Any]:
    """Lever 4: T fitted on val; ECE (15 equal-width bins), NLL and reliability before and after on `split`; the
    auto-accept threshold chosen on val with and without calibration, applied here."""
    assert data.variants is not None
    before, after = data.variants["adjusted"], data.variants["deployed"]
    correct = before.top1 == data.product_label  # temperature never changes the top-1
    base = data.variants["base"]
    auto_accept = {
        "calibrated": _accepted(after.prob, correct, selection["threshold"]),
        "uncalibrated": _accepted(base.prob, base.top1 == data.product_label, selection["threshold_uncalibrated"]),
        "note": "each threshold chosen on val for the target accuracy; uncalibrated = no logit adjustment, no T",
    }
    return {
        "auto_accept": auto_accept,
        "temperature": search["temperature"],
        "fitted_on": SELECTION_SPLIT,
        "level": "product: the chosen aggregation's probabilities after the logit adjustment (not per image)",
        "fit": "T minimising the val NLL of softmax(product log-prob / T)",
        "fit_products": search["fit_products"],
        "val_nll_before": search["val_nll_before"],
        "val_nll_after": search["val_nll_after"],
        "split": split,
        "n": int(len(correct)),
        "bins": ECE_BINS,
        "ece_before": expected_calibration_error(before.prob, correct),
        "ece_after": expected_calibration_error(after.prob, correct),
        "nll_before": float(-before.true_logprob.mean()) if len(correct) else 0.0,
        "nll_after": float(-after.true_logprob.mean()) if len(correct) else 0.0,
        "reliability_before": reliability(before.prob, correct),
        "reliability_after": reliability(after.prob, correct),
        "threshold": "the auto-accept threshold is chosen on val's calibrated probabilities",
    }


def _twin_lever(predictor: Predictor, store: FeatureStore, config: EvalConfig) -> dict[str, Any]:
    """Twins chosen on val (RUN/eval/twins.json), their effect measured on the reported split."""
    from prodcat.predict.twins import TwinChoice, choose_twins, load_twin_choice, twin_predictions

    start = time.perf_counter()
    try:
        summary = choose_twins(predictor, SELECTION_SPLIT, store)
        choice = load_twin_choice(predictor.run_dir) or TwinChoice()
        predictor.twin_choice = choice
        arms = [TwinChoice()] + ([choice] if choice.name != TwinChoice().name else [])  # one entry per name
        results = twin_predictions(predictor, config.split, store, choices=arms)
    except (ValueError, FileNotFoundError) as error:
        return {"summary": {"note": f"twins not measured: {error}"}, "arms": None, "seconds": 0.0}
    arms = (
        levers.Arm(results.top1["none"], None),
        levers.Arm(results.top1[choice.name], None),
        results.label,
        results.evidence,
        choice.name,
        int(results.matched.sum()),
    )
    return {"summary": summary, "arms": arms, "seconds": time.perf_counter() - start}


def _not_measured(lever: str, detail: str) -> dict[str, Any]:
    return {"lever": lever, "detail": detail, "n": 0, "top1": None, "macro": None, "ece": None,
            "verdict": "not measured", "cost": {}, "seed_spread": "n/a"}  # fmt: skip


def _levers(run_dir: Path, data: Collected, search: dict[str, Any], twins: dict, config: EvalConfig) -> dict[str, Any]:
    """The levers table (see prodcat.evaluate.levers): each lever against this run's plain product predictions."""
    assert data.variants is not None
    label, variants, resamples = data.product_label, data.variants, config.bootstrap_resamples
    arm = {name: levers.Arm(v.top1, v.prob.astype(np.float64)) for name, v in variants.items()}
    per_product = {name: 1e6 * data.timing.get(name, 0.0) / max(len(label), 1) for name in variants}
    rows = [
        levers.lever_row(
            "logit adjustment",
            f"tau = {search['tau']:g} chosen on val for {config.objective} (grid {min(search['grid']):g}-"
            f"{max(search['grid']):g}, {len(search['grid'])} values)",
            arm["base"], arm["adjusted"], label, config.objective,
            {"time": f"choosing {search['tau_seconds']:.2f} s on val; applying {per_product['adjusted']:.1f} µs "
                     "per product", "memory": "one log prior per leaf (C floats)"},
            resamples,
        ),
        levers.lever_row(
            "temperature scaling",
            f"T = {search['temperature']:.3f} fitted on val NLL ({search['fit_products']:,} products), "
            "product level",
            arm["adjusted"], arm["deployed"], label, "ece",
            {"time": f"fitting {search['fit_seconds']:.2f} s on val; applying "
                     f"{max(per_product['deployed'] - per_product['adjusted'], 0.0):.1f} µs per product",
             "memory": f"one scalar (the fit holds {search['fit_memory_mb']:.1f} MB of val distributions)"},
            resamples,
        ),
    ]  # fmt: skip
    rows.append(_twin_row(twins, resamples))
    for other in config.compare_runs:
        try:
            rows.append(
                levers.run_comparison_row(run_dir, Path(other), data.product_id, label, arm["base"], config.split,
                                          resamples)
            )  # fmt: skip
        except (FileNotFoundError, ValueError) as error:
            rows.append(_not_measured(f"run {Path(other).name}", str(error)))
    if not config.compare_runs:
        rows.append(_not_measured("balanced softmax", "needs its own training run: train with `--loss "
                                  "balanced_softmax` (or `prodcat compare --losses softmax,balanced_softmax`), "
                                  "evaluate it, then pass it as `--compare-runs`"))  # fmt: skip
    return {
        "split": config.split,
        "n": int(len(label)),
        "baseline": "this run's product predictions (chosen aggregation), no logit adjustment, no temperature, "
        "no twins; the temperature row starts from the logit-adjusted predictions",
        "interval": f"95% paired bootstrap over products ({resamples:,} resamples), the same draw for both arms",
        "ece": f"{ECE_BINS} equal-width bins of the product top-1 probability",
        "seed_spread": "n/a (one training seed; `prodcat compare` gives the spread over three)",
        "rows": rows,
        "notes": [levers.LEVERS_NOTE],
    }


def _twin_row(twins: dict[str, Any], resamples: int) -> dict[str, Any]:
    if twins["arms"] is None:
        return _not_measured("training twins", twins["summary"]["note"])
    before, after, label, evidence, name, matched = twins["arms"]
    return levers.lever_row(
        "training twins", f"{name} chosen on val; {matched:,} products with a twin; evidence: {evidence}",
        before, after, label, "top1",
        {"time": f"choosing on val + measuring {twins['seconds']:.1f} s", "memory": "a hash index of the train "
         "pictures (16-byte hash + product id + label per picture)", "ece": "n/a: twins give labels here"},
        resamples,
    )  # fmt: skip


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The headline numbers as the CLI prints them: protocol, then each accuracy with its interval."""

    def number(block: dict[str, Any], key: str) -> str:
        lo, hi = block[f"{key}_ci95"]
        return f"{block[key]:.4f} [{lo:.4f}, {hi:.4f}]"

    image, product, confidence = metrics["image"], metrics["product"], metrics["confidence"]
    lines = [
        metrics["protocol"],
        f"product top-1 {number(product, 'top1')}  macro {number(product, 'macro')}  "
        f"(aggregation {product['aggregation']}, chosen on {product['chosen_on']})",
        f"image   top-1 {number(image, 'top1')}  macro {number(image, 'macro')}",
    ]
    if confidence["threshold"] is None:
        lines.append(f"auto-accept: {confidence['note']}")
    else:
        accuracy = "n/a (nothing accepted)"
        if confidence["accuracy"] is not None:
            lo, hi = confidence["accuracy_ci95"]
            accuracy = f"{confidence['accuracy']:.4f} [{lo:.4f}, {hi:.4f}] over {confidence['accepted']:,} products"
        lines.append(
            f"auto-accept at {confidence['threshold']:.4f} (chosen on {confidence['chosen_on']}): "
            f"coverage {confidence['coverage']:.3f}, accuracy {accuracy}"
        )
    adjustment, calibration = metrics.get("logit_adjustment"), metrics.get("calibration")
    if adjustment and calibration:
        lines.append(
            f"logit adjustment tau {adjustment['tau']:g} (objective {adjustment['objective']}, chosen on val); "
            f"temperature T {calibration['temperature']:.3f} (fitted on val); product ECE "
            f"{calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f} on {calibration['split']}"
        )
    lines.append(f"95% intervals over products; seed spread {metrics['seed_spread']}")
    return lines


# -- entry point ------------------------------------------------------------------------------------------------------
def _require_split(store: FeatureStore, workdir: str, split: str) -> None:
    """A one-line error, saying what to re-run, when the store has no rows of a split evaluation needs."""
    if len(store.split_indices(split, valid_only=False)) or split == "test":
        return  # "test" has no labels: _product_rows says so
    try:
        in_catalog = load_catalog(workdir, "train", split=split).num_rows > 0
    except FileNotFoundError:
        in_catalog = False
    if in_catalog:
        fix = f"the catalog has it: re-run `prodcat extract --workdir {workdir}` (its default splits include it)"
    else:
        fix = "W/catalog/train.parquet has none (an old catalog): re-run `prodcat ingest` then `prodcat extract`"
    fallback = " or pass --split val (selected and reported on val: optimistic)" if split == "holdout" else ""
    raise SplitError(f"{store.path}: no {split!r} rows in this feature store; {fix}{fallback}")


@dataclasses.dataclass
class _Prepared:
    """A run loaded, every choice made on val, and the compact pass over the reported split."""

    predictor: Predictor
    store: FeatureStore
    train_config: TrainConfig
    train_pictures: np.ndarray
    chosen: dict[str, Any]  # selection, search, variants, val (see _choose_on_val)
    data: Collected  # the reported split under the deployed calibration


def _choose_and_collect(config: EvalConfig) -> _Prepared:
    """Load `config.run`, make every choice on val, then one pass over `config.split` with them."""
    run_dir = Path(config.run)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor = Predictor.load(run_dir, device=device)
    run = predictor.run  # the run folder, read once (prodcat.predict.run)
    assert run is not None  # Predictor.load keeps it
    train_config = run.train_config
    store = FeatureStore.open(run.store_path)
    for split in dict.fromkeys((SELECTION_SPLIT, config.split)):
        _require_split(store, str(run.workdir), split)
    hierarchical = train_config.head == "hier" and hasattr(predictor.model, "level_log_probs")
    train_pictures = train_pictures_per_leaf(store, predictor.taxonomy.num_classes)
    chosen = _choose_on_val(predictor, store, config, log_prior(train_pictures), hierarchical)
    selection, variants = chosen["selection"], chosen["variants"]
    data = chosen["val"]
    if config.split != SELECTION_SPLIT:
        data = collect(
            predictor, store, config.split, config.batch_size, hierarchical, variants["deployed"], variants,
            selection["aggregation"],
        )  # fmt: skip
    return _Prepared(predictor, store, train_config, train_pictures, chosen, data)


def evaluate(config: EvalConfig) -> dict:
    """Choose on val, evaluate `config.run` on `config.split`; returns the metrics, also in RUN/eval/metrics.json."""
    run_dir = Path(config.run)
    run = _choose_and_collect(config)
    predictor, data, selection, search = run.predictor, run.data, run.chosen["selection"], run.chosen["search"]
    metrics, curve = compute_metrics(data, predictor.taxonomy, config, selection, run.train_pictures)
    metrics["logit_adjustment"] = _adjustment_metrics(data, search, config, run.train_pictures)
    metrics["calibration"] = _calibration_metrics(data, search, config.split, selection)
    predictor.aggregation = selection["aggregation"]  # the twins lever uses the aggregation chosen just now
    twins = _twin_lever(predictor, run.store, config)
    metrics["levers"] = _levers(run_dir, data, search, twins, config)
    out = run_dir / "eval"
    metrics = {
        "run": run_dir.name,
        "run_dir": str(run_dir),
        "head": run.train_config.head,
        "loss": run.train_config.loss,
        "store": run.train_config.store,
        "checkpoint_step": predictor.meta.get("step"),
        **metrics,
        "twins": twins["summary"],
        "notes": [levers.LEVERS_NOTE],
        "files": {
            "metrics": "metrics.json", "predictions": "predictions.parquet", "config": "config.json",
            "prior": PRIOR_FILE, "curves": CURVES_FILE,
        },
    }  # fmt: skip
    _write_predictions(out / "predictions.parquet", data, metrics["product"]["aggregation"], config.split)
    write_json(out / CURVES_FILE, {"split": config.split, "confidence": _thin_curve(curve)})
    save_config(config, out / "config.json")
    save_prior(out, run.train_pictures, "train-split pictures per leaf")
    write_json(out / "metrics.json", metrics)  # last: the report redraws figures older than this file
    log.info("evaluate %s: %s", run_dir.name, " | ".join(summary_lines(metrics)))
    return metrics


def _thin_curve(curve: dict[str, np.ndarray], points: int = CURVE_POINTS) -> dict[str, list[float]]:
    """The curve as lists, every k-th point (first and last kept) when it has more than `points`."""
    size = len(next(iter(curve.values()))) if curve else 0
    keep = np.unique(np.linspace(0, size - 1, points).round().astype(np.int64)) if size > points else slice(None)
    return {name: np.asarray(values)[keep].astype(float).tolist() for name, values in curve.items()}


@dataclasses.dataclass(frozen=True)
class ProductHits:
    """Product top-1 hits of one run on one split, every choice (checkpoint, aggregation, tau, T) made on val."""

    split: str
    product_id: np.ndarray  # (P,) sorted
    correct: np.ndarray  # (P,) bool
    aggregation: str
    checkpoint_step: int | None

    @property
    def top1(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else 0.0


def product_hits(run: str | Path, split: str = "holdout", aggregation: str = "auto") -> ProductHits:
    """Which products of `split` the run gets right, as `evaluate` would report them (the same choices on val, the
    same product top-1), without computing or writing the rest: what compare and sweep put side by side."""
    prepared = _choose_and_collect(EvalConfig(run=str(run), split=split, aggregation=aggregation))
    chosen = prepared.chosen["selection"]["aggregation"]
    return ProductHits(
        split=split,
        product_id=prepared.data.product_id,
        correct=_product_hits(prepared.data, chosen)[0],
        aggregation=chosen,
        checkpoint_step=prepared.predictor.meta.get("step"),
    )


def _choose_on_val(
    predictor: Predictor, store: FeatureStore, config: EvalConfig, prior_log: np.ndarray, hierarchical: bool
) -> dict[str, Any]:
    """Every choice, in order, on val only: aggregation; tau (for the objective) and T; the threshold on the
    calibrated probabilities. Returns them with val's calibrated pass (reused when val is also the reported split)."""
    raw_val = collect(predictor, store, SELECTION_SPLIT, config.batch_size)
    selection = {"checkpoint": _checkpoint_choice(predictor), **select(raw_val, config)}
    chosen = selection["aggregation"]
    search = search_val(predictor, store, chosen, prior_log, config)
    variants = {
        "base": ProductCalibration(),
        "adjusted": ProductCalibration(search["tau"], prior_log),
        "deployed": ProductCalibration(search["tau"], prior_log, search["temperature"]),
    }
    heads = hierarchical and config.split == SELECTION_SPLIT
    val = collect(predictor, store, SELECTION_SPLIT, config.batch_size, heads, variants["deployed"], variants, chosen)
    selection["threshold_uncalibrated"] = selection["threshold"]
    selection["threshold"] = _calibrated_threshold(val, chosen, config.target_accuracy)
    selection.update(tau=search["tau"], objective=config.objective, temperature=search["temperature"])
    return {"selection": selection, "search": search, "variants": variants, "val": val}


def _checkpoint_choice(predictor: Predictor) -> dict[str, Any]:
    best = predictor.meta.get("best") or {}
    return {
        "which": "best",
        "step": predictor.meta.get("step"),
        "chosen_by": f"best {best.get('metric', 'val_top1')} on {SELECTION_SPLIT} during training",
        "value": best.get("value"),
    }


def _write_predictions(path: Path, data: Collected, chosen: str, split: str) -> None:
    top, prob = data.product_top[chosen], data.product_top_prob[chosen]
    columns: dict[str, pa.Array] = {
        "product_id": pa.array(data.product_id.astype(np.int64)),
        "num_images": pa.array(data.num_images.astype(np.int8)),
        "label": pa.array(data.product_label.astype(np.int32)),
        "correct": pa.array(top[:, 0] == data.product_label),
    }
    for rank in range(GALLERY_TOP):
        present = rank < top.shape[1]
        columns[f"top{rank + 1}_label"] = pa.array(
            top[:, rank].astype(np.int32) if present else np.full(len(top), -1, np.int32)
        )
        columns[f"top{rank + 1}_prob"] = pa.array(
            prob[:, rank].astype(np.float32) if present else np.full(len(top), np.nan, np.float32)
        )
    if data.variants and "base" in data.variants:  # what a run-vs-run lever compares: no tau, no temperature
        columns["base_top1_label"] = pa.array(data.variants["base"].top1.astype(np.int32))
        columns["base_top1_prob"] = pa.array(data.variants["base"].prob.astype(np.float32))
    table = pa.table(columns).replace_schema_metadata(
        {b"prodcat.predict.aggregation": chosen.encode(), b"prodcat.split": split.encode()}
    )
    write_parquet(path, table)
