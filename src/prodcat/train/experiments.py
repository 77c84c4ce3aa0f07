"""Experiments over training runs: loss x optimizer comparison (`compare`) and the number-of-negatives sweep (`sweep`).

Both train ordinary runs (`W/runs/compare-<loss>-<optimizer>-s<seed>`, `W/runs/sweep-k<K>-<optimizer>-s<seed>`,
`W/runs/sweep-softmax-<optimizer>-s<seed>`) and summarise them from each run's summary.json and metrics.jsonl into
`W/reports/<name>/`: a JSON file with every number, a PNG figure, and the same table as Markdown and as a small HTML
page. Both return an `ExperimentResult`: the report folder and every run folder, keyed by what varied.

A comparison changes one thing: every arm of `compare` shares head, feature store, budget, seeds and, unless
`optimizers` makes it a second factor, the optimizer; the sweep's full-softmax reference uses the sweep's optimizer.
Seed spread is the standard deviation over seeds (three by default); one seed has no spread ("n/a"). Accuracy is
taken after the last step, never at a checkpoint picked on the same val split; curves are against training seconds
(validation and checkpoints left out).

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

from prodcat.config import CompareConfig, ConfigError, SweepConfig, TrainConfig, save_config
from prodcat.data.taxonomy import Taxonomy
from prodcat.errors import require_store
from prodcat.features.store import FeatureStore
from prodcat.paths import WorkPaths
from prodcat.train.loop import StepPlan, read_metrics, run_summary, train
from prodcat.utils import atomic_write_text, get_logger, log_to_file, write_json

__all__ = ["compare", "sweep", "ExperimentResult", "EVALS_PER_RUN", "DEFAULT_SEEDS"]

log = get_logger("prodcat.train.experiments")

EVALS_PER_RUN = 15  # validation points per run: enough for a curve, few enough not to dominate a tiny run
DEFAULT_SEEDS = CompareConfig.seeds  # where a spread is shown, over three seeds unless asked otherwise
TIME_KEY = "train_seconds"  # curves against time use training seconds: validation and checkpoints left out
TIME_LABEL = "training seconds (excl. validation, checkpoints)"

RunKey = tuple[str, str, int]  # (arm, optimizer, seed); arm = the loss in compare, "sampled-k<K>" | "softmax" in sweep


@dataclasses.dataclass(frozen=True)
class ExperimentResult:
    """What an experiment made: its report folder and every run folder it trained."""

    report: Path
    runs: dict[RunKey, Path]


# -- running --------------------------------------------------------------------------------------------------------
def _eval_every(config: TrainConfig) -> int:
    paths = WorkPaths(config.workdir)
    rows = len(FeatureStore.open(paths.feature_store(config.store)).split_indices("train"))
    return max(1, StepPlan.create(rows, config).total_steps // EVALS_PER_RUN)


def _child_train(config: dict[str, Any], threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # the parent's setting, not torch's default of every core
    log_file = Path(config["workdir"]) / "logs" / "prodcat.log"
    if log_file.is_file():  # the parent logs there (the CLI): so does this run's progress and closing line
        log_to_file(log_file)
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
    return {"name": config.name, "dir": run_dir, "summary": run_summary(run_dir), "metrics": read_metrics(run_dir)}


def _resolve_optimizers(optimizer: str | None, optimizers: Sequence[str] | None) -> tuple[str, ...]:
    """One optimizer for every arm (default: TrainConfig's), or several as a second factor; names checked now,
    before any run trains."""
    from prodcat.model.optim import list_optimizers

    if optimizer is not None and optimizers:
        raise ConfigError("give one optimizer (held fixed across arms) or a list of optimizers (a factor), not both")
    names = tuple(dict.fromkeys(optimizers)) if optimizers else (optimizer or TrainConfig.optimizer,)
    known = list_optimizers()
    for name in names:
        if name not in known:
            raise ConfigError(f"optimizer must be one of {', '.join(known)}, got {name!r}")
    return names


# -- aggregation over seeds -----------------------------------------------------------------------------------------
def _std(values: Sequence[float]) -> float | None:
    """Sample standard deviation over seeds; None for one seed (unknown, not zero)."""
    return statistics.stdev(values) if len(values) > 1 else None


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _product_interval(run_dirs: Sequence[Path]) -> dict[str, Any] | None:
    """HOOK: the 95% interval over products of the headline accuracy, shown beside the seed spread.

    Holdout evaluation with intervals over products is being added to `prodcat.evaluate.evaluation`. Once a run's
    `eval/metrics.json` carries one, read it here (e.g. from seed 0's run) as {"low", "high", "n", "split"}; the
    tables, JSON and report then show it. Until then None ("n/a"). It must not be computed from the val numbers
    below: those are where checkpoints and aggregations get selected.
    """
    return None


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of the final validation and the cost of each run."""
    finals = [r["summary"]["final"] for r in runs]
    summaries = [r["summary"] for r in runs]
    result: dict[str, Any] = {"runs": [r["name"] for r in runs], "seeds": len(runs)}
    for key in ("val_top1", "val_top5", "val_loss"):
        values = [f[key] for f in finals]
        result[f"{key}_mean"], result[f"{key}_std"] = statistics.fmean(values), _std(values)
    result["val_rows"] = finals[0].get("val_rows")
    result["val_top1_ci95"] = _product_interval([r["dir"] for r in runs])
    # Selected on val and reported on val (optimistic): kept in the JSON for curiosity, left out of the tables.
    result["best_top1_mean"] = statistics.fmean(s["best"]["value"] for s in summaries)
    for key in ("seconds_per_epoch", "step_seconds", "seconds", "train_seconds"):
        result[f"{key}_mean"] = _mean_or_none([s.get(key) for s in summaries])
    for key in ("peak_rss_mb", "peak_cuda_mb"):
        present = [s[key] for s in summaries if s[key] is not None]
        result[f"{key}_max"] = max(present) if present else None
    return result


def _curve(runs: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(x, mean val top-1, std or None for one seed) over seeds at each validation point; x = step or seconds."""
    evals = [[m for m in r["metrics"] if m.get("val_top1") is not None] for r in runs]
    length = min(len(e) for e in evals)
    x = np.mean([[m[key] for m in e[:length]] for e in evals], axis=0)
    y = np.array([[m["val_top1"] for m in e[:length]] for e in evals])
    return x, y.mean(axis=0), y.std(axis=0, ddof=1) if len(runs) > 1 else None


def _curves_json(runs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    curves = {}
    for key in ("step", TIME_KEY):
        x, mean, std = _curve(runs, key)
        curves[key] = [x.tolist(), mean.tolist(), None if std is None else std.tolist()]
    return curves


# -- tables ---------------------------------------------------------------------------------------------------------
def _fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def _spread(agg: dict[str, Any], key: str = "val_top1") -> str:
    """'mean ± std (n seeds)'; one seed has no spread: 'n/a', never '± 0'."""
    mean, std, seeds = agg[f"{key}_mean"], agg[f"{key}_std"], agg["seeds"]
    if std is None:
        return f"{mean:.4f} ± n/a (1 seed)"
    return f"{mean:.4f} ± {std:.4f} ({seeds} seeds)"


def _interval(agg: dict[str, Any]) -> str:
    ci = agg.get("val_top1_ci95")
    if not ci:
        return "n/a"
    return f"[{ci['low']:.4f}, {ci['high']:.4f}] ({ci.get('split', '?')}, n = {ci.get('n', '?')})"


SPREAD_NOTE = (
    "Spread: mean ± sample standard deviation over training seeds (n seeds); one seed has none (n/a). The 95% "
    "interval over products (sampling error of the evaluated products) needs holdout evaluation: n/a until a run "
    "carries one."
)


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
    from prodcat.report.markup import png_data_uri

    figure = out / f"{name}.png"  # embedded: the page stands alone like the report
    source = png_data_uri(figure) if figure.is_file() else figure.name
    atomic_write_text(out / f"{name}.html", _html_page(title, source, headers, rows, notes))


def _band(ax: Any, x: np.ndarray, mean: np.ndarray, std: np.ndarray | None, label: str) -> None:
    (line,) = ax.plot(x, mean, marker=".", label=label)
    if std is not None:
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)


# -- compare --------------------------------------------------------------------------------------------------------
COMPARE_HEADERS = (
    "loss",
    "optimizer",
    "val top-1: mean ± std over seeds",
    "95% CI over products",
    "n (val images)",
    "val top-5",
    "val loss",
    "s / epoch",
    "ms / step",
    "peak GPU (MB)",
)  # peak RSS stays in the JSON only: in one process it is the process's high-water mark, the same for every run


def _arm_label(loss: str, optimizer: str) -> str:
    return f"{loss}, {optimizer}"


def _compare_row(agg: dict[str, Any]) -> list[str]:
    return [
        agg["loss"],
        agg["optimizer"],
        _spread(agg),
        _interval(agg),
        str(agg["val_rows"]),
        f"{agg['val_top5_mean']:.4f}",
        f"{agg['val_loss_mean']:.4f}",
        _fmt(agg["seconds_per_epoch_mean"]),
        _fmt(agg["step_seconds_mean"], 1000, 2),
        _fmt(agg["peak_cuda_mb_max"], digits=0),
    ]


def _plot_compare(path: Path, runs_by_arm: dict[str, list[dict[str, Any]]], title: str) -> None:
    from prodcat.report.figures import png_figure

    with png_figure(path, 1, 2, figsize=(11, 4.2)) as (figure, axes):
        for label, runs in runs_by_arm.items():
            for ax, key in zip(axes, ("step", TIME_KEY), strict=True):
                _band(ax, *_curve(runs, key), f"{label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        for ax, label in zip(axes, ("step", TIME_LABEL), strict=True):
            ax.set(xlabel=label, ylabel="val top-1 (images, full softmax)", title=f"accuracy vs {label.split(' (')[0]}")
            ax.legend(fontsize="small")
        figure.suptitle(title)


def _compare_notes(
    head: str, store: str, epochs: float, batch_size: int, seeds: int, num_sampled: int, cells: list[tuple[str, str]]
) -> list[str]:
    optimizers = list(dict.fromkeys(name for _, name in cells))
    if len(optimizers) == 1:
        factor = f"the same optimizer for every loss: {optimizers[0]}"
    else:
        by_loss = {loss: [name for other, name in cells if other == loss] for loss, _ in cells}
        factor = "optimizer as a second factor: " + "; ".join(
            f"{loss} with {', '.join(n)}" for loss, n in by_loss.items()
        )
    return [
        f"Same head ({head}), feature store ({store}), {epochs:g} epochs, batch {batch_size}, seeds 0..{seeds - 1}; "
        f"{factor}; sampled softmax uses {num_sampled} negatives.",
        "Accuracy: image-level top-1 on the val split with the full softmax over all classes, after the last step "
        "(no checkpoint picked on val). Curves against training seconds leave validation and checkpoints out.",
        SPREAD_NOTE,
    ]


def compare(config: CompareConfig) -> ExperimentResult:
    """Train `config.head` with each loss (x each optimizer) under the same budget and seeds 0..seeds-1; report under
    `W/reports/compare/`, with the config beside it (config.json). `optimizer` is held fixed across arms (default
    TrainConfig's); `optimizers` makes it a second factor (every loss with every optimizer); `arms`, (loss,
    optimizer) pairs, picks cells of that grid instead (e.g. the optimizer factor on two losses only). `note` is added
    to the report (e.g. "demo data is synthetic"). Returns the report folder and the run folders keyed by (loss,
    optimizer, seed)."""
    workdir, store, head, epochs, seeds = config.workdir, config.store, config.head, config.epochs, config.seeds
    num_sampled, batch_size, isolate, note = config.num_sampled, config.batch_size, config.isolate, config.note
    require_store(workdir, store)
    if config.arms:
        names = _resolve_optimizers(None, [name for _, name in config.arms])
        cells = list(dict.fromkeys(config.arms))
    else:
        names = _resolve_optimizers(config.optimizer, config.optimizers)
        cells = [(loss, name) for loss in config.losses for name in names]
    base = dict(workdir=str(workdir), store=store, head=head, epochs=epochs, num_sampled=num_sampled)
    runs_by_arm: dict[str, list[dict[str, Any]]] = {}
    run_dirs: dict[RunKey, Path] = {}
    for loss, name in cells:
        runs = []
        for seed in range(seeds):
            run_name = f"compare-{loss}-{name}-s{seed}"
            train_config = TrainConfig(
                loss=loss, optimizer=name, seed=seed, batch_size=batch_size, run_name=run_name, **base
            )
            runs.append(_run(train_config, isolate))
            run_dirs[(loss, name, seed)] = runs[-1]["dir"]
        runs_by_arm[_arm_label(loss, name)] = runs
    out = WorkPaths(workdir).report("compare")
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")
    aggregates = {
        _arm_label(loss, name): {"loss": loss, "optimizer": name, **_aggregate(runs_by_arm[_arm_label(loss, name)])}
        for loss, name in cells
    }
    settings = {
        **{k: v for k, v in base.items() if k != "workdir"},
        "losses": list(dict.fromkeys(loss for loss, _ in cells)),
        "optimizers": list(names),
        "arms": [list(cell) for cell in cells],
        "seeds": seeds,
        "batch_size": batch_size,
        "isolated_processes": isolate,
    }
    notes = _compare_notes(head, store, epochs, batch_size, seeds, num_sampled, cells)
    notes.append(
        "Peak RSS (compare.json only): each run's own process (max over seeds)."
        if isolate
        else "Peak RSS (compare.json only): runs shared one process, so it is the process peak up to that run."
    )
    notes += [note] if note else []
    write_json(
        out / "compare.json",
        {
            "settings": settings,
            # Keyed by "loss, optimizer"; each entry also names both (the report's loss column shows the key).
            "losses": aggregates,
            "curves": {label: _curves_json(runs) for label, runs in runs_by_arm.items()},
            "notes": notes,
        },
    )
    factor = "loss x optimizer" if len(names) > 1 else f"loss comparison, {names[0]}"
    _plot_compare(out / "compare.png", runs_by_arm, f"{head} head on {store}: {factor}")
    rows = [_compare_row(agg) for agg in aggregates.values()]
    _write_tables(out, "compare", f"{factor.capitalize()}: {head} head on {store}", COMPARE_HEADERS, rows, notes)
    return ExperimentResult(out, run_dirs)


# -- sweep ----------------------------------------------------------------------------------------------------------
SWEEP_HEADERS = (
    "negatives K",
    "optimizer",
    "val top-1: mean ± std over seeds",
    "95% CI over products",
    "n (val images)",
    "val top-5",
    "val loss",
    "ms / step",
    "s / epoch",
)


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


def _sweep_row(label: str, optimizer: str, agg: dict[str, Any]) -> list[str]:
    return [
        label,
        optimizer,
        _spread(agg),
        _interval(agg),
        str(agg["val_rows"]),
        f"{agg['val_top5_mean']:.4f}",
        f"{agg['val_loss_mean']:.4f}",
        _fmt(agg["step_seconds_mean"], 1000, 2),
        _fmt(agg["seconds_per_epoch_mean"]),
    ]


def _k_ticks(ax: Any, ks: Sequence[int]) -> None:
    """Ticks at the K values tried (2, 4, 8, 16, 32) on the log axis, written as plain numbers."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax.xaxis.set_major_locator(FixedLocator(list(ks)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())


def _plot_sweep(path: Path, points: list[dict[str, Any]], reference: dict[str, Any], optimizer: str, title: str) -> Any:
    """Accuracy and step time against K; returns the matplotlib Figure (already saved to `path`)."""
    from prodcat.report.figures import png_figure

    ks = [p["num_sampled"] for p in points]
    stds = [p["val_top1_std"] for p in points]
    with png_figure(path, 1, 2, figsize=(11, 4.2)) as (figure, (acc_axes, time_axes)):
        acc_axes.errorbar(
            ks,
            [p["val_top1_mean"] for p in points],
            yerr=None if None in stds else stds,  # one seed: no error bars rather than zero-length ones
            marker="o",
            capsize=3,
            label=f"sampled softmax, {optimizer}",
        )
        reference_label = f"full softmax, {optimizer}"
        acc_axes.axhline(reference["val_top1_mean"], linestyle="--", color="#555555", label=reference_label)
        acc_axes.set(
            xscale="log", xlabel="sampled negatives K", ylabel="val top-1 (images, full softmax)", title="accuracy vs K"
        )
        step_ms = [1000 * (p["step_seconds_mean"] or np.nan) for p in points]
        time_axes.plot(ks, step_ms, marker="o", label=f"sampled softmax, {optimizer}")
        if reference["step_seconds_mean"] is not None:
            reference_ms = 1000 * reference["step_seconds_mean"]
            time_axes.axhline(reference_ms, linestyle="--", color="#555555", label=reference_label)
        time_axes.set(xscale="log", xlabel="sampled negatives K", ylabel="ms per training step", title="step time vs K")
        for ax in (acc_axes, time_axes):
            _k_ticks(ax, ks)
            ax.legend()
        figure.suptitle(title)
    return figure


def sweep(config: SweepConfig) -> ExperimentResult:
    """Sampled softmax for each K plus the full softmax as reference, all with the same optimizer (default
    TrainConfig's); report under `W/reports/sweep/`, with the config beside it (config.json)."""
    workdir, store, head, sampler, epochs = config.workdir, config.store, config.head, config.sampler, config.epochs
    seeds, batch_size, note, isolate = config.seeds, config.batch_size, config.note, config.isolate
    require_store(workdir, store)
    (name,) = _resolve_optimizers(config.optimizer, None)
    paths = WorkPaths(workdir)
    num_classes = Taxonomy.load(paths.taxonomy).num_classes
    values, clip_notes = _clip_negatives(config.num_sampled, num_classes)
    base = dict(workdir=str(workdir), store=store, head=head, epochs=epochs, batch_size=batch_size, optimizer=name)
    run_dirs: dict[RunKey, Path] = {}

    def arm(loss: str, label: str, **extra: Any) -> dict[str, Any]:
        runs = []
        for seed in range(seeds):
            train_config = TrainConfig(loss=loss, seed=seed, run_name=f"sweep-{label}-{name}-s{seed}", **extra, **base)
            runs.append(_run(train_config, isolate))
            run_dirs[(f"sampled-{label}" if loss == "sampled" else label, name, seed)] = runs[-1]["dir"]
        return _aggregate(runs)

    points = [{"num_sampled": k, **arm("sampled", f"k{k}", num_sampled=k, sampler=sampler)} for k in values]
    reference = arm("softmax", "softmax")
    out = paths.report("sweep")
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")
    notes = [
        f"{head} head on {store}, {sampler} sampler, {epochs:g} epochs, batch {batch_size}, {num_classes} classes, "
        f"seeds 0..{seeds - 1}; every point and the full-softmax reference use the same optimizer ({name}); "
        "accuracy: image-level top-1 on val with the full softmax, after the last step.",
        SPREAD_NOTE,
        *clip_notes,
        *([note] if note else []),
    ]
    settings = {
        "store": store,
        "head": head,
        "num_sampled": list(config.num_sampled),
        "sampler": sampler,
        "optimizer": name,
        "epochs": epochs,
        "seeds": seeds,
        "batch_size": batch_size,
    }
    write_json(
        out / "sweep.json",
        {"settings": settings, "num_classes": num_classes, "points": points, "reference": reference, "notes": notes},
    )
    _plot_sweep(out / "sweep.png", points, reference, name, f"{head} head on {store}: negatives sweep ({name})")
    rows = [_sweep_row(str(p["num_sampled"]), name, p) for p in points] + [_sweep_row("full softmax", name, reference)]
    title = f"Sampled-softmax sweep ({name}): {head} head on {store}"
    _write_tables(out, "sweep", title, SWEEP_HEADERS, rows, notes)
    return ExperimentResult(out, run_dirs)
