"""Figures of one run folder, drawn from the plain files its stages wrote: training curves (`curves.png`, from
`metrics.jsonl`) and the evaluation's figures and levers table (`eval/*.png`, `eval/levers.md`, from
`eval/metrics.json` and `eval/curves.json`).

Training and evaluation write numbers only; whoever runs them (the CLI, `prodcat report`, the demo through the
report) calls `draw_run`, which redraws what is missing or older than the numbers it shows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prodcat.report import figures
from prodcat.report.levers import levers_table_markdown
from prodcat.utils import atomic_write_text

__all__ = [
    "draw_run",
    "draw_training",
    "draw_evaluation",
    "plot_curves",
    "plot_time_curves",
    "CURVES_FIGURE",
    "EVAL_FIGURES",
    "LEVERS_FILE",
]

CURVES_FIGURE = "curves.png"
EVAL_FIGURES = {
    "confidence": "confidence.png",
    "by_num_images": "accuracy_by_num_images.png",
    "taxonomy": "taxonomy.png",
    "reliability": "reliability.png",
}
LEVERS_FILE = "levers.md"  # the levers table of eval/metrics.json as Markdown (a README can paste it)


def _stale(target: Path, source: Path) -> bool:
    """True when `target` is missing or older than `source` (which must exist)."""
    return not target.is_file() or target.stat().st_mtime_ns < source.stat().st_mtime_ns


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def draw_run(run_dir: str | Path, force: bool = False) -> list[Path]:
    """Draw a run's training curves and evaluation figures where they are missing or stale; returns what it drew."""
    return draw_training(run_dir, force) + draw_evaluation(run_dir, force)


def draw_training(run_dir: str | Path, force: bool = False) -> list[Path]:
    """`RUN/curves.png` from `RUN/metrics.jsonl` (nothing when the run has no metrics yet)."""
    run_dir = Path(run_dir)
    source, target = run_dir / "metrics.jsonl", run_dir / CURVES_FIGURE
    if not source.is_file() or not (force or _stale(target, source)):
        return []
    metrics = _read_jsonl(source)
    if not metrics:
        return []
    return [plot_curves(metrics, target, title=run_dir.name)]


def draw_evaluation(run_dir: str | Path, force: bool = False) -> list[Path]:
    """`RUN/eval/*.png` and `RUN/eval/levers.md` from `eval/metrics.json` (+ `eval/curves.json` for the confidence
    figure); nothing when the run was not evaluated."""
    out = Path(run_dir) / "eval"
    source = out / "metrics.json"
    if not source.is_file():
        return []
    targets = [out / name for name in EVAL_FIGURES.values()] + [out / LEVERS_FILE]
    if not force and not any(_stale(target, source) for target in targets):
        return []
    metrics = json.loads(source.read_text(encoding="utf-8"))
    drawn = []
    curves = out / "curves.json"
    if curves.is_file() and "threshold" in (metrics.get("confidence") or {}):
        curve = json.loads(curves.read_text(encoding="utf-8"))["confidence"]
        _plot_confidence(out / EVAL_FIGURES["confidence"], metrics["confidence"], curve, metrics["split"])
        drawn.append(out / EVAL_FIGURES["confidence"])
    for key, plot, block, needs in (
        ("by_num_images", _plot_by_num_images, "product", "by_num_images"),
        ("taxonomy", _plot_taxonomy, "taxonomy", "frequency"),
        ("reliability", _plot_reliability, "calibration", "reliability_after"),
    ):
        if needs in (metrics.get(block) or {}):  # a file from before that number was written: no figure
            plot(out / EVAL_FIGURES[key], metrics[block])
            drawn.append(out / EVAL_FIGURES[key])
    drawn.append(atomic_write_text(out / LEVERS_FILE, levers_table_markdown(metrics)))
    return drawn


