"""Train a head on cached features: setup -> fit -> validate.

- Data: a split's rows are batched in an order that is a pure function of (seed, epoch), so a resumed run sees
  exactly the batches an uninterrupted one would. Splits under `memory_limit_gb` are read once (onto the GPU when
  training there); larger ones are read batch by batch from the memory-mapped store by a small thread pool that
  keeps a few batches in flight ahead of the step.
- Randomness inside a step (dropout, sampled negatives) comes from torch's global RNG re-seeded from (seed, step),
  so it does not depend on what ran before: resume is exact, and every rank draws the same negatives.
- Distributed (torchrun): each rank takes a disjoint slice of every global batch of `batch_size` rows, in the same
  order as one process would; its mean loss is scaled by (local rows / global rows) * world size so DDP's gradient
  average equals the single-process gradient. DDP cannot all-reduce the sparse gradients of the row-wise optimizer,
  so under DDP the sampled output layer gets dense gradients, but the same row-wise update rule (rows with a zero
  gradient count as untouched, see model/optim.py): the optimizer never changes with the launch (rank 0 writes
  every file).
- The optimizer is `config.optimizer` for every loss and head; nothing switches it behind the user's back.
- Validation always scores the FULL softmax over all classes, whatever loss trains the head.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import resource
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist  # not `dist`: Run.dist is this process's DistInfo
import torch.nn.functional as F
from torch import nn

from prodcat.checkpoint import (
    CheckpointError,
    build_model,
    checkpoint_dir,
    link_checkpoint,
    load_training_state,
    non_finite_tensor,
    resolve_resume,
    save_checkpoint,
)
from prodcat.config import ConfigError, TrainConfig, save_config
from prodcat.data.taxonomy import Taxonomy
from prodcat.distributed import DistInfo, cleanup, init_distributed
from prodcat.errors import require_store
from prodcat.features.loaders import FeatureLoader
from prodcat.features.store import FeatureStore, StoreError
from prodcat.paths import TAXONOMY_FILE, WorkPaths
from prodcat.predict.run import save_extraction
from prodcat.utils import atomic_write_bytes, atomic_write_text, get_logger, progress, read_json, write_json

__all__ = [
    "TrainingDiverged",
    "train",
    "setup",
    "fit",
    "validate",
    "StepPlan",
    "lr_at",
    "read_metrics",
    "run_summary",
]

log = get_logger("prodcat.train.loop")


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; that state was not saved."""


# Fields that may change between a run and its resumption without changing what is computed.
SESSION_FIELDS = (
    "resume",
    "overwrite",
    "stop_after",
    "max_seconds",
    "eval_every",
    "workdir",
    "distributed",
    "device",
    "memory_limit_gb",
)


# -- schedule and batch order ----------------------------------------------------------------------------------------
def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to 0 at `total_steps` (a pure function of step)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


