"""Experiments over training runs: loss x optimizer comparison (`compare`) and the number-of-negatives sweep (`sweep`).

Both train ordinary runs (`W/runs/compare-<loss>-<optimizer>-s<seed>`, `W/runs/sweep-k<K>-<optimizer>-s<seed>`,
`W/runs/sweep-softmax-<optimizer>-s<seed>`) and summarise them into `W/reports/<name>/<name>.json`: every number,
plain data. `prodcat.report.experiments` draws the figure and writes the same table as Markdown and as a small HTML
page from that file (the CLI and `prodcat report` call it): experiments never import plotting. Both return an
`ExperimentResult`: the report folder and every run folder, keyed by what varied, so no caller globs run names.

A comparison changes one thing: every arm of `compare` shares head, feature store, budget, seeds and, unless
`optimizers` makes it a second factor, the optimizer; the sweep's full-softmax reference uses the sweep's optimizer.

Select on val, report on the holdout: each run's headline is its product top-1 on the holdout split (n products),
with the checkpoint (best val top-1 during training), product aggregation, tau and T chosen on val exactly as
`prodcat evaluate` chooses them (`evaluate.evaluation.product_hits`). Beside the seed spread (sample standard
deviation over seeds, three by default; one seed has none: "n/a") stands a 95% interval over holdout products: Wilson
for one seed, a bootstrap over products of the per-product mean over seeds otherwise; differences between arms get a
paired bootstrap interval over the same products. The val image top-1 after the last step is kept for the curves
(against training seconds: validation and checkpoints left out); it is where checkpoints get selected, never the
headline.

`compare` trains each run in a fresh (spawned) process by default, so the peak RSS it reports belongs to that run
alone (a process's peak RSS never goes down, so runs sharing one process would inherit the largest before them).
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prodcat.config import CompareConfig, ConfigError, SweepConfig, TrainConfig, save_config
from prodcat.data.taxonomy import Taxonomy
from prodcat.errors import require_store
from prodcat.evaluate.evaluation import ProductHits, bootstrap_ci, product_hits, proportion_ci
from prodcat.features.store import FeatureStore
from prodcat.paths import WorkPaths
from prodcat.train.loop import StepPlan, read_metrics, run_summary, train
from prodcat.utils import get_logger, log_to_file, write_json

__all__ = ["compare", "sweep", "ExperimentResult", "EVALS_PER_RUN", "DEFAULT_SEEDS"]

log = get_logger("prodcat.train.experiments")

EVALS_PER_RUN = 15  # validation points per run: enough for a curve, few enough not to dominate a tiny run
DEFAULT_SEEDS = CompareConfig.seeds  # where a spread is shown, over three seeds unless asked otherwise
TIME_KEY = "train_seconds"  # curves against time use training seconds: validation and checkpoints left out
REPORTED_SPLIT = "holdout"  # every headline number; val is where checkpoints and aggregations are chosen
RESAMPLES = 1000  # bootstrap resamples of the holdout products (as `prodcat evaluate`)

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
    """Train one run (validating about EVALS_PER_RUN times), read back its summary and metrics, and score it on the
    holdout with every choice made on val (its product hits, kept in memory for the intervals)."""
    # compare/sweep own their run names: re-running them retrains each run from scratch (explicitly)
    config = dataclasses.replace(config, eval_every=_eval_every(config), overwrite=True)
    log.info("run %s", config.name)
    if isolate:
        _train_isolated(config)
    else:
        train(config)
    run_dir = WorkPaths(config.workdir).run(config.name)
    hits = product_hits(run_dir, REPORTED_SPLIT)  # choices on val, as `prodcat evaluate` makes them
    return {
        "name": config.name,
        "dir": run_dir,
        "summary": run_summary(run_dir),
        "metrics": read_metrics(run_dir),
        "hits": hits,
    }


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


def _hit_matrix(runs: list[dict[str, Any]]) -> np.ndarray:
    """(seeds, products) 0/1 holdout hits; every run of an experiment is scored on the same products."""
    hits: list[ProductHits] = [r["hits"] for r in runs]
    for run, other in zip(runs[1:], hits[1:], strict=True):
        if not np.array_equal(other.product_id, hits[0].product_id):
            raise RuntimeError(
                f"{run['name']} and {runs[0]['name']} were scored on different {REPORTED_SPLIT} products"
            )
    return np.stack([h.correct for h in hits]).astype(np.float64)


def _holdout(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Holdout product top-1 over seeds: mean, seed std (None for one seed) and the 95% interval over products."""
    matrix = _hit_matrix(runs)
    per_seed = matrix.mean(axis=1).tolist()
    products = matrix.shape[1]
    if len(runs) == 1:
        interval, method = proportion_ci(int(matrix.sum()), products), "Wilson interval over products"
    else:
        per_product = matrix.mean(axis=0)
        interval = bootstrap_ci({"top1": lambda w: float(w @ per_product / w.sum())}, products, RESAMPLES)["top1"]
        method = f"bootstrap over products ({RESAMPLES:,} resamples) of each product's mean over seeds"
    return {
        "holdout_top1_mean": statistics.fmean(per_seed),
        "holdout_top1_std": _std(per_seed),
        "holdout_top1_ci95": interval,
        "holdout_top1_per_seed": per_seed,
        "holdout_products": products,
        "holdout_split": runs[0]["hits"].split,
        "holdout_ci95_method": method,
        "holdout_aggregations": [r["hits"].aggregation for r in runs],
        "holdout_checkpoint_steps": [r["hits"].checkpoint_step for r in runs],
    }