def plot_curves(metrics: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Train/val loss and val accuracy against step (top row) and training seconds (bottom row: time in training
    steps, validation and checkpoints left out, so runs that validate more often are not drawn slower)."""
    evals = [m for m in metrics if m.get("val_loss") is not None]
    trains = [m for m in metrics if m.get("train_loss") is not None]
    with figures.png_figure(path, 2, 2, figsize=(10, 7)) as (figure, axes):
        for row, key, label in ((0, "step", "step"), (1, "train_seconds", "training seconds")):
            loss_axes, acc_axes = axes[row]
            loss_axes.plot([m[key] for m in trains], [m["train_loss"] for m in trains], label="train loss")
            loss_axes.plot([m[key] for m in evals], [m["val_loss"] for m in evals], marker=".", label="val loss")
            loss_axes.set(xlabel=label, ylabel="cross-entropy", title=f"loss vs {label}")
            loss_axes.legend()
            for metric in ("val_top1", "val_top5"):
                acc_axes.plot(
                    [m[key] for m in evals],
                    [m[metric] for m in evals],
                    marker=".",
                    label={"val_top1": "val top-1", "val_top5": "val top-5"}[metric],
                )
            acc_axes.set(xlabel=label, ylabel="accuracy (images)", title=f"val accuracy vs {label}", ylim=(0, 1))
            acc_axes.legend()
        figure.suptitle(title or "training curves")
    return Path(path)


def plot_time_curves(path: str | Path, runs: dict[str, Path], faded: Sequence[str] = (), title: str = "") -> bool:
    """Val top-1 against training seconds (metrics.jsonl `train_seconds`), one line per run (`faded` ones lighter);
    False (and no file) when no run has a validation point yet."""
    lines = {}
    for name, run_dir in runs.items():
        source = Path(run_dir) / "metrics.jsonl"
        metrics = _read_jsonl(source) if source.is_file() else []
        points = [(m["train_seconds"], m["val_top1"]) for m in metrics if m.get("val_top1") is not None]
        if points:
            lines[name] = points
    if not lines:
        return False
    with figures.png_figure(path, figsize=(7, 4.2)) as (figure, axes):
        for name, points in lines.items():
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, marker=".", label=name, alpha=0.4 if name in faded else 1.0)
        axes.set(xlabel="training seconds (validation and checkpoints left out)", ylabel="val top-1 (images)")
        axes.set_title(title or "accuracy vs time")
        axes.legend(fontsize=7)
    return True


# -- evaluation figures ------------------------------------------------------------------------------------------------
def _plot_reliability(path: Path, calibration: dict[str, Any]) -> None:
    """Reliability diagram of the product top-1 probability, before and after temperature scaling."""
    with figures.png_figure(path, figsize=(5.6, 4.6)) as (figure, axes):
        axes.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
        for index, (key, name) in enumerate((("before", "before"), ("after", f"T = {calibration['temperature']:.2f}"))):
            bins = [b for b in calibration[f"reliability_{key}"] if b["count"]]
            axes.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", markersize=4,
                      color=figures.PALETTE[index], label=f"{name}: ECE {calibration[f'ece_{key}']:.3f}")  # fmt: skip
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.02)
        axes.set_xlabel("mean product top-1 probability in the bin")
        axes.set_ylabel("accuracy in the bin")
        axes.set_title(f"Reliability on {calibration['split']} ({calibration['bins']} bins, n = {calibration['n']:,})")
        axes.legend(loc="upper left", fontsize=8)


def _plot_confidence(path: Path, confidence: dict[str, Any], curve: dict[str, list[float]], split: str) -> None:
    target = confidence["target_accuracy"]
    chosen_on = confidence.get("chosen_on", "val")
    with figures.png_figure(path, 1, 2, figsize=(10.5, 4.0)) as (figure, axes):
        left, right = axes
        left.plot(curve["coverage"], curve["accuracy"], color=figures.PALETTE[0], linewidth=1.6)
        left.axhline(target, color=figures.PALETTE[3], linestyle="--", linewidth=1, label=f"target {target:.0%}")
        if confidence["threshold"] is not None and confidence["accuracy"] is not None:
            left.plot(
                [confidence["coverage"]],
                [confidence["accuracy"]],
                "o",
                color=figures.PALETTE[3],
                label=f"threshold {confidence['threshold']:.3f} (chosen on {chosen_on}): "
                f"{confidence['coverage']:.1%} auto-accepted",
            )
        left.set_xlim(0, 1.0)
        left.set_ylim(0, 1.02)
        left.set_xlabel("coverage (share of products auto-accepted)")
        left.set_ylabel("accuracy of the auto-accepted products")
        left.set_title(f"Coverage vs accuracy on {split}")
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
            figure.suptitle(f"No threshold reaches {target:.0%} accuracy on {chosen_on}")


def _plot_by_num_images(path: Path, product: dict[str, Any]) -> None:
    from prodcat.predict.predictor import AGGREGATIONS

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
    from prodcat.evaluate.evaluation import FREQUENCY_GROUPS

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
        thresholds = frequency.get("thresholds", {})
        bounds = {
            "head": f"> {thresholds.get('head_above', 0):,.0f} pict.",
            "medium": f"{thresholds.get('tail_below', 0):,.0f}-{thresholds.get('head_above', 0):,.0f} pict.",
            "tail": f"< {thresholds.get('tail_below', 0):,.0f} pict.",
            "unseen": "0 pict.",
        }
        heights = [frequency[name]["product_top1"] or 0.0 for name in names]
        bars = axes[1].bar(np.arange(len(names)), heights, color=figures.PALETTE[2], width=0.6)
        figures.label_bars(axes[1], bars, [f"{h:.2f}" for h in heights], fontsize=7)
        axes[1].set_xticks(
            np.arange(len(names)),
            [
                f"{name} ({bounds[name]})\n{frequency[name]['categories']} cat., {frequency[name]['products']:,} prod."
                for name in names
            ],
        )
        axes[1].set_ylim(0, 1.12)
        axes[1].set_title("Product top-1 by train pictures per leaf")
        _plot_severity(axes[2], taxonomy)


def _plot_severity(axes: Any, taxonomy: dict[str, Any]) -> None:
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
