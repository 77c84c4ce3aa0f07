"""Experiments over training runs: loss comparison (`compare`) and the number-of-negatives sweep (`sweep`).

Both train ordinary runs (`W/runs/compare-<loss>-s<seed>`, `W/runs/sweep-k<K>-s<seed>`, `W/runs/sweep-softmax-s<seed>`)
and summarise them from each run's summary.json and metrics.jsonl into `W/reports/<name>/`: a JSON file with every
number, a PNG figure, and the same table as Markdown and as a small HTML page.

`compare` trains each run in a fresh (spawned) process by default, so the peak RSS it reports belongs to that run
alone (a process's peak RSS never goes down, so runs sharing one process would inherit the largest before them).
"""

from __future__ import annotations

import dataclasses
import html
import multiprocessing
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prodcat.config import TrainConfig
from prodcat.data.taxonomy import Taxonomy
from prodcat.features.store import FeatureStore
from prodcat.paths import WorkPaths
from prodcat.train import StepPlan, read_metrics, run_summary, train
from prodcat.utils import atomic_write_text, get_logger, write_json

__all__ = ["compare", "sweep", "EVALS_PER_RUN"]

log = get_logger("prodcat.experiments")

EVALS_PER_RUN = 15  # validation points per run: enough for a curve, few enough not to dominate a tiny run


# -- running --------------------------------------------------------------------------------------------------------
def _eval_every(config: TrainConfig) -> int:
    paths = WorkPaths(config.workdir)
    rows = len(FeatureStore.open(paths.feature_store(config.features)).split_indices("train"))
    return max(1, StepPlan.create(rows, config).total_steps // EVALS_PER_RUN)


def _child_train(config: dict[str, Any], threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # the parent's setting, not torch's default of every core
    train(TrainConfig(**config))


def _train_isolated(config: TrainConfig) -> None:
    import torch

    process = multiprocessing.get_context("spawn").Process(
        target=_child_train, args=(dataclasses.asdict(config), torch.get_num_threads()), name=f"train-{config.name}"
    )
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"training run {config.name!r} failed in its subprocess (exit code {process.exitcode})")


def _run(config: TrainConfig, isolate: bool) -> dict[str, Any]:
    """Train one run (validating about EVALS_PER_RUN times) and read back its summary and metrics."""
    # compare/sweep own their run names: re-running them retrains each run from scratch (explicitly)
    config = dataclasses.replace(config, eval_every=_eval_every(config), overwrite=True)
    log.info("run %s", config.name)
    if isolate:
        _train_isolated(config)
    else:
        train(config)
    run_dir = WorkPaths(config.workdir).run(config.name)
    return {"name": config.name, "summary": run_summary(run_dir), "metrics": read_metrics(run_dir)}


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of the final validation and the cost of each run."""
    finals = [r["summary"]["final"] for r in runs]
    summaries = [r["summary"] for r in runs]
    result: dict[str, Any] = {"runs": [r["name"] for r in runs], "seeds": len(runs)}
    for key in ("val_top1", "val_top5", "val_loss"):
        values = [f[key] for f in finals]
        result[f"{key}_mean"], result[f"{key}_std"] = statistics.fmean(values), _std(values)
    result["best_top1_mean"] = statistics.fmean(s["best"]["value"] for s in summaries)
    for key in ("seconds_per_epoch", "step_seconds", "seconds"):
        result[f"{key}_mean"] = _mean_or_none([s[key] for s in summaries])
    for key in ("peak_rss_mb", "peak_cuda_mb"):
        present = [s[key] for s in summaries if s[key] is not None]
        result[f"{key}_max"] = max(present) if present else None
    return result


def _curve(runs: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean val top-1, std) over seeds at each validation point; x = step or mean seconds."""
    evals = [[m for m in r["metrics"] if m.get("val_top1") is not None] for r in runs]
    length = min(len(e) for e in evals)
    x = np.mean([[m[key] for m in e[:length]] for e in evals], axis=0)
    y = np.array([[m["val_top1"] for m in e[:length]] for e in evals])
    return x, y.mean(axis=0), y.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(length)


# -- tables ---------------------------------------------------------------------------------------------------------
def _fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _html_page(
    title: str, figure: str, headers: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str]
) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><img src="{html.escape(figure)}" alt="{html.escape(title)}" '
        f'style="max-width:100%"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        f"<ul>{note_html}</ul></body></html>\n"
    )


def _write_tables(
    out: Path, name: str, title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str]
) -> None:
    notes_md = "".join(f"\n- {n}" for n in notes)
    atomic_write_text(out / f"{name}.md", f"# {title}\n\n" + _markdown(headers, rows) + notes_md + "\n")
    atomic_write_text(out / f"{name}.html", _html_page(title, f"{name}.png", headers, rows, notes))