@dataclasses.dataclass
class StepPlan:
    """Which rows each step reads: a per-epoch permutation seeded by (seed, epoch), cut into global batches."""

    rows: int
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    seed: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @classmethod
    def create(cls, rows: int, config: TrainConfig, rank: int = 0, world_size: int = 1) -> StepPlan:
        if rows < world_size:
            raise StoreError(f"the train split has {rows} rows, fewer than the {world_size} ranks")
        batch = min(config.batch_size, rows)
        steps_per_epoch = -(-rows // batch)
        if 0 < rows % batch < world_size:  # a last batch too small to give every rank a row is dropped
            steps_per_epoch -= 1
        total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
        # Warm-up never takes more than a fifth of the run (the default 50 steps would swallow a tiny run).
        warmup = min(config.warmup_steps, total // 5)
        return cls(rows, batch, steps_per_epoch, total, warmup, config.seed, rank, world_size)

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch

    def global_batch(self, step: int) -> np.ndarray:
        """Positions (into the split) of the rows of global batch `step`."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.rows)
            self._epoch = epoch
        # Sorted within the batch: the same rows, but reads walk each memory-mapped shard forward.
        return np.sort(self._order[index * self.batch_size : (index + 1) * self.batch_size])

    def global_rows(self, step: int) -> int:
        """Size of global batch `step` (the last one of an epoch may be short)."""
        index = step % self.steps_per_epoch
        return min(self.batch_size, self.rows - index * self.batch_size)

    def local_batch(self, step: int) -> np.ndarray:
        """This rank's contiguous slice of global batch `step`."""
        return np.array_split(self.global_batch(step), self.world_size)[self.rank]


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


# -- data -------------------------------------------------------------------------------------------------------------


def _split_rows(store: FeatureStore, split: str, num_classes: int) -> np.ndarray:
    rows = store.split_indices(split)
    if len(rows) == 0:
        raise StoreError(f"{store.path}: the {split!r} split has no valid rows")
    labels = store.column("label")[rows]
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise StoreError(
            f"{store.path}: row {int(rows[bad[0]])} of split {split!r} has label {int(labels[bad[0]])}, "
            f"outside the taxonomy's 0..{num_classes - 1}"
        )
    return rows


# -- metrics log and figure -----------------------------------------------------------------------------------------
def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of a run's metrics.jsonl (empty when there is none)."""
    import json

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _truncate_metrics(run_dir: Path, last_step: int | None) -> None:
    """Keep the lines up to the resumed step (all gone for a fresh run), so curves never double back."""
    import json

    kept = [] if last_step is None else [m for m in read_metrics(run_dir) if m["step"] <= last_step]
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in kept))


def _append_metrics(run_dir: Path, line: dict[str, Any]) -> None:
    import json

    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


# -- setup ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """Everything `fit` needs, built by `setup`."""

    config: TrainConfig
    run_dir: Path
    dist: DistInfo
    device: torch.device
    store: FeatureStore
    taxonomy: Taxonomy
    model: nn.Module  # the classifier (what checkpoints hold)
    step_module: nn.Module  # computes the training loss; DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    plan: StepPlan
    train_data: FeatureLoader
    val_data: FeatureLoader
    sparse_output: bool
    step: int = 0
    elapsed: float = 0.0  # seconds of earlier sessions
    train_seconds: float = 0.0
    best: dict[str, Any] | None = None
    last_eval: dict[str, Any] | None = None
    owns_process_group: bool = False


