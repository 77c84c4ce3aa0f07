"""Conclusions in words, generated from the numbers of `compare.json` / `sweep.json` (never written by hand).

Every sentence holds one thing fixed and names it (the optimizer of a loss comparison, the loss of an optimizer
comparison), uses the headline number (product top-1 on the holdout, n products, everything chosen on val; files
from before holdout evaluation: val image top-1 after the last step, and says so), and says whether a difference
is larger than the spread over training seeds and whether its paired 95% interval over products holds 0. Time
claims cite the output-layer ratios `make bench` measured (a packaged copy of benchmarks/results,
`softmax_bench.json`), because at the demo's few classes the output layer is too small a part of a step for
sampled softmax to save anything.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from prodcat.report.markup import esc, interval, pct, points, table

__all__ = [
    "compare_arms",
    "compare_conclusions",
    "loss_optimizer_table",
    "sweep_conclusions",
    "bench_results",
    "headline_key",
    "headline_name",
]

BENCH_FILE = Path(__file__).with_name("softmax_bench.json")
FEW_CLASSES = 2000  # below this the output layer is a small part of a step: sampled softmax has nothing to save
SAME = 0.0005  # differences under 0.05 points read as "the same"


@functools.cache
def bench_results() -> list[dict[str, Any]]:
    """The measured full vs sampled output-layer step ratios (5,270 and 500,000 classes); [] if the copy is absent."""
    try:
        return list(json.loads(BENCH_FILE.read_text(encoding="utf-8"))["results"])
    except (OSError, ValueError, KeyError):
        return []


def _loss_name(loss: str, num_sampled: Any) -> str:
    names = {"softmax": "full softmax", "adaptive": "adaptive softmax"}
    if loss == "sampled":
        return f"sampled softmax with {num_sampled} negatives" if num_sampled else "sampled softmax"
    return names.get(loss, loss)


def _blocks(data: dict[str, Any]) -> list[dict[str, Any]]:
    blocks = list(data.get("losses", {}).values()) + list(data.get("points", []))
    return blocks + ([data["reference"]] if isinstance(data.get("reference"), dict) else [])


def headline_key(data: dict[str, Any]) -> str:
    """`holdout_top1` (product top-1 on the holdout) when every arm has it, else `val_top1` (older files)."""
    blocks = _blocks(data)
    return "holdout_top1" if blocks and all(b.get("holdout_top1_mean") is not None for b in blocks) else "val_top1"


def headline_name(data: dict[str, Any]) -> str:
    """What the headline number is, with its n: 'holdout product top-1 (n = 353 products)'."""
    if headline_key(data) == "val_top1":
        return "val image top-1 after the last step"
    first = _blocks(data)[0]
    return f"{first.get('holdout_split', 'holdout')} product top-1 (n = {first.get('holdout_products', 0):,} products)"


def compare_arms(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each arm with its `loss` and `optimizer` (files from before the optimizer factor: key = loss)."""
    default = (data.get("settings", {}).get("optimizers") or [data.get("settings", {}).get("optimizer", "?")])[0]
    arms = []
    for key, block in data.get("losses", {}).items():
        loss, _, optimizer = str(key).partition(", ")
        named = {"loss": block.get("loss", loss), "optimizer": block.get("optimizer", optimizer or default)}
        arms.append({**block, **named})
    return arms


def _paired(data: dict[str, Any], label_a: str, label_b: str) -> dict[str, Any] | None:
    """compare.json's paired difference A - B ('A vs B', or 'B vs A' turned round); None when not recorded."""
    differences = data.get("differences") or {}
    if f"{label_a} vs {label_b}" in differences:
        return differences[f"{label_a} vs {label_b}"]
    other = differences.get(f"{label_b} vs {label_a}")
    if other is None:
        return None
    low, high = other["ci95"]
    return {**other, "a": label_a, "b": label_b, "change": -other["change"], "ci95": [-high, -low]}


def _spread_clause(a: dict[str, Any], b: dict[str, Any], difference: float, key: str) -> str:
    """Is `difference` larger than the seed spread of either arm? One seed: no spread to judge it by."""
    std_a, std_b = a.get(f"{key}_std"), b.get(f"{key}_std")
    if std_a is None or std_b is None or min(int(a.get("seeds", 1)), int(b.get("seeds", 1))) < 2:
        return "one seed, so no seed spread to judge it by"
    inside = abs(difference) <= max(std_a, std_b)
    return (
        f"{'within' if inside else 'larger than'} the seed spread "
        f"(std {100 * std_a:.1f} and {100 * std_b:.1f} points over {min(a['seeds'], b['seeds'])} seeds)"
    )