# -- compare --------------------------------------------------------------------------------------------------------
COMPARE_HEADERS = (
    "loss",
    "seeds",
    "val top-1 (mean ± std)",
    "val top-5",
    "val loss",
    "best top-1",
    "s / epoch",
    "ms / step",
    "peak RSS (MB)",
    "peak GPU (MB)",
)


def _compare_row(loss: str, agg: dict[str, Any]) -> list[str]:
    return [
        loss,
        str(agg["seeds"]),
        f"{agg['val_top1_mean']:.4f} ± {agg['val_top1_std']:.4f}",
        f"{agg['val_top5_mean']:.4f}",
        f"{agg['val_loss_mean']:.4f}",
        f"{agg['best_top1_mean']:.4f}",
        _fmt(agg["seconds_per_epoch_mean"]),
        _fmt(agg["step_seconds_mean"], 1000, 2),
        _fmt(agg["peak_rss_mb_max"], digits=0),
        _fmt(agg["peak_cuda_mb_max"], digits=0),
    ]


def _plot_compare(path: Path, runs_by_loss: dict[str, list[dict[str, Any]]], title: str) -> None:
    from prodcat.report.figures import png_figure

    with png_figure(path, 1, 2, figsize=(11, 4.2)) as (figure, axes):
        for loss, runs in runs_by_loss.items():
            for ax, key in zip(axes, ("step", "seconds"), strict=True):
                x, mean, std = _curve(runs, key)
                (line,) = ax.plot(x, mean, marker=".", label=f"{loss} ({len(runs)} seeds)")
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        for ax, label in zip(axes, ("step", "wall-clock seconds"), strict=True):
            ax.set(xlabel=label, ylabel="val top-1 (images, full softmax)", title=f"accuracy vs {label}")
            ax.legend()
        figure.suptitle(title)


def compare(
    workdir: str | Path,
    *,
    features: str,
    head: str,
    losses: Sequence[str],
    seeds: int,
    epochs: float,
    num_sampled: int,
    batch_size: int,
    isolate: bool = True,
) -> Path:
    """Train `head` with each loss under the same budget (epochs) and seeds 0..seeds-1; report under
    `W/reports/compare/`. Returns that folder."""
    if not losses or seeds < 1:
        raise ValueError("compare needs at least one loss and one seed")
    paths = WorkPaths(workdir)
    runs_by_loss: dict[str, list[dict[str, Any]]] = {}
    for loss in losses:
        runs_by_loss[loss] = [
            _run(
                TrainConfig(
                    workdir=str(workdir),
                    features=features,
                    head=head,
                    loss=loss,
                    seed=seed,
                    epochs=epochs,
                    num_sampled=num_sampled,
                    batch_size=batch_size,
                    run_name=f"compare-{loss}-s{seed}",
                ),
                isolate,
            )
            for seed in range(seeds)
        ]
    out = paths.report("compare")
    out.mkdir(parents=True, exist_ok=True)
    aggregates = {loss: _aggregate(runs) for loss, runs in runs_by_loss.items()}
    settings = {
        "features": features,
        "head": head,
        "losses": list(losses),
        "seeds": seeds,
        "epochs": epochs,
        "num_sampled": num_sampled,
        "batch_size": batch_size,
        "isolated_processes": isolate,
    }
    notes = [
        f"Same head ({head}), features ({features}), {epochs:g} epochs, batch {batch_size}, seeds 0..{seeds - 1}; "
        f"sampled softmax uses {num_sampled} negatives.",
        "Accuracy is image-level top-1 on the val split with the full softmax over all classes, after the last "
        "step. "
        + (
            "Peak RSS: each run's own process (max over seeds)."
            if isolate
            else "Peak RSS: runs shared one process, so it is the process peak up to that run."
        ),
    ]
    write_json(
        out / "compare.json",
        {
            "settings": settings,
            "losses": aggregates,
            "curves": {
                loss: {key: [c.tolist() for c in _curve(runs, key)] for key in ("step", "seconds")}
                for loss, runs in runs_by_loss.items()
            },
        },
    )
    _plot_compare(out / "compare.png", runs_by_loss, f"{head} head on {features}: loss comparison")
    _write_tables(
        out,
        "compare",
        f"Loss comparison: {head} head on {features}",
        COMPARE_HEADERS,
        [_compare_row(loss, agg) for loss, agg in aggregates.items()],
        notes,
    )
    return out


# -- sweep ----------------------------------------------------------------------------------------------------------
SWEEP_HEADERS = ("negatives K", "seeds", "val top-1 (mean ± std)", "val top-5", "val loss", "ms / step", "s / epoch")


