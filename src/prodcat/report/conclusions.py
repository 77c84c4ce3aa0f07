"""Conclusions in words, generated from the numbers of `compare.json` / `sweep.json` (never written by hand).

Every sentence holds one thing fixed and names it (the optimizer of a loss comparison, the loss of an optimizer
comparison) and says whether a difference is larger than the spread over training seeds. Time claims cite the
output-layer ratios `make bench` measured (a packaged copy of benchmarks/results, `softmax_bench.json`), because at
the demo's few classes the output layer is too small a part of a step for sampled softmax to save anything.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from prodcat.report.markup import esc, pct, points, table

__all__ = ["compare_arms", "compare_conclusions", "loss_optimizer_table", "sweep_conclusions", "bench_results"]

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


def compare_arms(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each arm with its `loss` and `optimizer` (files from before the optimizer factor: key = loss)."""
    default = (data.get("settings", {}).get("optimizers") or [data.get("settings", {}).get("optimizer", "?")])[0]
    arms = []
    for key, block in data.get("losses", {}).items():
        loss, _, optimizer = str(key).partition(", ")
        named = {"loss": block.get("loss", loss), "optimizer": block.get("optimizer", optimizer or default)}
        arms.append({**block, **named})
    return arms


def _spread_clause(a: dict[str, Any], b: dict[str, Any], difference: float) -> str:
    """Is `difference` larger than the seed spread of either arm? One seed: no spread to judge it by."""
    std_a, std_b = a.get("val_top1_std"), b.get("val_top1_std")
    clause: str
    if std_a is None or std_b is None or min(int(a.get("seeds", 1)), int(b.get("seeds", 1))) < 2:
        clause = "one seed, so no seed spread to judge it by (it may be noise)"
    else:
        inside = abs(difference) <= max(std_a, std_b)
        clause = (
            f"{'within' if inside else 'larger than'} the seed spread "
            f"(std {100 * std_a:.1f} and {100 * std_b:.1f} points over {min(a['seeds'], b['seeds'])} seeds)"
        )
    ci_a, ci_b = a.get("val_top1_ci95"), b.get("val_top1_ci95")
    if isinstance(ci_a, dict) and isinstance(ci_b, dict):
        overlap = ci_a["low"] <= ci_b["high"] and ci_b["low"] <= ci_a["high"]
        clause += f"; the 95% intervals over products {'overlap' if overlap else 'do not overlap'}"
    return clause


def _versus(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str, held: str) -> str:
    difference = a["val_top1_mean"] - b["val_top1_mean"]
    if abs(difference) < SAME:
        verdict = f"matches {name_b}"
    else:
        verdict = f"is {points(difference)} {'above' if difference > 0 else 'below'} {name_b}"
    seeds = min(int(a.get("seeds", 1)), int(b.get("seeds", 1)))
    return (
        f"{name_a[0].upper()}{name_a[1:]} {verdict} at equal {held}: {pct(a['val_top1_mean'])} vs "
        f"{pct(b['val_top1_mean'])} val top-1 (images, mean of {seeds} seed{'s' if seeds > 1 else ''}); "
        f"{_spread_clause(a, b, difference)}."
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
            name = _loss_name(loss, num_sampled)
            sentences.append(_versus(arm, reference, name, "full softmax", f"optimizer ({optimizer})"))
    optimizers = list(dict.fromkeys(arm["optimizer"] for arm in arms))
    for loss in dict.fromkeys(arm["loss"] for arm in arms):
        base = by_cell.get((loss, optimizers[0]))
        for other in optimizers[1:]:
            if base is not None and (loss, other) in by_cell:
                held = f"loss ({_loss_name(loss, num_sampled)})"
                sentences.append(_versus(by_cell[(loss, other)], base, f"optimizer {other}", optimizers[0], held))
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
    """Rows loss, columns optimizer: val top-1 mean ± seed std ("–" where a cell was not run)."""
    arms = compare_arms(data)
    optimizers = list(dict.fromkeys(arm["optimizer"] for arm in arms))
    num_sampled = data.get("settings", {}).get("num_sampled")
    by_cell = {(arm["loss"], arm["optimizer"]): arm for arm in arms}
    rows = []
    for loss in dict.fromkeys(arm["loss"] for arm in arms):
        cells = []
        for optimizer in optimizers:
            arm = by_cell.get((loss, optimizer))
            std = None if arm is None else arm.get("val_top1_std")
            spread = " ± n/a" if std is None else f" ± {100 * std:.1f}"
            cells.append("–" if arm is None else pct(arm["val_top1_mean"]) + spread)
        rows.append((esc(_loss_name(loss, num_sampled)), *cells))
    return table(("loss \\ optimizer", *optimizers), rows, "numbers grid-table")


def sweep_conclusions(data: dict[str, Any]) -> list[str]:
    """Where accuracy gets to as K grows, against the full-softmax reference at the same optimizer."""
    points_ = sorted(data.get("points", []), key=lambda p: p["num_sampled"])
    reference = data.get("reference")
    if not points_ or not isinstance(reference, dict):
        return []
    optimizer = data.get("settings", {}).get("optimizer", "?")
    trace = ", ".join(f"K = {p['num_sampled']}: {pct(p['val_top1_mean'])}" for p in points_)
    sentences = [
        f"Val top-1 (images) against the number of sampled negatives, all with {optimizer}: {trace}; "
        f"full softmax {pct(reference['val_top1_mean'])}."
    ]
    close = None
    for point in points_:
        stds = [s for s in (point.get("val_top1_std"), reference.get("val_top1_std")) if s is not None]
        tolerance = max(stds) if len(stds) == 2 else 0.01
        if point["val_top1_mean"] >= reference["val_top1_mean"] - tolerance:
            close = (point, "the seed spread" if len(stds) == 2 else "1 point (one seed: no spread)")
            break
    if close:
        point, rule = close
        sentences.append(
            f"The smallest K that reaches the full softmax (to within {rule}) is K = {point['num_sampled']} "
            f"({pct(point['val_top1_mean'])})."
        )
    else:
        best = max(points_, key=lambda p: p["val_top1_mean"])
        difference = best["val_top1_mean"] - reference["val_top1_mean"]
        sentences.append(
            f"No K tried reaches the full softmax: the best, K = {best['num_sampled']}, is {points(difference)} "
            f"{'above' if difference > 0 else 'below'} it."
        )
    return sentences