def _interval_clause(paired: dict[str, Any] | None, a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    """The paired 95% interval of the difference over products, and whether it holds 0; else whether the two arms'
    own intervals overlap; nothing for files without intervals (it may then be noise)."""
    if paired is not None:
        low, high = paired["ci95"]
        verdict = "holds 0: no clear difference" if low <= 0 <= high else "excludes 0"
        return (
            f"; paired 95% interval over the {paired['n']:,} {paired.get('split', 'holdout')} products "
            f"[{100 * low:+.1f}, {100 * high:+.1f}] points, {verdict}"
        )
    ci_a, ci_b = a.get(f"{key}_ci95"), b.get(f"{key}_ci95")
    if ci_a and ci_b:
        overlap = ci_a[0] <= ci_b[1] and ci_b[0] <= ci_a[1]
        return f"; their 95% intervals over products {'overlap' if overlap else 'do not overlap'}"
    return " (no interval over products recorded: it may be noise)"


def _versus(
    a: dict[str, Any],
    b: dict[str, Any],
    names: tuple[str, str],
    held: str,
    data: dict[str, Any],
    labels: tuple[str, str],
) -> str:
    key = headline_key(data)
    difference = a[f"{key}_mean"] - b[f"{key}_mean"]
    name_a, name_b = names
    if abs(difference) < SAME:
        verdict = f"matches {name_b}"
    else:
        verdict = f"is {points(difference)} {'above' if difference > 0 else 'below'} {name_b}"
    seeds = min(int(a.get("seeds", 1)), int(b.get("seeds", 1)))
    return (
        f"{name_a[0].upper()}{name_a[1:]} {verdict} at equal {held}: {pct(a[f'{key}_mean'])} vs "
        f"{pct(b[f'{key}_mean'])} {headline_name(data)}, mean of {seeds} seed{'s' if seeds > 1 else ''}; "
        f"{_spread_clause(a, b, difference, key)}{_interval_clause(_paired(data, *labels), a, b, key)}."
    )


def compare_conclusions(data: dict[str, Any], num_classes: int | None) -> list[str]:
    """Plain-text sentences: each loss against full softmax at one optimizer, each optimizer at one loss, time."""
    arms = compare_arms(data)
    num_sampled = data.get("settings", {}).get("num_sampled")
    by_cell = {(arm["loss"], arm["optimizer"]): arm for arm in arms}
    sentences = []
    for (loss, optimizer), arm in by_cell.items():
        reference = by_cell.get(("softmax", optimizer))
        if loss != "softmax" and reference is not None:
            names = (_loss_name(loss, num_sampled), "full softmax")
            labels = (f"{loss}, {optimizer}", f"softmax, {optimizer}")
            sentences.append(_versus(arm, reference, names, f"optimizer ({optimizer})", data, labels))
    optimizers = list(dict.fromkeys(arm["optimizer"] for arm in arms))
    for loss in dict.fromkeys(arm["loss"] for arm in arms):
        base = by_cell.get((loss, optimizers[0]))
        for other in optimizers[1:]:
            if base is not None and (loss, other) in by_cell:
                held = f"loss ({_loss_name(loss, num_sampled)})"
                names, labels = (f"optimizer {other}", optimizers[0]), (f"{loss}, {other}", f"{loss}, {optimizers[0]}")
                sentences.append(_versus(by_cell[(loss, other)], base, names, held, data, labels))
    return sentences + _time_sentences(by_cell, num_classes)


def _time_sentences(by_cell: dict[tuple[str, str], dict[str, Any]], num_classes: int | None) -> list[str]:
    sentences = []
    sampled = next((arm for (loss, _), arm in by_cell.items() if loss == "sampled"), None)
    full = None if sampled is None else by_cell.get(("softmax", sampled["optimizer"]))
    if sampled and full and sampled.get("step_seconds_mean") and full.get("step_seconds_mean"):
        classes = f"{num_classes:,} classes" if num_classes else "this class count"
        if num_classes is not None and num_classes < FEW_CLASSES:
            lead = (
                f"At {classes} the output layer is a small part of a training step, so sampled softmax cannot "
                "save time here"
            )
        else:
            lead = f"Step time at {classes}"
        sentences.append(
            f"{lead}: {1000 * sampled['step_seconds_mean']:.2f} ms per step sampled vs "
            f"{1000 * full['step_seconds_mean']:.2f} ms full ({sampled['optimizer']})."
        )
    bench = bench_results()
    if bench:
        ratios = " and ".join(f"{r['speedup']:.1f}x faster at {r['num_classes']:,} classes" for r in bench)
        first = bench[0]
        sentences.append(
            f"Where it does pay, measured by `make bench` (the output layer alone: dim {first['dim']}, batch "
            f"{first['batch']}, {first['num_sampled']} negatives, {first['cpus']}-core {first['device'].upper()}, "
            f"{first['when'][:10]}): sampled softmax makes the training step {ratios}."
        )
    else:
        sentences.append("For what sampled softmax saves at 5,270 and 500,000 classes, see `make bench`.")
    return sentences


def loss_optimizer_table(data: dict[str, Any]) -> str:
    """Rows loss, columns optimizer: the headline number, mean ± seed std ("–" where a cell was not run)."""
    arms = compare_arms(data)
    key = headline_key(data)
    optimizers = list(dict.fromkeys(arm["optimizer"] for arm in arms))
    num_sampled = data.get("settings", {}).get("num_sampled")
    by_cell = {(arm["loss"], arm["optimizer"]): arm for arm in arms}
    rows = []
    for loss in dict.fromkeys(arm["loss"] for arm in arms):
        cells = []
        for optimizer in optimizers:
            arm = by_cell.get((loss, optimizer))
            std = None if arm is None else arm.get(f"{key}_std")
            spread = " ± n/a" if std is None else f" ± {100 * std:.1f}"
            cells.append("–" if arm is None else pct(arm[f"{key}_mean"]) + spread)
        rows.append((esc(_loss_name(loss, num_sampled)), *cells))
    return table(("loss \\ optimizer", *optimizers), rows, "numbers grid-table")


def _reaches(point: dict[str, Any], reference: dict[str, Any], key: str) -> tuple[bool, str]:
    """Does a point reach the full softmax? Not clearly below it: its paired 95% interval over products reaches 0
    (files without one: within the seed spread, or 1 point for one seed). Returns (reaches, the rule in words)."""
    paired = point.get("vs_reference")
    if isinstance(paired, dict):
        return paired["ci95"][1] >= 0, "not clearly below: its paired 95% interval over products reaches 0"
    stds = [s for s in (point.get(f"{key}_std"), reference.get(f"{key}_std")) if s is not None]
    tolerance = max(stds) if len(stds) == 2 else 0.01
    rule = "to within the seed spread" if len(stds) == 2 else "to within 1 point (one seed: no spread)"
    return point[f"{key}_mean"] >= reference[f"{key}_mean"] - tolerance, rule


def sweep_conclusions(data: dict[str, Any]) -> list[str]:
    """Where accuracy gets to as K grows, against the full-softmax reference at the same optimizer."""
    points_ = sorted(data.get("points", []), key=lambda p: p["num_sampled"])
    reference = data.get("reference")
    if not points_ or not isinstance(reference, dict):
        return []
    key, optimizer = headline_key(data), data.get("settings", {}).get("optimizer", "?")
    trace = ", ".join(f"K = {p['num_sampled']}: {pct(p[f'{key}_mean'])}" for p in points_)
    bounds = reference.get(f"{key}_ci95")
    sentences = [
        f"{headline_name(data)[0].upper()}{headline_name(data)[1:]} against the number of sampled negatives, all "
        f"with {optimizer}: {trace}; full softmax {pct(reference[f'{key}_mean'])}"
        + (f" {interval(bounds)}" if bounds else "")
        + "."
    ]
    for point in points_:
        reached, rule = _reaches(point, reference, key)
        if reached:
            sentences.append(
                f"The smallest K that reaches the full softmax ({rule}) is K = {point['num_sampled']} "
                f"({pct(point[f'{key}_mean'])})."
            )
            return sentences
    best = max(points_, key=lambda p: p[f"{key}_mean"])
    difference = best[f"{key}_mean"] - reference[f"{key}_mean"]
    sentences.append(
        f"No K tried reaches the full softmax: the best, K = {best['num_sampled']}, is {points(difference)} "
        f"{'above' if difference > 0 else 'below'} it."
    )
    return sentences
