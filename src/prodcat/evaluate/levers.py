"""The levers table: what each accuracy / calibration lever changes on the reported split (the holdout).

One row per lever, each against the same baseline and changing one thing: the change in product top-1, in macro
accuracy (mean per-leaf recall) and in ECE (15 bins, product top-1 probability), with 95% intervals from a paired
bootstrap over products (both arms scored on the same resampled products), and what the lever costs in time and
memory. Every choice a lever needs (tau, T, the twin mode) was made on val; a row whose interval holds 0 is
reported as "no clear change", one that goes the wrong way as "hurts": nothing is dropped.

Rows within one run (temperature scaling, logit adjustment, twins) compare predictions of the same weights; a row
between runs (balanced softmax) compares this run with another trained one change apart (`compare_runs`), read
from the other run's RUN/eval/predictions.parquet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from prodcat.predict.calibration import ECE_BINS

__all__ = ["Arm", "paired_bootstrap", "lever_row", "run_comparison_row", "config_changes", "LEVERS_NOTE"]

LEVERS_NOTE = (
    "Top-1 on a test set drawn like the train split (Kaggle's test set is) can drop while macro accuracy rises: "
    "a long-tail correction moves predictions from frequent leaves to rare ones. Pick the objective that matches "
    "the use (`prodcat evaluate --objective top1 | macro`); tau is chosen on val for it."
)
# Fields that do not change what a run learns: a run-vs-run row may differ in these and still change one thing.
_NOT_A_CHANGE = {"run_name", "overwrite", "resume", "eval_every", "stop_after", "max_seconds", "device", "distributed"}


@dataclasses.dataclass
class Arm:
    """One arm's predictions on the reported products (all arms aligned on the same product order)."""

    pred: np.ndarray  # (P,) top-1 label
    confidence: np.ndarray | None  # (P,) top-1 probability; None when the arm gives labels only (twins)


