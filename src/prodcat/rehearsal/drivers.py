"""`prodcat rehearsal` (the real shape, on pictures) and `prodcat rehearsal-full` (the real row counts, no pictures).

Each stage runs in its own process (prodcat.rehearsal.records) and is recorded in W/reports/rehearsal.json, which
is rewritten after every stage, so a run stopped half-way still says what it cost so far.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from prodcat.config import RehearsalConfig
from prodcat.rehearsal.records import StageRecord, machine_info, run_stage
from prodcat.rehearsal.synthetic import STORE_NAME, FullPlan, store_bytes
from prodcat.utils import get_logger, read_json, write_json

__all__ = ["RehearsalPlan", "run_rehearsal", "run_rehearsal_full", "ARMS", "SYNTHETIC_NOTE"]

log = get_logger("prodcat.rehearsal")

SYNTHETIC_NOTE = (
    "Synthetic data (prodcat rehearsal): the numbers show the pipeline's cost and behaviour, not Cdiscount."
)
ARMS: tuple[tuple[str, str], ...] = RehearsalConfig.arms  # (head, loss) pairs
_STAGES = "prodcat.rehearsal.stages"


@dataclasses.dataclass
class RehearsalPlan(RehearsalConfig):
    """The sizes (prodcat.config.RehearsalConfig, where their defaults and help live) and what follows from them."""

    def demo_config(self) -> dict[str, Any]:
        return {"products": self.products, "test_products": self.test_products, "categories": self.categories,
                "taxonomy_csv": self.taxonomy_csv, "category_counts_json": self.counts_json,
                "stock_share": self.stock_share, "seed": 0}  # fmt: skip

    def train_config(self, workdir: str, head: str, loss: str, seed: int) -> dict[str, Any]:
        return {
            "workdir": workdir, "store": "efficientnet_lite0-pooled", "head": head, "loss": loss,
            "optimizer": self.optimizer, "num_sampled": self.num_sampled, "sampler": "log_uniform",
            "epochs": self.epochs, "batch_size": self.batch_size, "eval_every": self.eval_every, "lr": self.lr,
            "seed": seed, "run_name": f"scale-{head}-{loss}-{self.optimizer}-s{seed}", "overwrite": True,
        }  # fmt: skip


class _Recorder:
    """Runs stages and keeps W/reports/rehearsal.json current.

    With `resume`, a stage already recorded as done by an earlier run of the same plan is not run again: its record
    (cost as measured then) and result are reused, so a rehearsal stopped half-way (hours on 2 cores) goes on where
    it stopped. Only the number of seeds may differ from the earlier plan (fewer seeds finish sooner)."""

    RESUMABLE_CHANGES = ("seeds",)

    def __init__(self, workdir: str | Path, kind: str, plan: Any, isolate: bool, resume: bool = False) -> None:
        self.workdir, self.isolate = Path(workdir), isolate
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.records: list[StageRecord] = []
        self.payload: dict[str, Any] = {"kind": kind, "note": SYNTHETIC_NOTE, "plan": dataclasses.asdict(plan),
                                        "machine_before": machine_info(), "stages": [], "results": {}}  # fmt: skip
        self.done: dict[str, dict[str, Any]] = self._earlier(kind) if resume else {}

    @property
    def path(self) -> Path:
        return self.workdir / "reports" / "rehearsal.json"

    def _earlier(self, kind: str) -> dict[str, dict[str, Any]]:
        """The stages an earlier run of the same plan finished, by name (refused in one line when the plan differs)."""
        if not self.path.is_file():
            log.info("--resume: %s not found, starting from the first stage", self.path)
            return {}
        earlier = read_json(self.path)
        plan, before = json.loads(json.dumps(self.payload["plan"])), earlier.get("plan", {})  # tuples read as lists
        changed = sorted(k for k in plan if k not in self.RESUMABLE_CHANGES and before.get(k) != plan[k])
        if earlier.get("kind") != kind or changed:
            field = changed[0] if changed else "kind"
            raise ValueError(
                f"{self.path}: made by a different plan ({field}: {before.get(field)!r} there, "
                f"{plan.get(field)!r} now); resume with the same sizes, or use a new --workdir"
            )
        self.payload["resumed_from"] = {"machine_before": earlier.get("machine_before"),
                                        "stages": [s["name"] for s in earlier.get("stages", [])]}  # fmt: skip
        return {stage["name"]: stage for stage in earlier.get("stages", [])}

    def stage(self, name: str, function: str, **kwargs: Any) -> dict[str, Any]:
        if name in self.done:
            record = StageRecord(**self.done[name])
            log.info("--resume: stage %s was done by the earlier run (%.0f s), not run again", name, record.seconds)
            self.records.append(record)
            self.save()
            return record.details | {"items": record.items, "unit": record.unit}
        try:
            result, record = run_stage(name, f"{_STAGES}:{function}", kwargs, self.workdir, self.isolate)
        except Exception as error:  # the record says where a long run stopped, and why
            self.payload["failed"] = {"stage": name, "error": f"{type(error).__name__}: {error}"}
            self.save()
            raise
        self.records.append(record)
        self.save()
        return result

    def save(self) -> None:
        self.payload["stages"] = [record.as_json() for record in self.records]
        self.payload["machine_after"] = machine_info()
        write_json(self.path, self.payload)


def run_rehearsal(
    workdir: str | Path, plan: RehearsalPlan, isolate: bool = True, resume: bool = False
) -> dict[str, Any]:
    """Demo data of the real shape -> ingest -> explore -> extract -> train every arm x seed -> evaluate on the
    holdout -> predict test.bson with the run best on val -> report; returns the rehearsal record."""
    from prodcat.rehearsal.report import write_at_scale

    rec, work = _Recorder(workdir, "pictures", plan, isolate, resume), str(workdir)
    data_dir = str(Path(workdir) / "data")
    rec.stage("demo data", "demo_data", data_dir=data_dir, config=plan.demo_config())
    rec.stage("ingest", "ingest_stage", data_dir=data_dir, workdir=work, val_fraction=plan.val_fraction,
              holdout_fraction=plan.holdout_fraction)  # fmt: skip
    rec.stage("explore", "explore_stage", workdir=work)
    rec.stage("extract", "extract_stage", workdir=work)
    runs = _train_and_evaluate(rec, work, plan)
    best = max(runs, key=lambda r: runs[r]["train"]["best_val_top1"] or 0.0)  # selected on val, never the holdout
    rec.payload["results"] = {"runs": runs, "best_on_val": best}
    rec.stage("predict test.bson", "predict_bson_stage", run=runs[best]["train"]["run"],
              bson=str(Path(data_dir) / "test.bson"), out=str(Path(workdir) / "submission.csv"))  # fmt: skip
    write_at_scale(workdir, rec.payload | {"stages": [r.as_json() for r in rec.records]})  # so the report links it
    rec.stage("report", "report_stage", workdir=work)
    write_at_scale(workdir, rec.payload | {"stages": [r.as_json() for r in rec.records]})  # with the report's stage
    rec.save()
    return rec.payload


def _train_and_evaluate(rec: _Recorder, work: str, plan: RehearsalPlan) -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {}
    for seed in range(plan.seeds):
        for head, loss in plan.arms:
            config = plan.train_config(work, head, loss, seed)
            trained = rec.stage(f"train {head}/{loss} s{seed}", "train_stage", config=config)
            runs[config["run_name"]] = {"head": head, "loss": loss, "seed": seed, "train": trained}
            rec.payload["results"]["runs"] = runs
    for name, run in runs.items():
        run["holdout"] = rec.stage(f"evaluate {name}", "evaluate_stage", run=run["train"]["run"],
                                   bootstrap_resamples=plan.bootstrap_resamples)  # fmt: skip
    return runs


def check_disk(workdir: str | Path, plan: FullPlan, margin: float = 1.15) -> dict[str, Any]:
    """Refuse before writing when the store cannot fit (a clear message with the D that would)."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    free, need = shutil.disk_usage(workdir).free, int(store_bytes(plan) * margin)
    if free < need:
        fits = int(plan.dim * free / need)
        raise OSError(
            f"{workdir}: {free / 1e9:.1f} GB free, the {plan.dim}-dim store needs about {need / 1e9:.1f} GB; "
            f"free space or pass --dim {max(1, fits)} (said so in the records)"
        )
    return {"free_gb": round(free / 1e9, 1), "store_gb": round(store_bytes(plan) / 1e9, 1)}