def _clip_negatives(requested: Sequence[int], num_classes: int) -> tuple[list[int], list[str]]:
    """K values that fit (at most C - 1 negatives besides the true class), deduplicated, with notes for the rest."""
    values, notes = [], []
    for k in requested:
        if k < 1:
            raise ValueError(f"num_sampled values must be >= 1, got {k}")
        kept = min(int(k), num_classes - 1)
        if kept != k:
            notes.append(f"K={k} >= C={num_classes}: clipped to K={kept} (C - 1)")
        if kept not in values:
            values.append(kept)
    return values, notes


def _sweep_row(label: str, agg: dict[str, Any]) -> list[str]:
    return [
        label,
        str(agg["seeds"]),
        f"{agg['val_top1_mean']:.4f} ± {agg['val_top1_std']:.4f}",
        f"{agg['val_top5_mean']:.4f}",
        f"{agg['val_loss_mean']:.4f}",
        _fmt(agg["step_seconds_mean"], 1000, 2),
        _fmt(agg["seconds_per_epoch_mean"]),
    ]


def _plot_sweep(path: Path, points: list[dict[str, Any]], reference: dict[str, Any], title: str) -> None:
    from prodcat.report.figures import png_figure

    ks = [p["num_sampled"] for p in points]
    with png_figure(path, 1, 2, figsize=(11, 4.2)) as (figure, (acc_axes, time_axes)):
        acc_axes.errorbar(
            ks,
            [p["val_top1_mean"] for p in points],
            yerr=[p["val_top1_std"] for p in points],
            marker="o",
            capsize=3,
            label="sampled softmax",
        )
        acc_axes.axhline(reference["val_top1_mean"], linestyle="--", color="#555555", label="full softmax")
        acc_axes.set(
            xscale="log", xlabel="sampled negatives K", ylabel="val top-1 (images, full softmax)", title="accuracy vs K"
        )
        step_ms = [1000 * (p["step_seconds_mean"] or np.nan) for p in points]
        time_axes.plot(ks, step_ms, marker="o", label="sampled softmax")
        if reference["step_seconds_mean"] is not None:
            time_axes.axhline(
                1000 * reference["step_seconds_mean"], linestyle="--", color="#555555", label="full softmax"
            )
        time_axes.set(xscale="log", xlabel="sampled negatives K", ylabel="ms per training step", title="step time vs K")
        for ax in (acc_axes, time_axes):
            ax.legend()
        figure.suptitle(title)


def sweep(
    workdir: str | Path,
    *,
    features: str,
    head: str,
    num_sampled: tuple[int, ...],
    sampler: str,
    epochs: float,
    seeds: int,
    batch_size: int,
    isolate: bool = False,
) -> Path:
    """Sampled softmax for each K (plus the full softmax as reference); report under `W/reports/sweep/`."""
    if not num_sampled or seeds < 1:
        raise ValueError("sweep needs at least one num_sampled value and one seed")
    paths = WorkPaths(workdir)
    num_classes = Taxonomy.load(paths.taxonomy).num_classes
    values, notes = _clip_negatives(num_sampled, num_classes)
    base = dict(
        workdir=str(workdir), features=features, head=head, epochs=epochs, batch_size=batch_size, sampler=sampler
    )
    points = []
    for k in values:
        runs = [
            _run(TrainConfig(loss="sampled", num_sampled=k, seed=seed, run_name=f"sweep-k{k}-s{seed}", **base), isolate)
            for seed in range(seeds)
        ]
        points.append({"num_sampled": k, **_aggregate(runs)})
    reference = _aggregate(
        [
            _run(TrainConfig(loss="softmax", seed=seed, run_name=f"sweep-softmax-s{seed}", **base), isolate)
            for seed in range(seeds)
        ]
    )
    out = paths.report("sweep")
    out.mkdir(parents=True, exist_ok=True)
    notes = [
        f"{head} head on {features}, {sampler} sampler, {epochs:g} epochs, batch {batch_size}, "
        f"{num_classes} classes; accuracy uses the full softmax.",
        *notes,
    ]
    settings = {
        "features": features,
        "head": head,
        "num_sampled": list(num_sampled),
        "sampler": sampler,
        "epochs": epochs,
        "seeds": seeds,
        "batch_size": batch_size,
    }
    write_json(
        out / "sweep.json",
        {"settings": settings, "num_classes": num_classes, "points": points, "reference": reference, "notes": notes},
    )
    _plot_sweep(out / "sweep.png", points, reference, f"{head} head on {features}: sampled negatives sweep")
    rows = [_sweep_row(str(p["num_sampled"]), p) for p in points] + [_sweep_row("full softmax", reference)]
    _write_tables(out, "sweep", f"Sampled-softmax sweep: {head} head on {features}", SWEEP_HEADERS, rows, notes)
    return out