def _differences(arms: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """'A vs B' for every pair of arms, A the later one (the reference trains first): the difference of holdout
    product top-1 (seed means, A - B) with its 95% paired bootstrap interval, both arms on the same resampled
    products, one draw for every pair."""
    means = {label: _hit_matrix(runs).mean(axis=0) for label, runs in arms.items()}
    pairs = [(later, earlier) for earlier, later in itertools.combinations(means, 2)]
    if not pairs:
        return {}
    products = len(next(iter(means.values())))
    gaps = {f"{a} vs {b}": means[a] - means[b] for a, b in pairs}
    stats = {key: (lambda w, gap=gap: float(w @ gap / w.sum())) for key, gap in gaps.items()}
    intervals = bootstrap_ci(stats, products, RESAMPLES)
    return {
        key: {
            "a": a,
            "b": b,
            "change": float(gaps[key].mean()),
            "ci95": intervals[key],
            "n": products,
            "split": REPORTED_SPLIT,
            "method": f"paired bootstrap over products ({RESAMPLES:,} resamples) of the seed means",
        }
        for (a, b), key in zip(pairs, gaps, strict=True)
    }


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Holdout product top-1 over seeds (the headline), the final validation and the cost of each run."""
    finals = [r["summary"]["final"] for r in runs]
    summaries = [r["summary"] for r in runs]
    result: dict[str, Any] = {"runs": [r["name"] for r in runs], "seeds": len(runs), **_holdout(runs)}
    for key in ("val_top1", "val_top5", "val_loss"):
        values = [f[key] for f in finals]
        result[f"{key}_mean"], result[f"{key}_std"] = statistics.fmean(values), _std(values)
    result["val_rows"] = finals[0].get("val_rows")
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


# -- notes (plain text, shown by the report under each table) ---------------------------------------------------------
def _arm_label(loss: str, optimizer: str) -> str:
    return f"{loss}, {optimizer}"


SPREAD_NOTE = (
    "Spread: mean ± sample standard deviation over training seeds (n seeds); one seed has none (n/a). Beside it, the "
    "95% interval over holdout products (the sampling error of the evaluated products, which seeds do not show): "
    "Wilson for one seed, a bootstrap over products of each product's mean over seeds otherwise. Differences between "
    "arms: a paired bootstrap over the same holdout products."
)
ACCURACY_NOTE = (
    "Headline: product top-1 on the holdout split (n products), each run at its best checkpoint by val top-1, with "
    "the product aggregation, tau and T chosen on val as prodcat evaluate chooses them; nothing was tuned on the "
    "holdout. The val columns and the curves are image top-1 on val with the full softmax after the last step (val "
    "is where checkpoints are selected); curves against training seconds leave validation and checkpoints out."
)


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
        ACCURACY_NOTE,
        SPREAD_NOTE,
    ]


# -- compare --------------------------------------------------------------------------------------------------------
def compare(config: CompareConfig) -> ExperimentResult:
    """Train `config.head` with each loss (x each optimizer) under the same budget and seeds 0..seeds-1, evaluate each
    run on the holdout; numbers in `W/reports/compare/compare.json`, the config beside it (config.json). `optimizer`
    is held fixed across arms (default TrainConfig's); `optimizers` makes it a second factor (every loss with every
    optimizer); `arms`, (loss, optimizer) pairs, picks cells of that grid instead (e.g. the optimizer factor on two
    losses only). `note` is added to the report (e.g. "demo data is synthetic"). Returns the report folder and the
    run folders keyed by (loss, optimizer, seed)."""
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
    settings = {
        **{k: v for k, v in base.items() if k != "workdir"},
        "losses": list(dict.fromkeys(loss for loss, _ in cells)),
        "optimizers": list(names),
        "arms": [list(cell) for cell in cells],
        "seeds": seeds,
        "batch_size": batch_size,
        "isolated_processes": isolate,
        "reported_split": REPORTED_SPLIT,
    }
    notes = _compare_notes(head, store, epochs, batch_size, seeds, num_sampled, cells)
    notes.append(
        "Peak RSS (compare.json only): each run's own process (max over seeds)."
        if isolate
        else "Peak RSS (compare.json only): runs shared one process, so it is the process peak up to that run."
    )
    out = WorkPaths(workdir).report("compare")
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")
    _write_compare(out, cells, runs_by_arm, settings, notes + ([note] if note else []))
    return ExperimentResult(out, run_dirs)


def _write_compare(
    out: Path,
    cells: list[tuple[str, str]],
    runs_by_arm: dict[str, list[dict[str, Any]]],
    settings: dict[str, Any],
    notes: list[str],
) -> Path:
    aggregates = {
        _arm_label(loss, name): {"loss": loss, "optimizer": name, **_aggregate(runs_by_arm[_arm_label(loss, name)])}
        for loss, name in cells
    }
    return write_json(
        out / "compare.json",
        {
            "settings": settings,
            # Keyed by "loss, optimizer"; each entry also names both (the report's loss column shows the key).
            "losses": aggregates,
            "differences": _differences(runs_by_arm),  # "A vs B": holdout product top-1, A - B, paired interval
            "curves": {label: _curves_json(runs) for label, runs in runs_by_arm.items()},
            "run_dirs": {r["name"]: str(r["dir"]) for runs in runs_by_arm.values() for r in runs},
            "notes": notes,
        },
    )


# -- sweep ----------------------------------------------------------------------------------------------------------
REFERENCE_LABEL = "full softmax"


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


def sweep(config: SweepConfig) -> ExperimentResult:
    """Sampled softmax for each K plus the full softmax as reference, all with the same optimizer (default
    TrainConfig's), each run evaluated on the holdout; numbers in `W/reports/sweep/sweep.json`, the config beside it
    (config.json)."""
    workdir, store, head, sampler, epochs = config.workdir, config.store, config.head, config.sampler, config.epochs
    seeds, batch_size, note, isolate = config.seeds, config.batch_size, config.note, config.isolate
    require_store(workdir, store)
    (name,) = _resolve_optimizers(config.optimizer, None)
    paths = WorkPaths(workdir)
    num_classes = Taxonomy.load(paths.taxonomy).num_classes
    values, clip_notes = _clip_negatives(config.num_sampled, num_classes)
    base = dict(workdir=str(workdir), store=store, head=head, epochs=epochs, batch_size=batch_size, optimizer=name)
    run_dirs: dict[RunKey, Path] = {}
    arms: dict[str, list[dict[str, Any]]] = {}

    def arm(loss: str, label: str, **extra: Any) -> list[dict[str, Any]]:
        runs = []
        for seed in range(seeds):
            train_config = TrainConfig(loss=loss, seed=seed, run_name=f"sweep-{label}-{name}-s{seed}", **extra, **base)
            runs.append(_run(train_config, isolate))
            run_dirs[(f"sampled-{label}" if loss == "sampled" else label, name, seed)] = runs[-1]["dir"]
        return runs

    for k in values:
        arms[f"K = {k}"] = arm("sampled", f"k{k}", num_sampled=k, sampler=sampler)
    arms[REFERENCE_LABEL] = arm("softmax", "softmax")
    notes = [
        f"{head} head on {store}, {sampler} sampler, {epochs:g} epochs, batch {batch_size}, {num_classes} classes, "
        f"seeds 0..{seeds - 1}; every point and the full-softmax reference use the same optimizer ({name}).",
        *(ACCURACY_NOTE, SPREAD_NOTE, *clip_notes, *([note] if note else [])),
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
        "reported_split": REPORTED_SPLIT,
    }
    out = paths.report("sweep")
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")
    _write_sweep(out, values, arms, {"settings": settings, "num_classes": num_classes, "notes": notes})
    return ExperimentResult(out, run_dirs)


def _write_sweep(out: Path, values: list[int], arms: dict[str, list[dict[str, Any]]], extra: dict[str, Any]) -> Path:
    """sweep.json: a point per K (with its paired difference to the full softmax on the holdout) and the reference."""
    differences = _differences({REFERENCE_LABEL: arms[REFERENCE_LABEL], **arms})  # each K vs the reference
    points = [
        {
            "num_sampled": k,
            **_aggregate(arms[f"K = {k}"]),
            "vs_reference": differences[f"K = {k} vs {REFERENCE_LABEL}"],
        }
        for k in values
    ]
    return write_json(
        out / "sweep.json",
        {
            **extra,
            "points": points,
            "reference": _aggregate(arms[REFERENCE_LABEL]),
            "run_dirs": {r["name"]: str(r["dir"]) for runs in arms.values() for r in runs},
        },
    )