def run_rehearsal_full(
    workdir: str | Path, plan: FullPlan, isolate: bool = True, resume: bool = False
) -> dict[str, Any]:
    """Synthetic full-size store -> fixed steps of sampled and of full softmax (epoch time extrapolated) ->
    evaluate on the holdout -> predict every test product from the store -> check the submission."""
    from prodcat.rehearsal.report import check_submission, write_at_scale

    rec, work = _Recorder(workdir, "full", plan, isolate, resume), str(workdir)
    rec.payload["disk"] = check_disk(workdir, plan)
    rec.stage("synthetic store", "synthetic_stage", workdir=work, plan=dataclasses.asdict(plan))
    runs: dict[str, dict[str, Any]] = {}
    for loss in ("sampled", "softmax"):
        config = {
            "workdir": work, "store": STORE_NAME, "head": "linear", "loss": loss, "optimizer": plan.optimizer,
            "num_sampled": plan.num_sampled, "sampler": "log_uniform", "max_steps": plan.train_steps,
            "batch_size": plan.batch_size, "eval_every": plan.train_steps, "lr": plan.lr, "seed": plan.seed,
            "warmup_steps": min(50, plan.train_steps // 5), "run_name": f"full-linear-{loss}-{plan.optimizer}",
            "overwrite": True, "memory_limit_gb": 2.0,
        }  # fmt: skip
        runs[config["run_name"]] = {"loss": loss, "train": rec.stage(f"train {loss} ({plan.train_steps} steps)",
                                                                     "train_stage", config=config)}  # fmt: skip
    for name, run in runs.items():
        run["holdout"] = rec.stage(f"evaluate {name}", "evaluate_stage", run=run["train"]["run"],
                                   bootstrap_resamples=plan.bootstrap_resamples)  # fmt: skip
    best = max(runs, key=lambda r: runs[r]["train"]["best_val_top1"] or 0.0)  # selected on val
    rec.payload["results"] = {"runs": runs, "best_on_val": best}
    submission = str(Path(workdir) / "submission.csv")
    rec.stage("predict test (store)", "predict_store_stage", run=runs[best]["train"]["run"], out=submission)
    rec.payload["results"]["submission"] = check_submission(workdir, submission)
    write_at_scale(workdir, rec.payload | {"stages": [r.as_json() for r in rec.records]})
    rec.save()
    return rec.payload
