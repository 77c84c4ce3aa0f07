"""A run folder stands alone: `load_run(run_dir)` reads what predict, evaluate, serve and report need from it, once.

R = W/runs/NAME holds, beside its checkpoints (prodcat.checkpoint):
  config.json       the TrainConfig, its workdir absolute (train)
  taxonomy.parquet  the taxonomy the head was trained on (train)
  extract.json      the feature store's ExtractConfig (backbone, weights, kind, precision, TTA; workdir absolute)
                    and what its manifest recorded (weights id, preprocessing, precision mode, feature shape) (train)
  summary.json      the last training session's summary (train)
  eval/             metrics.json (the choices made on val: aggregation, threshold, tau, temperature; every number),
                    prior.json (tau's prior), twins.json (the twins choice) (evaluate)
  twins.parquet     hash, product id and label of each train-split picture: the twin index (written with twins.json)
  prototypes.*      added categories (add-category); text/: the text model (text-head)
A copy of R predicts as R does, from any directory, without the workdir. Runs from before extract.json read the
feature store's config from the workdir, with a warning; a workdir that does not hold the run's store (a relative
one from before absolute paths, or a workdir moved as a whole) is looked for above the run (W/runs/NAME -> W).

Light on purpose (no torch): the report reads runs through it too.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prodcat.config import ConfigError, ExtractConfig, TrainConfig, config_from_dict
from prodcat.errors import UserError, require_run
from prodcat.paths import TAXONOMY_FILE, WorkPaths
from prodcat.predict.calibration import ProductCalibration, load_calibration
from prodcat.utils import get_logger, read_json, write_json

if TYPE_CHECKING:
    from prodcat.data.taxonomy import Taxonomy

__all__ = [
    "CONFIG_FILE",
    "EXTRACT_FILE",
    "TAXONOMY_FILE",
    "TWIN_TABLE",
    "TWINS_FILE",
    "Choices",
    "Run",
    "RunError",
    "load_run",
    "read_choices",
    "read_evaluation",
    "read_twins",
    "save_extraction",
]

CONFIG_FILE = "config.json"
EXTRACT_FILE = "extract.json"
TWIN_TABLE = "twins.parquet"
TWINS_FILE = "twins.json"  # under eval/
EVAL_DIR = "eval"
EXTRACT_FORMAT = 1
# What extract.json keeps of the store's manifest: how its vectors were made (not its shards or progress).
MANIFEST_KEYS = ("backbone", "weights_id", "kind", "preprocessing", "mode", "tta", "feature_shape", "dtype")
log = get_logger("prodcat.predict.run")


class RunError(UserError):
    """A run folder is missing a file prediction needs, or holds one that cannot be read."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _read(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError) as error:  # ValueError: bad JSON or UTF-8
        raise RunError(f"{path}: unreadable ({_one_line(error)}); restore it or re-run its stage") from None


def read_evaluation(run_dir: str | Path) -> dict[str, Any]:
    """RUN/eval/metrics.json, {} before `prodcat evaluate`."""
    path = Path(run_dir) / EVAL_DIR / "metrics.json"
    return _read(path) if path.is_file() else {}


def read_twins(run_dir: str | Path) -> dict[str, Any] | None:
    """RUN/eval/twins.json (the twins choice made on val), None before one was made."""
    path = Path(run_dir) / EVAL_DIR / TWINS_FILE
    return _read(path) if path.is_file() else None


@dataclasses.dataclass
class Choices:
    """What evaluation chose on val and the Predictor applies (None / identity before `prodcat evaluate`)."""

    aggregation: str | None = None
    threshold: float | None = None
    calibration: ProductCalibration = dataclasses.field(default_factory=ProductCalibration)
    twins: dict[str, Any] | None = None  # eval/twins.json (prodcat.predict.twins.TwinChoice.from_json reads it)


def read_choices(run_dir: str | Path, metrics: dict[str, Any] | None = None) -> Choices:
    """The val choices in RUN/eval/ (metrics.json, prior.json, twins.json)."""
    metrics = read_evaluation(run_dir) if metrics is None else metrics
    return Choices(
        aggregation=(metrics.get("product") or {}).get("aggregation"),
        threshold=(metrics.get("confidence") or {}).get("threshold"),
        calibration=load_calibration(run_dir, metrics),
        twins=read_twins(run_dir),
    )


