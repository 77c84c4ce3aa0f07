"""`prodcat evaluate`: image, product and taxonomy-level metrics of a run on a split of its feature store.

Outputs in `RUN/eval/`:
  metrics.json        every number (the Predictor reads `product.aggregation` and `confidence.threshold` from it)
  predictions.parquet one row per product: product_id, num_images, true label, top-3 labels and probabilities
  confidence.png, accuracy_by_num_images.png, taxonomy.png, config.json

The split is read in chunks of whole products, and only compact results (top-k labels, the true class's
log-probability) are kept, so no (images x categories) array of the full split is ever held: the real validation
split (about 600k images x 5,270 categories) fits in a few hundred MB.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from prodcat.config import EvalConfig, TrainConfig, config_from_dict, load_config, save_config
from prodcat.data.taxonomy import Taxonomy
from prodcat.features.store import FeatureStore
from prodcat.paths import WorkPaths
from prodcat.predict import AGGREGATIONS, Predictor, aggregate_products
from prodcat.utils import get_logger, progress, write_json, write_parquet

__all__ = [
    "evaluate",
    "Collected",
    "collect",
    "top_k",
    "accuracy_block",
    "taxonomy_block",
    "frequency_groups",
    "confusions",
    "confidence_curve",
    "choose_threshold",
    "FIGURES",
    "TOP_K",
    "GALLERY_TOP",
]

TOP_K = 5  # top-k kept per image and product (top-5 accuracy)
GALLERY_TOP = 3  # predictions.parquet keeps the top 3
FREQUENCY_GROUPS = ("head", "torso", "tail")
COVERAGE_POINTS = (0.5, 0.8, 0.9, 1.0)
FIGURES = {
    "confidence": "confidence.png",
    "by_num_images": "accuracy_by_num_images.png",
    "taxonomy": "taxonomy.png",
}
log = get_logger("prodcat.evaluate")


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


def frequency_groups(taxonomy: Taxonomy) -> np.ndarray:
    """Per leaf: 0 head, 1 torso, 2 tail (terciles of the leaves with training products, by train count); -1 unseen.

    Leaves are ranked by decreasing train count (ties by label), then cut into three groups of equal numbers of
    leaves, so the head holds a third of the categories and most of the products.
    """
    counts = np.asarray(taxonomy.train_counts)
    present = np.flatnonzero(counts > 0)
    ranked = present[np.lexsort((present, -counts[present]))]
    group = np.full(taxonomy.num_classes, -1, dtype=np.int64)
    for index, part in enumerate(np.array_split(ranked, 3)):
        group[part] = index
    return group


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
    rows = store.split_indices(split)
    if not len(rows):
        raise ValueError(f"{store.path}: no valid {split!r} images in this feature store")
    product_id = store.column("product_id")[rows]
    order = np.lexsort((store.column("image_index")[rows], product_id))
    rows, product_id = rows[order], product_id[order]
    starts = np.flatnonzero(np.r_[True, product_id[1:] != product_id[:-1]])
    labels = store.column("label")[rows].astype(np.int64)
    if (labels < 0).any():
        raise ValueError(f"{store.path}: split {split!r} has unlabelled rows (label -1); evaluate needs labels")
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
    predictor: Predictor, store: FeatureStore, split: str, batch_size: int = 4096, heads: bool = False
) -> Collected:
    """One pass over `split`: image log-probs through the Predictor, products combined by every aggregation."""
    rows, product_id, starts, product_label = _product_rows(store, split)
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
        for method in AGGREGATIONS:
            aggregated = aggregate_products(log_probs, product_index, last - first, method)
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
    return Collected(
        image_label=np.repeat(product_label, counts),
        image_top=joined["image_top"],
        image_true_logprob=joined["image_true"],
        product_id=product_id,
        product_label=product_label,
        num_images=counts,
        product_top={m: joined[f"{m}_top"] for m in AGGREGATIONS},
        product_top_prob={m: joined[f"{m}_prob"] for m in AGGREGATIONS},
        product_true_logprob={m: joined[f"{m}_true"] for m in AGGREGATIONS},
        heads=head_parts or None,
    )


# -- metrics from the collected results ------------------------------------------------------------------------------
def _product_metrics(data: Collected, choice: str) -> dict[str, Any]:
    methods = {}
    for method in AGGREGATIONS:
        # vote's scores are vote shares with a tiny tie-break, not a probability model: its NLL means nothing.
        true_logprob = None if method == "vote" else data.product_true_logprob[method]
        methods[method] = accuracy_block(data.product_top[method], data.product_label, true_logprob)
    if choice == "auto":
        # Best top-1 on this split; top-5 breaks ties, then the order of AGGREGATIONS (mean_prob first).
        chosen = max(AGGREGATIONS, key=lambda m: (methods[m]["top1"], methods[m]["top5"], -AGGREGATIONS.index(m)))
        chosen_by = "auto: best product top-1 on this split"
    else:
        chosen, chosen_by = choice, "config"
    by_num_images = {}
    for method in AGGREGATIONS:
        correct = data.product_top[method][:, 0] == data.product_label
        by_num_images[method] = {
            str(k): {"products": int((data.num_images == k).sum()), "top1": float(correct[data.num_images == k].mean())}
            for k in np.unique(data.num_images).tolist()
        }
    return {
        "aggregation": chosen,
        "chosen_by": chosen_by,
        **{k: methods[chosen][k] for k in ("top1", "top5", "loss")},
        "count": int(len(data.product_label)),
        "methods": methods,
        "by_num_images": by_num_images,
        "notes": {"vote": "loss is None: vote scores are vote shares, not probabilities"},
    }


def _frequency_metrics(data: Collected, chosen: str, taxonomy: Taxonomy) -> dict[str, Any]:
    group = frequency_groups(taxonomy)
    counts = np.asarray(taxonomy.train_counts)
    product_correct = data.product_top[chosen][:, 0] == data.product_label
    image_correct = data.image_top[:, 0] == data.image_label
    result = {}
    names = dict(enumerate(FREQUENCY_GROUPS)) | {-1: "unseen"}
    for index, name in names.items():
        leaves = np.flatnonzero(group == index)
        products = group[data.product_label] == index
        if index == -1 and not products.any():
            continue
        images = group[data.image_label] == index
        result[name] = {
            "categories": int(len(leaves)),
            "train_count_min": int(counts[leaves].min()) if len(leaves) else 0,
            "train_count_max": int(counts[leaves].max()) if len(leaves) else 0,
            "products": int(products.sum()),
            "product_top1": float(product_correct[products].mean()) if products.any() else None,
            "images": int(images.sum()),
            "image_top1": float(image_correct[images].mean()) if images.any() else None,
        }
    return result


def _confidence_metrics(data: Collected, chosen: str, target: float) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    score = data.product_top_prob[chosen][:, 0]
    correct = data.product_top[chosen][:, 0] == data.product_label
    curve = confidence_curve(score, correct)
    picked = choose_threshold(curve, target)
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
        **picked,
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


def compute_metrics(data: Collected, taxonomy: Taxonomy, config: EvalConfig) -> tuple[dict[str, Any], dict]:
    """Every metric of the evaluation from the collected results; also returns the confidence curve."""
    product = _product_metrics(data, config.aggregation)
    chosen = product["aggregation"]
    image_pred, product_pred = data.image_top[:, 0], data.product_top[chosen][:, 0]
    confidence, curve = _confidence_metrics(data, chosen, config.target_accuracy)
    metrics = {
        "split": config.split,
        "images": int(len(data.image_label)),
        "products": int(len(data.product_label)),
        "image": accuracy_block(data.image_top, data.image_label, data.image_true_logprob),
        "product": product,
        "taxonomy": {
            "image": taxonomy_block(image_pred, data.image_label, taxonomy),
            "product": taxonomy_block(product_pred, data.product_label, taxonomy),
            "frequency": _frequency_metrics(data, chosen, taxonomy),
            "confusions": confusions(product_pred, data.product_label, taxonomy),
        },
        "confidence": confidence,
    }
    if data.heads:
        metrics["hier"] = _head_metrics(data, chosen, taxonomy)
    return metrics, curve


# -- entry point ------------------------------------------------------------------------------------------------------
def _train_config(predictor: Predictor) -> TrainConfig:
    if "config" in predictor.meta:
        return config_from_dict(TrainConfig, predictor.meta["config"])
    return load_config(TrainConfig, predictor.run_dir / "config.json")


def evaluate(config: EvalConfig) -> dict:
    """Evaluate `config.run` on `config.split`; returns the metrics, also written to RUN/eval/metrics.json."""
    run_dir = Path(config.run)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor = Predictor.load(run_dir, device=device)
    train_config = _train_config(predictor)
    store = FeatureStore.open(WorkPaths(train_config.workdir).feature_store(train_config.features))
    hierarchical = train_config.head == "hier" and hasattr(predictor.model, "level_log_probs")
    data = collect(predictor, store, config.split, config.batch_size, heads=hierarchical)
    metrics, curve = compute_metrics(data, predictor.taxonomy, config)
    out = run_dir / "eval"
    metrics = {
        "run": run_dir.name,
        "run_dir": str(run_dir),
        "head": train_config.head,
        "loss": train_config.loss,
        "features": train_config.features,
        "checkpoint_step": predictor.meta.get("step"),
        **metrics,
        "files": {"metrics": "metrics.json", "predictions": "predictions.parquet", "config": "config.json", **FIGURES},
    }
    _write_predictions(out / "predictions.parquet", data, metrics["product"]["aggregation"], config.split)
    _draw_figures(out, metrics, curve)
    save_config(config, out / "config.json")
    write_json(out / "metrics.json", metrics)
    log.info(
        "evaluate %s on %s: image top-1 %.4f, product top-1 %.4f (%s), threshold %s at coverage %.3f",
        run_dir.name,
        config.split,
        metrics["image"]["top1"],
        metrics["product"]["top1"],
        metrics["product"]["aggregation"],
        metrics["confidence"]["threshold"],
        metrics["confidence"]["coverage"],
    )
    return metrics


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
    table = pa.table(columns).replace_schema_metadata(
        {b"prodcat.aggregation": chosen.encode(), b"prodcat.split": split.encode()}
    )
    write_parquet(path, table)


# -- figures -----------------------------------------------------------------------------------------------------------
def _draw_figures(out: Path, metrics: dict[str, Any], curve: dict[str, np.ndarray]) -> None:
    _plot_confidence(out / FIGURES["confidence"], metrics["confidence"], curve)
    _plot_by_num_images(out / FIGURES["by_num_images"], metrics["product"])
    _plot_taxonomy(out / FIGURES["taxonomy"], metrics["taxonomy"])


def _plot_confidence(path: Path, confidence: dict[str, Any], curve: dict[str, np.ndarray]) -> None:
    from prodcat.report import figures

    target = confidence["target_accuracy"]
    with figures.png_figure(path, 1, 2, figsize=(10.5, 4.0)) as (figure, axes):
        left, right = axes
        left.plot(curve["coverage"], curve["accuracy"], color=figures.PALETTE[0], linewidth=1.6)
        left.axhline(target, color=figures.PALETTE[3], linestyle="--", linewidth=1, label=f"target {target:.0%}")
        if confidence["threshold"] is not None:
            left.plot(
                [confidence["coverage"]],
                [confidence["accuracy"]],
                "o",
                color=figures.PALETTE[3],
                label=f"threshold {confidence['threshold']:.3f}: {confidence['coverage']:.1%} auto-accepted",
            )
        left.set_xlim(0, 1.0)
        left.set_ylim(0, 1.02)
        left.set_xlabel("coverage (share of products auto-accepted)")
        left.set_ylabel("accuracy of the auto-accepted products")
        left.set_title("Coverage vs accuracy")
        left.legend(loc="lower left")
        right.plot(curve["threshold"], curve["accuracy"], color=figures.PALETTE[0], label="accuracy of accepted")
        right.plot(curve["threshold"], curve["coverage"], color=figures.PALETTE[1], label="coverage")
        if confidence["threshold"] is not None:
            right.axvline(confidence["threshold"], color=figures.PALETTE[3], linestyle="--", linewidth=1)
        right.set_xlim(0, 1.0)
        right.set_xlabel("threshold on the top product probability")
        right.set_title("Accept when top probability >= threshold")
        right.legend(loc="lower left")
        if confidence["threshold"] is None:
            figure.suptitle(f"No threshold reaches {target:.0%} accuracy")


def _plot_by_num_images(path: Path, product: dict[str, Any]) -> None:
    from prodcat.report import figures

    by_count = product["by_num_images"]
    ks = sorted({int(k) for method in by_count.values() for k in method})
    width = 0.8 / len(AGGREGATIONS)
    with figures.png_figure(path, figsize=(7.2, 4.0)) as (figure, axes):
        for index, method in enumerate(AGGREGATIONS):
            heights = [by_count[method][str(k)]["top1"] for k in ks]
            positions = np.arange(len(ks)) + (index - (len(AGGREGATIONS) - 1) / 2) * width
            label = method + (" (chosen)" if method == product["aggregation"] else "")
            bars = axes.bar(positions, heights, width=width * 0.95, label=label, color=figures.PALETTE[index])
            figures.label_bars(axes, bars, [f"{h:.2f}" for h in heights], fontsize=7)
        first = by_count[AGGREGATIONS[0]]
        axes.set_xticks(
            np.arange(len(ks)), [f"{k} image{'s' if k > 1 else ''}\n{first[str(k)]['products']:,} products" for k in ks]
        )
        axes.set_ylim(0, 1.12)
        axes.set_ylabel("product top-1 accuracy")
        axes.set_title("Product accuracy by number of images")
        axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=3)  # below: bars reach the top


def _plot_taxonomy(path: Path, taxonomy: dict[str, Any]) -> None:
    from prodcat.report import figures

    with figures.png_figure(path, 1, 3, figsize=(13.0, 4.0)) as (figure, axes):
        levels = ("level1", "level2", "leaf")
        for index, unit in enumerate(("image", "product")):
            heights = [taxonomy[unit][level] for level in levels]
            bars = axes[0].bar(
                np.arange(3) + (index - 0.5) * 0.38, heights, width=0.36, label=unit, color=figures.PALETTE[index]
            )
            figures.label_bars(axes[0], bars, [f"{h:.2f}" for h in heights], fontsize=7)
        axes[0].set_xticks(np.arange(3), ["level 1", "level 2", "leaf"])
        axes[0].set_ylim(0, 1.12)
        axes[0].set_title("Accuracy of the predicted leaf per level")
        axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=2)
        frequency = taxonomy["frequency"]
        names = [name for name in (*FREQUENCY_GROUPS, "unseen") if name in frequency]
        heights = [frequency[name]["product_top1"] or 0.0 for name in names]
        bars = axes[1].bar(np.arange(len(names)), heights, color=figures.PALETTE[2], width=0.6)
        figures.label_bars(axes[1], bars, [f"{h:.2f}" for h in heights], fontsize=7)
        axes[1].set_xticks(
            np.arange(len(names)),
            [f"{name}\n{frequency[name]['categories']} cat., {frequency[name]['products']:,} prod." for name in names],
        )
        axes[1].set_ylim(0, 1.12)
        axes[1].set_title("Product top-1 by category frequency")
        _plot_severity(axes[2], taxonomy, figures)


def _plot_severity(axes: Any, taxonomy: dict[str, Any], figures: Any) -> None:
    units = ("image", "product")
    parts = (
        ("same_level2", "right level 2", 2),
        ("level1_only", "right level 1 only", 1),
        ("other_level1", "wrong level 1", 3),
    )
    bottom = np.zeros(len(units))
    for key, label, colour in parts:
        values = []
        for unit in units:
            severity = taxonomy[unit]["severity"]
            if severity["errors"] == 0:
                values.append(0.0)
            elif key == "level1_only":
                values.append(severity["same_level1"] - severity["same_level2"])
            else:
                values.append(severity[key])
        axes.bar(np.arange(len(units)), values, bottom=bottom, width=0.55, label=label, color=figures.PALETTE[colour])
        bottom += np.asarray(values)
    axes.set_xticks(
        np.arange(len(units)), [f"{unit} errors\n({taxonomy[unit]['severity']['errors']:,})" for unit in units]
    )
    axes.set_ylim(0, 1.0)
    axes.set_ylabel("share of leaf errors")
    axes.set_title("Where the wrong predictions land")
    # Below the plot: inside, it would hide the patch of the colour it sits on.
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=3, fontsize=7.5)