def _group_sums(weights: np.ndarray, values: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """(R, G) sums of weights * values per group, for R weight rows at once (one reduceat, no Python loop)."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    out = np.zeros((weights.shape[0], num_groups))
    if not len(groups):
        return out
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    out[:, sorted_groups[starts]] = np.add.reduceat(weights[:, order] * values[order], starts, axis=1)
    return out


def _statistics(arm: Arm, label: np.ndarray) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Each statistic of one arm for R resamples at once: weights (R, P) of draw counts -> (R,)."""
    correct = (arm.pred == label).astype(np.float64)
    num_classes = int(label.max()) + 1 if len(label) else 1
    ones = np.ones(len(label))

    def macro(weights: np.ndarray) -> np.ndarray:
        hits, totals = _group_sums(weights, correct, label, num_classes), _group_sums(weights, ones, label, num_classes)
        present = totals > 0
        recall = np.divide(hits, totals, out=np.zeros_like(hits), where=present)
        return recall.sum(axis=1) / np.maximum(present.sum(axis=1), 1)

    result: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "top1": lambda w: (w @ correct) / np.maximum(w.sum(axis=1), 1),
        "macro": macro,
    }
    if arm.confidence is not None:
        confidence = np.asarray(arm.confidence, np.float64)
        bins = np.clip(np.ceil(confidence * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)  # as calibration's ECE

        def ece(weights: np.ndarray) -> np.ndarray:
            gap = _group_sums(weights, correct, bins, ECE_BINS) - _group_sums(weights, confidence, bins, ECE_BINS)
            return np.abs(gap).sum(axis=1) / np.maximum(weights.sum(axis=1), 1)

        result["ece"] = ece
    return result


def _draws(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """(count, size) bootstrap draw counts of `size` products."""
    return np.stack([np.bincount(rng.integers(0, size, size), minlength=size) for _ in range(count)]).astype(float)


def paired_bootstrap(
    before: Arm, after: Arm, label: np.ndarray, resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Each statistic (top1, macro, ece) before and after, their change, and the change's 95% percentile interval
    over `resamples` resamplings of products, the same draw for both arms (paired)."""
    label = np.asarray(label, np.int64)
    first, second = _statistics(before, label), _statistics(after, label)
    names = [name for name in first if name in second]
    ones = np.ones((1, len(label)))
    result = {}
    for name in names:
        low, high = float(first[name](ones)[0]), float(second[name](ones)[0])
        result[name] = {"before": low, "after": high, "change": high - low, "change_ci95": None}
    if len(label) == 0 or resamples == 0:
        return result
    rng = np.random.default_rng(seed)
    changes: dict[str, list[np.ndarray]] = {name: [] for name in names}
    block = max(1, min(resamples, 4_000_000 // len(label)))  # (block, P) weights: about 32 MB at most
    for start in range(0, resamples, block):
        weights = _draws(rng, min(block, resamples - start), len(label))
        for name in names:
            changes[name].append(second[name](weights) - first[name](weights))
    for name in names:
        result[name]["change_ci95"] = [float(v) for v in np.quantile(np.concatenate(changes[name]), [0.025, 0.975])]
    return result


def _direction(entry: dict[str, Any] | None, name: str) -> int | None:
    """+1 better, -1 worse, 0 interval holds 0 (higher top1 / macro, lower ece are better); None: not measured."""
    if entry is None:
        return None
    interval = entry["change_ci95"]
    if interval is None:
        return 0 if entry["change"] == 0 else None
    sign = -1.0 if name == "ece" else 1.0
    low, high = sorted((sign * interval[0], sign * interval[1]))
    return 1 if low > 0 else -1 if high < 0 else 0


def _verdict(stats: dict[str, dict[str, Any]], goal: str) -> str:
    """'helps' / 'hurts' / 'no clear change' on the lever's own goal, then any other number it clearly moves."""
    direction = _direction(stats.get(goal), goal)
    if direction is None:
        return "n/a"
    text = {1: f"helps ({goal})", -1: f"hurts ({goal})", 0: f"no clear change ({goal}: 95% interval holds 0)"}
    verdict = text[direction]
    for name in ("top1", "macro", "ece"):
        other = _direction(stats.get(name), name) if name != goal else None
        if other:
            verdict += f"; {'improves' if other > 0 else 'worsens'} {name}"
    return verdict


def lever_row(
    lever: str,
    detail: str,
    before: Arm,
    after: Arm,
    label: np.ndarray,
    goal: str,
    cost: dict[str, str],
    resamples: int = 1000,
    **extra: Any,
) -> dict[str, Any]:
    """One row of the table: the changes with paired intervals, the verdict on `goal`, the cost."""
    stats = paired_bootstrap(before, after, label, resamples)
    row: dict[str, Any] = {"lever": lever, "detail": detail, "n": int(len(label)), "goal": goal}
    for name in ("top1", "macro", "ece"):
        entry = stats.get(name)
        row[name] = entry  # None: this lever gives labels only (no probabilities, no ECE)
    row["verdict"] = _verdict(stats, goal)
    row["cost"] = cost
    row["seed_spread"] = "n/a (one seed)"
    return {**row, **extra}


def config_changes(this: dict[str, Any], other: dict[str, Any]) -> dict[str, list[Any]]:
    """Training-config fields that differ between two runs (run bookkeeping left out): field -> [this, other]."""
    keys = sorted((set(this) | set(other)) - _NOT_A_CHANGE)
    return {key: [this.get(key), other.get(key)] for key in keys if this.get(key) != other.get(key)}


def _read_base_predictions(run_dir: Path, split: str) -> Any:
    path = run_dir / "eval" / "predictions.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not evaluated yet; run `prodcat evaluate --run {run_dir}` first")
    table = pq.read_table(path)
    saved = (table.schema.metadata or {}).get(b"prodcat.split", b"").decode()
    if saved != split or "base_top1_label" not in table.column_names:
        raise ValueError(f"{path}: evaluated on {saved or '?'} by an older evaluate; re-run `prodcat evaluate "
                         f"--run {run_dir} --split {split}`")  # fmt: skip
    return table


def run_comparison_row(
    this_dir: Path,
    other_dir: Path,
    product_id: np.ndarray,
    label: np.ndarray,
    before: Arm,
    split: str,
    resamples: int = 1000,
) -> dict[str, Any]:
    """This run (before: its uncorrected, uncalibrated predictions) -> another run one change apart, on the same
    products; cost from both runs' summary.json (training time, peak memory)."""
    from prodcat.utils import read_json

    table = _read_base_predictions(other_dir, split)
    other_id = table["product_id"].to_numpy()
    order = np.argsort(other_id)
    position = np.searchsorted(other_id[order], product_id)
    position = np.clip(position, 0, len(other_id) - 1)
    if len(other_id) != len(product_id) or not np.array_equal(other_id[order][position], product_id):
        raise ValueError(f"{other_dir}: its {split} products differ from this run's; compare runs of one workdir")
    pick = order[position]
    after = Arm(table["base_top1_label"].to_numpy()[pick], table["base_top1_prob"].to_numpy()[pick].astype(np.float64))
    this_config = read_json(this_dir / "config.json") if (this_dir / "config.json").is_file() else {}
    other_config = read_json(other_dir / "config.json") if (other_dir / "config.json").is_file() else {}
    changes = config_changes(this_config, other_config)
    lever = ", ".join(f"{key}: {a} -> {b}" for key, (a, b) in changes.items()) or "same config"
    cost = _training_cost(this_dir, other_dir)
    note = None if len(changes) == 1 else f"changes {len(changes)} things, not one: read with care"
    return lever_row(
        lever, f"run {this_dir.name} -> run {other_dir.name} (separate training runs, one seed each)", before, after,
        label, "macro" if "balanced" in lever else "top1", cost, resamples, other_run=str(other_dir), note=note,
    )  # fmt: skip


def _training_cost(this_dir: Path, other_dir: Path) -> dict[str, str]:
    from prodcat.utils import read_json

    def summary(run: Path) -> dict[str, Any]:
        return read_json(run / "summary.json") if (run / "summary.json").is_file() else {}

    a, b = summary(this_dir), summary(other_dir)
    time = memory = "n/a (no summary.json)"
    if a.get("train_seconds") and b.get("train_seconds"):
        ratio = b["train_seconds"] / a["train_seconds"]
        time = f"training {b['train_seconds']:.1f} s vs {a['train_seconds']:.1f} s ({ratio:.2f}x)"
    if a.get("peak_rss_mb") and b.get("peak_rss_mb"):
        memory = f"training peak RSS {b['peak_rss_mb']:.0f} MB vs {a['peak_rss_mb']:.0f} MB"
    return {"time": time, "memory": memory, "inference": "same cost (plain logits)"}