@dataclasses.dataclass
class Run:
    """One run folder; everything but the training config is read on first use."""

    path: Path
    train_config: TrainConfig

    @property
    def name(self) -> str:
        return self.path.absolute().name

    @property
    def store_name(self) -> str:
        """The feature store the head was trained on."""
        return self.train_config.store

    @functools.cached_property
    def workdir(self) -> Path:
        """The workdir the run was trained in (for evaluate, which reads its feature store; predict needs none)."""
        stored = Path(self.train_config.workdir)
        above = self.path.absolute().parent.parent  # W/runs/NAME -> W
        if (stored / "features" / self.store_name).is_dir():
            return stored
        if self.path.absolute().parent.name == "runs" and (above / "features" / self.store_name).is_dir():
            # A run from before absolute paths (relative to another directory), or a workdir moved as a whole.
            log.warning("%s: workdir %r holds no feature store %r; using %s, the folder above the run", self.path,
                        str(stored), self.store_name, above)  # fmt: skip
            return above
        return stored

    @property
    def store_path(self) -> Path:
        return WorkPaths(self.workdir).feature_store(self.store_name)

    @property
    def self_contained(self) -> bool:
        """Whether the run carries its extraction config (runs trained since extract.json)."""
        return (self.path / EXTRACT_FILE).is_file()

    @functools.cached_property
    def taxonomy(self) -> Taxonomy:
        from prodcat.data.taxonomy import Taxonomy

        path = self.path / TAXONOMY_FILE
        if not path.is_file():
            path = WorkPaths(self.workdir).taxonomy
            log.warning("%s: no %s in the run; reading the workdir's %s", self.path, TAXONOMY_FILE, path)
        try:
            return Taxonomy.load(path)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise RunError(f"{path}: unreadable taxonomy ({_one_line(error)})") from None

    @functools.cached_property
    def _extraction(self) -> tuple[ExtractConfig, dict[str, Any]]:
        path = self.path / EXTRACT_FILE
        if path.is_file():
            data = _read(path)
            try:
                config = config_from_dict(ExtractConfig, data["config"])
            except (KeyError, TypeError, ConfigError) as error:
                raise RunError(f"{path}: invalid extraction config ({_one_line(error)}); train the run again") from None
            # The run's workdir (the same path, unless the workdir moved as a whole): where stored rows are read.
            return dataclasses.replace(config, workdir=str(self.workdir)), dict(data.get("manifest") or {})
        store_config = self.store_path / CONFIG_FILE
        if not store_config.is_file():
            raise RunError(f"{path}: missing, and so is {store_config}: nothing says which backbone made this run's "
                           "features; extract them with `prodcat extract` and train the run again")  # fmt: skip
        log.warning("%s: no %s (a run from before runs stood alone); reading %s from the workdir: train again to make "
                    "the run self-contained", self.path, EXTRACT_FILE, store_config)  # fmt: skip
        config = config_from_dict(ExtractConfig, _read(store_config))
        return dataclasses.replace(config, workdir=str(self.workdir)), {}

    @property
    def extract_config(self) -> ExtractConfig:
        """How the run's features were made; the Predictor builds the same backbone and preprocessing from it."""
        return self._extraction[0]

    @property
    def extraction(self) -> dict[str, Any]:
        """What the store's manifest recorded at training ({} for runs from before extract.json)."""
        return self._extraction[1]

    @functools.cached_property
    def metrics(self) -> dict[str, Any]:
        """eval/metrics.json ({} before `prodcat evaluate`)."""
        return read_evaluation(self.path)

    @functools.cached_property
    def choices(self) -> Choices:
        return read_choices(self.path, self.metrics)

    @functools.cached_property
    def summary(self) -> dict[str, Any]:
        """summary.json ({} before a training session ended)."""
        path = self.path / "summary.json"
        return _read(path) if path.is_file() else {}


def _train_config(run_dir: Path) -> TrainConfig:
    """config.json; the checkpoint sidecar's copy for a run that lost it."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        require_run(run_dir)  # not a run at all: one line listing the runs beside it
        sidecars = [run_dir / "checkpoints" / f"{which}.json" for which in ("best", "last")]
        path = next((p for p in sidecars if p.is_file()), path)
        if not path.is_file():
            raise RunError(f"{run_dir / CONFIG_FILE}: missing (and no checkpoint sidecar holds the config)")
    data = _read(path)
    data = data.get("config", data) if path.parent.name == "checkpoints" else data
    try:
        return config_from_dict(TrainConfig, data)
    except (ConfigError, TypeError) as error:
        raise RunError(f"{path}: invalid training config ({_one_line(error)})") from None


def load_run(run_dir: str | Path) -> Run:
    """The run in `run_dir` (RunError, one line, when it is not one)."""
    path = Path(run_dir)
    if not path.is_dir():
        require_run(path)  # lists the runs beside it, or says to train one
    return Run(path, _train_config(path))


def _absolute_weights(weights: str | None) -> str | None:
    """A --weights file path made absolute (relative to where training runs: the best guess left); ids stay."""
    return os.path.abspath(weights) if weights and Path(weights).is_file() else weights


def save_extraction(run_dir: str | Path, workdir: str | Path, store_name: str) -> Path | None:
    """Copy the store's extraction config and manifest facts into RUN/extract.json (None: the store has no
    config.json, e.g. one written from arrays; such a run evaluates on its store but cannot build a backbone)."""
    store = WorkPaths(workdir).feature_store(store_name)
    if not (store / CONFIG_FILE).is_file():
        log.info("%s: no %s; the run keeps no extraction config", store, CONFIG_FILE)
        return None
    config = config_from_dict(ExtractConfig, _read(store / CONFIG_FILE))
    config = dataclasses.replace(config, workdir=os.path.abspath(workdir), weights=_absolute_weights(config.weights))
    manifest = _read(store / "manifest.json")
    payload = {
        "format": EXTRACT_FORMAT,
        "store": os.path.abspath(store),
        "config": dataclasses.asdict(config),
        "manifest": {key: manifest.get(key) for key in MANIFEST_KEYS if key in manifest},
    }
    return write_json(Path(run_dir) / EXTRACT_FILE, payload)