class _LossModule(nn.Module):
    """DDP hooks `forward`; the classifier's training objective is `loss`, so wrap it as this module's forward."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, features: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier.loss(features, targets)


def _device(config: TrainConfig, info: DistInfo) -> torch.device:
    if info.enabled or config.device == "auto":
        return info.device
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {config.device!r} asked for but CUDA is not available")
    return device


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with this set


def _sparse_output(config: TrainConfig, info: DistInfo) -> bool:
    """Sparse gradients for the sampled output layer, when the chosen optimizer is row-wise (a step then costs
    O((batch + K) * H), not O(C * H), which is the point of sampling). Never under DDP, which cannot all-reduce
    sparse gradients: the gradients are then dense, the update rule is the same."""
    from prodcat.model import rowwise_output

    wanted = rowwise_output(config.optimizer) and config.loss == "sampled"
    if wanted and info.enabled:
        log.info("%s under DDP: dense output gradients, same row-wise update rule", config.optimizer)
    return wanted and not info.enabled


def _saved_optimizer(saved: dict[str, Any]) -> str:
    """The optimizer a saved config trained with. Configs from before the explicit choice switched the sampled
    output layer to row-wise updates on their own (`sparse_output`, None = auto, never under DDP)."""
    if "sparse_output" not in saved:
        return saved["optimizer"]
    auto = saved["sparse_output"] is None and saved.get("loss") == "sampled"
    rowwise = (auto or saved["sparse_output"] is True) and not saved.get("distributed")
    return f"rowwise_{saved['optimizer']}" if rowwise else saved["optimizer"]


def _check_resumable(config: TrainConfig, saved: dict[str, Any]) -> None:
    current = _config_dict(config)
    if "optimizer" in saved:
        saved = {**saved, "optimizer": _saved_optimizer(saved)}
    differing = [k for k in current if k not in SESSION_FIELDS and k in saved and saved[k] != current[k]]
    if differing:
        raise ConfigError(
            f"cannot resume: the config differs from the checkpoint's in {', '.join(differing)} "
            f"(saved {[saved[k] for k in differing]}, now {[current[k] for k in differing]})"
        )


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _kept_config(config: TrainConfig) -> TrainConfig:
    """The config as the run folder keeps it: workdir absolute, so the run reads the same from any directory."""
    return dataclasses.replace(config, workdir=os.path.abspath(config.workdir))


def setup(config: TrainConfig) -> Run:
    """Process group, seeds, store and taxonomy, classifier, optimizer, data, and the resumed state if asked."""
    owns_group = not (torch_dist.is_available() and torch_dist.is_initialized())
    info = init_distributed(config.distributed)
    device = _device(config, info)
    _seed_everything(config.seed)
    paths = WorkPaths(config.workdir)
    store = FeatureStore.open(paths.feature_store(config.store))
    taxonomy = Taxonomy.load(paths.taxonomy)
    train_rows = _split_rows(store, "train", taxonomy.num_classes)
    # The train split's own label counts (not the catalog's, which include val and holdout products).
    prior_counts = np.bincount(store.column("label")[train_rows].astype(np.int64), minlength=taxonomy.num_classes)
    model = build_model(config, store.feature_shape, taxonomy, prior_counts=prior_counts).to(device)
    sparse = _sparse_output(config, info)
    optimizer = _build_optimizer(model, config, sparse)
    limit = config.memory_limit_gb * 1e9
    train_data = _loader(model, store, train_rows, device, limit)
    run = Run(
        config=config,
        run_dir=paths.run(config.name),
        dist=info,
        device=device,
        store=store,
        taxonomy=taxonomy,
        model=model,
        step_module=_LossModule(model),
        optimizer=optimizer,
        plan=StepPlan.create(len(train_data), config, info.rank, info.world_size),
        train_data=train_data,
        val_data=_loader(model, store, _split_rows(store, "val", taxonomy.num_classes), device, limit),
        sparse_output=sparse,
        owns_process_group=owns_group and info.enabled,
    )
    _restore_or_start(run, paths)
    if info.enabled:
        run.step_module = nn.parallel.DistributedDataParallel(
            run.step_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    return run


def _loader(
    model: nn.Module, store: FeatureStore, rows: np.ndarray, device: torch.device, limit: float
) -> FeatureLoader:
    """Rows for a per-picture head; whole products (padded, with a picture mask) for a product head, whose steps,
    batch size and validation then count products."""
    if getattr(model, "reads_products", False):
        from prodcat.features.products import ProductLoader

        return ProductLoader(store, rows, device, limit)
    return FeatureLoader(store, rows, device, limit)


def _build_optimizer(model: nn.Module, config: TrainConfig, sparse: bool) -> torch.optim.Optimizer:
    from prodcat.model import build_optimizer

    return build_optimizer(model, config.optimizer, config.lr, config.weight_decay, config.momentum, sparse_grad=sparse)


def _restore_or_start(run: Run, paths: WorkPaths) -> None:
    """Resume from `last` (--resume), or start fresh where no earlier run would be lost (or --overwrite says so).
    Every check runs before anything in the run folder is written or deleted."""
    meta = _resume(run) if run.config.resume else None
    if meta is None and not run.config.resume:
        earlier = _earlier_outputs(run.run_dir)
        if earlier and not run.config.overwrite:
            raise ConfigError(
                f"{run.run_dir} already holds a run ({', '.join(earlier)}): pass --resume to continue it, "
                "--overwrite to delete it and start over, or choose another --run-name"
            )
    if run.dist.is_main:
        if meta is None and run.config.overwrite:
            _clear_earlier_run(run.run_dir)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        # What prediction needs from the workdir, copied into the run (prodcat.predict.run): it stands alone.
        save_config(_kept_config(run.config), run.run_dir / "config.json")
        atomic_write_bytes(run.run_dir / TAXONOMY_FILE, paths.taxonomy.read_bytes())
        save_extraction(run.run_dir, paths.root, run.config.store)
        _truncate_metrics(run.run_dir, run.step if meta is not None else None)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)


def _resume(run: Run) -> dict[str, Any] | None:
    """Load `last` into the run (None: the run has no checkpoint yet). An unusable one raises, deleting nothing."""
    try:
        meta = resolve_resume(run.run_dir)
        if meta is None:
            log.info("no checkpoint in %s; starting fresh", run.run_dir)
            return None
        _check_resumable(run.config, meta["config"])
        _check_same_plan(run, meta)
        load_training_state(run.run_dir, run.model, run.optimizer, "last", run.device)
    except CheckpointError as error:
        raise CheckpointError(f"{error}; nothing was deleted: restore it, or start over with --overwrite") from None
    run.step, run.elapsed, run.train_seconds = int(meta["step"]), meta["elapsed_seconds"], meta["train_seconds"]
    run.best, run.last_eval = meta.get("best"), meta.get("metrics")
    log.info("resuming %s from step %d", run.run_dir, run.step)
    return meta


def _check_same_plan(run: Run, meta: dict[str, Any]) -> None:
    """The step plan is a function of the config and the train split's size: a different one means the store
    changed under the run (re-extracted), and the resumed batches would not be the ones the run started with."""
    sidecar = checkpoint_dir(run.run_dir) / "last.json"
    plan = run.plan
    now = {"steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps, "warmup_steps": plan.warmup_steps}
    now.update(batch_size=plan.batch_size, sparse_output=run.sparse_output)
    differing = {key: (meta.get(key), value) for key, value in now.items() if meta.get(key) != value}
    if differing:
        saved_now = ", ".join(f"{key} {saved} -> {value}" for key, (saved, value) in differing.items())
        raise CheckpointError(
            f"{sidecar}: cannot resume, the run's plan changed ({saved_now}): was the feature store rebuilt, "
            "or the world size changed?"
        )
    if meta.get("world_size") != run.dist.world_size or meta.get("torch") != torch.__version__:
        log.warning(
            "resuming a run saved on %s rank(s) with torch %s on %d with torch %s: not bit-identical to an "
            "uninterrupted run",
            meta.get("world_size"),
            meta.get("torch"),
            run.dist.world_size,
            torch.__version__,
        )


def _earlier_outputs(run_dir: Path) -> list[str]:
    """What an earlier session left in `run_dir` that starting over would delete or overwrite."""
    found = []
    directory = checkpoint_dir(run_dir)
    if directory.is_dir() and any(directory.iterdir()):
        found.append(f"{directory.name}/")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(metrics.name)
    found += [name for name in ("summary.json", "eval") if (run_dir / name).exists()]
    return found


def _clear_earlier_run(run_dir: Path) -> None:
    """--overwrite: remove what an earlier run made (checkpoints, summary, curves, evaluation); names only, so a
    folder the user put beside them stays."""
    removed = []
    for name in ("checkpoints", "eval"):
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)
            removed.append(name)
    for name in ("summary.json", "curves.png", "metrics.jsonl", "twins.parquet"):  # twins: written with eval/'s choice
        if (run_dir / name).is_file():
            (run_dir / name).unlink()
            removed.append(name)
    if removed:
        log.warning("%s: overwrite: removed the earlier run's %s", run_dir, ", ".join(removed))


# -- fit and validate -----------------------------------------------------------------------------------------------
def _autocast(run: Run) -> contextlib.AbstractContextManager[Any]:
    if run.config.precision == "bfloat16":
        return torch.autocast(run.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _eval_batch_size(num_classes: int) -> int:
    return int(min(4096, max(64, 2**26 // num_classes)))  # the (N, C) log-probs stay around 256 MB


@torch.no_grad()
def validate(run: Run) -> dict[str, float]:
    """Full-softmax loss, top-1 and top-5 over the whole val split (rows shared out across ranks)."""
    model, data = run.model, run.val_data
    was_training = model.training
    model.eval()
    positions = np.arange(len(data))[run.dist.rank :: run.dist.world_size]
    chunks = np.array_split(positions, max(1, -(-len(positions) // _eval_batch_size(run.taxonomy.num_classes))))
    sums = torch.zeros(4, dtype=torch.float64, device=run.device)  # loss sum, top-1 hits, top-5 hits, rows
    top_k = min(5, run.taxonomy.num_classes)
    for features, targets in data.batches(c for c in chunks if len(c)):
        with _autocast(run):
            log_probs = model(features, targets.get("mask")).float()
        leaf = targets["leaf"]
        hits = log_probs.topk(top_k, dim=1).indices == leaf[:, None]
        sums[0] += F.nll_loss(log_probs, leaf, reduction="sum").double()
        sums[1] += hits[:, 0].sum()
        sums[2] += hits.any(dim=1).sum()
        sums[3] += len(leaf)
    if run.dist.enabled:
        torch_dist.all_reduce(sums)
    model.train(was_training)
    loss_sum, top1, top5, count = sums.tolist()
    return {"val_loss": loss_sum / count, "val_top1": top1 / count, "val_top5": top5 / count, "val_rows": int(count)}


def _train_step(run: Run, features: torch.Tensor, targets: dict[str, torch.Tensor], global_rows: int) -> torch.Tensor:
    """One optimizer step; returns the detached sum of this rank's per-row losses."""
    lr = lr_at(run.step, run.config.lr, run.plan.warmup_steps, run.plan.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(_step_seed(run.config.seed, run.step))
    with _autocast(run):
        loss = run.step_module(features, targets)
    rows = features.shape[0]
    if run.dist.enabled:  # DDP averages gradients over ranks; make that the mean over the global batch
        (loss * (rows / global_rows * run.dist.world_size)).backward()
    else:
        loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return loss.detach().float() * rows


def _should_stop(run: Run, session_start: float) -> bool:
    config = run.config
    stop = run.step >= run.plan.total_steps or (config.stop_after is not None and run.step >= config.stop_after)
    if config.max_seconds is not None:
        late = torch.tensor(float(time.perf_counter() - session_start + run.elapsed > config.max_seconds))
        if run.dist.enabled:  # every rank must stop at the same step
            late = late.to(run.device)
            torch_dist.all_reduce(late, op=torch_dist.ReduceOp.MAX)
        stop = stop or bool(late.item())
    return stop


@dataclasses.dataclass
class _Interval:
    """Training loss and throughput since the last evaluation."""

    loss_sum: torch.Tensor | None = None
    rows: int = 0
    steps: int = 0
    seconds: float = 0.0

    def add(self, loss_sum: torch.Tensor, rows: int, seconds: float) -> None:
        self.loss_sum = loss_sum if self.loss_sum is None else self.loss_sum + loss_sum
        self.rows, self.steps, self.seconds = self.rows + rows, self.steps + 1, self.seconds + seconds


def _drain(device: torch.device) -> float:
    """Seconds until the steps still queued on a GPU are done: training time, which validation would absorb."""
    if device.type != "cuda":
        return 0.0
    start = time.perf_counter()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def fit(run: Run) -> dict[str, Any]:
    """The training loop: steps, periodic validation and checkpoints, until the plan (or a stop) ends it."""
    session_start = time.perf_counter()
    # the last batch of an epoch may be short: count real rows so the bar ends at 100%
    remaining = sum(run.plan.global_rows(step) for step in range(run.step, run.plan.total_steps))
    bar = progress(
        total=remaining, desc=f"train {run.config.name}", unit="ex", disable=None if run.dist.is_main else True
    )
    if run.step == 0:
        _evaluate_and_save(run, _Interval(), session_start)
    interval, step_times = _Interval(), []
    positions = (run.plan.local_batch(step) for step in range(run.step, run.plan.total_steps))
    batches = run.train_data.batches(positions)
    while not _should_stop(run, session_start):
        tick = time.perf_counter()
        features, targets = next(batches)
        global_rows = run.plan.global_rows(run.step)
        loss_sum = _train_step(run, features, targets, global_rows)
        interval.add(loss_sum, global_rows, time.perf_counter() - tick)
        bar.update(global_rows)  # type: ignore[attr-defined]
        if run.step % run.config.eval_every == 0:
            interval.seconds += _drain(run.device)
            step_times.append(interval.seconds / interval.steps)
            line = _evaluate_and_save(run, interval, session_start)
            bar.set_postfix(loss=f"{line['train_loss']:.3f}", top1=f"{line['val_top1']:.3f}")  # type: ignore
            interval = _Interval()
    batches.close()
    bar.close()  # type: ignore[attr-defined]
    if interval.steps:
        interval.seconds += _drain(run.device)
        step_times.append(interval.seconds / interval.steps)
        _evaluate_and_save(run, interval, session_start)
    return _finish(run, session_start, step_times)


def _evaluate_and_save(run: Run, interval: _Interval, session_start: float) -> dict[str, Any]:
    """Validate, append a metrics line, and (after training steps) save `last` and, when better, `best`."""
    run.train_seconds += interval.seconds
    train_loss = None
    if interval.loss_sum is not None:
        total = interval.loss_sum.double().reshape(1)
        if run.dist.enabled:
            torch_dist.all_reduce(total)
        train_loss = float(total.item()) / interval.rows
    metrics = validate(run)
    _check_finite(run, train_loss, metrics["val_loss"])
    line = {
        "step": run.step,
        "epoch": run.plan.epoch(run.step),
        "seconds": run.elapsed + time.perf_counter() - session_start,
        "train_seconds": run.train_seconds,
        "lr": lr_at(max(0, run.step - 1), run.config.lr, run.plan.warmup_steps, run.plan.total_steps),
        "train_loss": train_loss,
        **metrics,
        "examples_per_s": interval.rows / interval.seconds if interval.seconds > 0 else None,
    }
    run.last_eval = line
    improved = run.step > 0 and (run.best is None or metrics["val_top1"] > run.best["value"])
    if improved:
        run.best = {"metric": "val_top1", "value": metrics["val_top1"], "step": run.step}
    if run.dist.is_main:
        _append_metrics(run.run_dir, line)
        if run.step > 0:
            save_checkpoint(run.run_dir, "last", run.model, run.optimizer, _meta(run, line))
            if improved:
                link_checkpoint(run.run_dir, "last", "best")
    return line


def _check_finite(run: Run, train_loss: float | None, val_loss: float) -> None:
    """Stop before a diverged state is saved. Checked at each evaluation only (the loss sum stays on the device in
    between), so a NaN is caught at most `eval_every` steps late, and always before a checkpoint. The losses are
    all-reduced and the weights are the same on every rank, so under DDP all ranks stop together."""
    problems = [
        f"{name} {value}"
        for name, value in (("train loss", train_loss), ("val loss", val_loss))
        if value is not None and not math.isfinite(value)
    ]
    tensor = non_finite_tensor(run.model)
    if tensor is not None:
        problems.append(f"non-finite weights in {tensor!r}")
    if not problems:
        return
    saved = run.last_eval["step"] if run.last_eval and run.last_eval["step"] > 0 else None
    kept = f"checkpoints keep step {saved}" if saved is not None else "no checkpoint was written"
    raise TrainingDiverged(
        f"{run.run_dir}: training diverged by step {run.step} ({'; '.join(problems)}) with lr {run.config.lr:g}; "
        f"nothing of it was saved ({kept}). Lower --lr (or raise --warmup-steps) and start over with --overwrite"
    )


def _meta(run: Run, line: dict[str, Any]) -> dict[str, Any]:
    return {
        "step": run.step,
        "elapsed_seconds": line["seconds"],
        "train_seconds": run.train_seconds,
        "best": run.best,
        "metrics": line,
        "in_shape": list(run.store.feature_shape),
        "num_classes": run.taxonomy.num_classes,
        "config": _config_dict(_kept_config(run.config)),
        "taxonomy": TAXONOMY_FILE,
        # read back on resume: a different plan means the store changed under the run
        "steps_per_epoch": run.plan.steps_per_epoch,
        "total_steps": run.plan.total_steps,
        "warmup_steps": run.plan.warmup_steps,
        "batch_size": run.plan.batch_size,
        "world_size": run.dist.world_size,
        "sparse_output": run.sparse_output,  # whether the output gradients were sparse (the rule is config's optimizer)
        "torch": torch.__version__,
    }


def _finish(run: Run, session_start: float, step_times: list[float]) -> dict[str, Any]:
    """summary.json (what compare and sweep read); rank 0 only. The curves are drawn by `prodcat.report.runs` from
    metrics.jsonl: training hands the report plain numbers."""
    epochs = run.plan.epoch(run.step)
    summary = {
        "run": run.config.name,
        "step": run.step,
        "total_steps": run.plan.total_steps,
        "epoch": epochs,
        "complete": run.step >= run.plan.total_steps,
        "final": run.last_eval,
        "best": run.best,
        "seconds": run.elapsed + time.perf_counter() - session_start,
        "train_seconds": run.train_seconds,
        "seconds_per_epoch": run.train_seconds / epochs if epochs > 0 else None,
        "step_seconds": statistics.median(step_times) if step_times else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated(run.device) / 2**20 if run.device.type == "cuda" else None,
        "device": str(run.device),
        "world_size": run.dist.world_size,
        "in_memory": run.train_data.in_memory,
    }
    if run.dist.is_main:
        write_json(run.run_dir / "summary.json", summary)
    return summary


def train(config: TrainConfig) -> Path:
    """Train a head on cached features; returns the run directory `W/runs/<config.name>`."""
    require_store(config.workdir, config.store)  # lists the stores there (or says to ingest / extract first)
    run = setup(config)
    try:
        with _deterministic_cuda() if run.device.type == "cuda" else contextlib.nullcontext():
            summary = fit(run)
        if run.dist.is_main:
            log.info("%s", closing_line(summary))
        return run.run_dir
    finally:
        if run.owns_process_group:
            cleanup(run.dist)


@contextlib.contextmanager
def _deterministic_cuda() -> Iterator[None]:
    """Deterministic CUDA kernels where torch has them (warn where not), restored afterwards. CPU kernels are
    deterministic already, and the switch itself imports torch's compiler stack (seconds), so CPU runs skip it."""
    import torch.utils.deterministic

    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # filling every torch.empty costs bandwidth
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]


def closing_line(summary: dict[str, Any]) -> str:
    """'compare-softmax-adamw-s0: val top-1 0.746 (best 0.751 at step 400), 83 s': the end of one run in a log."""
    final, best = summary.get("final") or {}, summary.get("best") or {}
    text = f"{summary['run']}: val top-1 {final.get('val_top1', float('nan')):.3f}"
    if best and best.get("step") != summary.get("step"):
        text += f" (best {best['value']:.3f} at step {best['step']})"
    return f"{text}, {summary['seconds']:.0f} s"


def run_summary(run_dir: str | Path) -> dict[str, Any]:
    """The summary.json a finished session wrote."""
    return read_json(Path(run_dir) / "summary.json")
