"""Typed configs for every stage. Each output directory gets the exact config that produced it (`config.json`)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, TypeVar

from prodcat.errors import UserError, did_you_mean

__all__ = [
    "DemoConfig",
    "IngestConfig",
    "ExploreConfig",
    "ExtractConfig",
    "TrainConfig",
    "EvalConfig",
    "ServeConfig",
    "save_config",
    "load_config",
    "config_from_dict",
]

C = TypeVar("C")


class ConfigError(UserError, ValueError):
    """A config value is out of range or inconsistent."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")
# The loss registry's names (prodcat.model.list_losses), here without torch so a typo fails at once; a test holds
# the two equal.
LOSS_NAMES = ("softmax", "sampled", "adaptive", "balanced_softmax")


def _check_choice(value: str, choices: tuple[str, ...] | list[str], field: str) -> None:
    """`value` is one of `choices`; else list them and suggest the closest ("did you mean ...?")."""
    _check(
        value in choices, f"{field} must be one of {', '.join(choices)}, got {value!r}{did_you_mean(value, choices)}"
    )


def _check_name(value: str | None, field: str) -> None:
    """Run and store names become one folder under W/runs or W/features: no separators, no '.' or '..'."""
    if value is None:
        return
    _check(
        bool(_PLAIN_NAME.fullmatch(value)) and value not in (".", ".."),
        f"{field} must be a plain name of letters, digits, '.', '_' or '-' (not '.' or '..'), got {value!r}",
    )


def _check_number(value: float | None, field: str, low: float, *, strict: bool = False, optional: bool = False) -> None:
    """A finite number >= low (> low when strict); None allowed when optional."""
    if value is None and optional:
        return
    ok = value is not None and math.isfinite(value) and (value > low if strict else value >= low)
    _check(ok, f"{field} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")


@dataclasses.dataclass
class DemoConfig:
    """Synthetic Cdiscount-format data set (the embedded default)."""

    products: int = 3000
    test_products: int = 300
    categories: int = 60
    seed: int = 0
    image_size: int = 180
    jpeg_quality: int = 90
    tail_power: float = 1.0  # leaf sizes = real long tail ** tail_power (1: real shape, 0: uniform)
    unique_images_per_leaf: int | None = None  # reuse a pool of rendered pictures per leaf (fast, for big files)
    stock_share: float = 0.5  # products showing a stock set shared with ~5 others (byte-identical pictures)
    placeholder_share: float = 0.02  # products showing only a "no picture" placeholder shared by all categories
    # Leaves that are book/music/film/game covers (prodcat.data.synthetic.covers): alike in picture, told apart by their
    # printed words. None: min(8, categories // 5), none below 10 categories.
    text_leaves: int | None = None

    # Real shape sources (the scale rehearsal): a Kaggle category_names.csv used as the taxonomy (`categories` must
    # equal its rows) and a {category_id: images} JSON whose counts set the products per leaf (the real long tail).
    taxonomy_csv: str | None = None
    category_counts_json: str | None = None

    def resolved_text_leaves(self) -> int:
        if self.text_leaves is not None:
            return self.text_leaves
        return min(8, self.categories // 5) if self.categories >= 10 else 0

    def __post_init__(self) -> None:
        _check(
            self.text_leaves is None or 0 <= self.text_leaves <= min(12, self.categories - 2),
            f"text_leaves must be None or in 0..{min(12, self.categories - 2)}, got {self.text_leaves}",
        )
        _check(self.products >= 1, f"products must be >= 1, got {self.products}")
        _check(self.test_products >= 0, f"test_products must be >= 0, got {self.test_products}")
        _check(self.categories >= 2, f"categories must be >= 2, got {self.categories}")
        _check(self.categories <= 1_000_000, f"categories must be <= 1,000,000, got {self.categories}")
        _check(
            self.products >= self.categories,
            f"products ({self.products}) must be >= categories ({self.categories}): every leaf needs one",
        )
        # Product ids are int32 in Kaggle's BSON; leave room for the gaps between ids.
        _check(self.products + self.test_products <= 1_000_000_000, "products + test_products must be <= 1e9")
        _check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _check(32 <= self.image_size <= 1024, f"image_size must be in 32..1024, got {self.image_size}")
        _check(1 <= self.jpeg_quality <= 100, f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        _check(0.0 <= self.tail_power <= 2.0, f"tail_power must be in [0, 2], got {self.tail_power}")
        _check(
            self.unique_images_per_leaf is None or self.unique_images_per_leaf >= 4,
            "unique_images_per_leaf must be None or >= 4 (one product shows up to 4 views of one object)",
        )
        _check(0.0 <= self.stock_share <= 1.0, f"stock_share must be in [0, 1], got {self.stock_share}")
        _check(
            0.0 <= self.placeholder_share <= 1.0, f"placeholder_share must be in [0, 1], got {self.placeholder_share}"
        )
        _check(
            self.stock_share + self.placeholder_share <= 1.0,
            f"stock_share + placeholder_share must be <= 1, got {self.stock_share + self.placeholder_share}",
        )


@dataclasses.dataclass
class IngestConfig:
    """Index Kaggle BSON files and the taxonomy into Parquet catalogs."""

    data_dir: str = ""
    workdir: str = ""
    val_fraction: float = 0.05  # products for selection (checkpoint, aggregation, thresholds, hyper-parameters)
    holdout_fraction: float = 0.05  # products for reporting only: nothing is tuned on them
    seed: int = 0
    strict: bool = False

    def __post_init__(self) -> None:
        _check(0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        _check(0.0 <= self.holdout_fraction < 1.0, f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        _check(
            self.val_fraction + self.holdout_fraction < 1.0,
            f"val_fraction + holdout_fraction must be < 1, got {self.val_fraction + self.holdout_fraction}",
        )
        _check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")


@dataclasses.dataclass
class ExploreConfig:
    workdir: str = ""
    top_k: int = 5

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")


@dataclasses.dataclass
class ExtractConfig:
    """Frozen-backbone feature extraction into a sharded, memory-mappable store."""

    workdir: str = ""
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    random_init: bool = False
    features: str = "pooled"  # pooled | spatial
    spatial_channels: int | None = None  # keep only the first N channels of a spatial map (smaller store)
    splits: tuple[str, ...] = ("train", "val", "holdout", "test")
    batch_size: int = 64
    workers: int | None = None  # DataLoader decode workers; None = auto (0 on small CPU hosts, more with a GPU)
    shard_size: int = 4096  # images per shard
    limit: int | None = None  # products per split, for quick looks
    # auto: bf16 only where a calibration keeps features within cosine 0.9995 of float32, else float32
    # (ONNX Runtime on the CPU); float32 | bfloat16 force PyTorch in that precision.
    precision: str = "auto"
    distributed: bool = False
    name: str | None = None  # store name; default "<backbone>-<features>"
    # Decode and run each distinct picture once (by catalog/pictures.parquet hash); duplicates share its vector.
    dedupe: bool = True
    # Test-time augmentation at extraction: none | flip_mean (each vector is the mean of the picture's features and
    # its horizontal mirror's; 2x backbone cost, forwards of 2 x batch_size). Serving applies the store's mode.
    tta: str = "none"

    def __post_init__(self) -> None:
        _check_choice(self.features, ("pooled", "spatial"), "features")
        _check_choice(self.tta, ("none", "flip_mean"), "tta")
        _check_choice(self.precision, ("auto", "float32", "bfloat16"), "precision")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.shard_size >= 1, "shard_size must be >= 1")
        _check(self.workers is None or self.workers >= 0, "workers must be >= 0")
        _check(self.spatial_channels is None or self.spatial_channels >= 1, "spatial_channels must be >= 1")
        _check(self.limit is None or self.limit >= 1, f"limit must be >= 1 (or unset), got {self.limit}")
        _check_name(self.name, "name")
        self.splits = tuple(self.splits)
        for split in self.splits:
            _check_choice(split, ("train", "val", "holdout", "test"), "split")

    @property
    def store_name(self) -> str:
        return self.name or f"{self.backbone}-{self.features}"


@dataclasses.dataclass
class TrainConfig:
    """Train a head on cached features."""

    workdir: str = ""
    features: str = "efficientnet_lite0-pooled"
    head: str = "linear"  # linear | mlp | conv | hier
    loss: str = "softmax"  # softmax | sampled | adaptive | balanced_softmax (prodcat.model.losses registry)
    run_name: str | None = None
    hidden_dim: int = 1024
    dropout: float = 0.2
    num_sampled: int = 256
    sampler: str = "log_uniform"  # uniform | log_uniform | unigram
    unigram_alpha: float = 0.75
    sample_with_replacement: bool = False
    remove_accidental_hits: bool = True
    logq_correction: bool = True
    hier_weights: tuple[float, float, float] = (0.25, 0.25, 1.0)  # level1, level2, leaf
    # adamw | sgd | rowwise_adamw | rowwise_sgd: the update rule, for every loss and head (prodcat.model.optim).
    # rowwise_*: the output layers row by row (sparse rows with the sampled loss: what makes 1 M classes fit).
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_steps: int = 50
    epochs: float = 10.0
    max_steps: int | None = None
    batch_size: int = 256
    label_smoothing: float = 0.0
    eval_every: int = 100
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # start over a run that already has checkpoints or metrics (deletes them)
    distributed: bool = False
    max_seconds: float | None = None
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N
    precision: str = "float32"  # float32 | bfloat16 (autocast)
    memory_limit_gb: float = 2.0  # splits smaller than this are loaded once; larger ones are streamed with prefetch
    stop_after: int | None = None  # end this session after this global step (checkpointed); --resume continues

    def __post_init__(self) -> None:
        _check_choice(self.precision, ("float32", "bfloat16"), "precision")
        _check(self.stop_after is None or self.stop_after >= 1, "stop_after must be >= 1")
        # Checked before the optimizer and head, whose registries load torch: a typo here fails in well under 1 s.
        _check_choice(self.loss, LOSS_NAMES, "loss")
        _check_choice(self.sampler, ("uniform", "log_uniform", "unigram"), "sampler")
        _check_optimizer(self.optimizer)
        _check_head(self.head)
        _check(self.num_sampled >= 1, "num_sampled must be >= 1")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)")
        _check(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")
        self.hier_weights = tuple(float(w) for w in self.hier_weights)  # type: ignore[assignment]
        _check(len(self.hier_weights) == 3, "hier_weights needs three values (level1, level2, leaf)")
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Counts, rates and names that would otherwise be accepted silently (a negative step count trains 0 steps,
        a run name with '..' writes outside W/runs)."""
        _check_name(self.run_name, "run_name")
        _check_name(self.features, "features")
        _check_number(self.lr, "lr", 0.0, strict=True)
        _check_number(self.epochs, "epochs", 0.0, strict=True)
        _check_number(self.weight_decay, "weight_decay", 0.0)
        _check(0.0 <= self.momentum < 1.0, f"momentum must be in [0, 1), got {self.momentum}")
        _check_number(self.unigram_alpha, "unigram_alpha", 0.0)
        _check(self.hidden_dim >= 1, f"hidden_dim must be >= 1, got {self.hidden_dim}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1 or unset, got {self.max_steps}")
        _check(self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}")
        _check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _check_number(self.max_seconds, "max_seconds", 0.0, strict=True, optional=True)
        _check_number(self.memory_limit_gb, "memory_limit_gb", 0.0)
        _check(
            all(math.isfinite(w) and w >= 0 for w in self.hier_weights) and sum(self.hier_weights) > 0,
            f"hier_weights must be finite, >= 0 and not all 0, got {list(self.hier_weights)}",
        )
        _check(
            bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device)),
            f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        _check(not (self.resume and self.overwrite), "pass resume or overwrite, not both")

    @property
    def name(self) -> str:
        return self.run_name or f"{self.head}-{self.loss}-s{self.seed}"


def _check_optimizer(name: str) -> None:
    # The names live in one registry, beside the optimizers; torch is loaded anyway wherever a TrainConfig is built.
    from prodcat.model.optim import list_optimizers

    _check_choice(name, list_optimizers(), "optimizer")


def _check_head(name: str) -> None:
    # The head registry's names ("hier" among them); torch is loaded by now.
    from prodcat.model.heads import list_heads

    _check_choice(name, list_heads(), "head")


@dataclasses.dataclass
class EvalConfig:
    """Evaluate a run: choices (aggregation, auto-accept threshold) are made on val, numbers reported on `split`."""

    run: str = ""
    split: str = "holdout"  # holdout: nothing was tuned on it | val: the selection split itself (optimistic)
    aggregation: str = "auto"  # auto (best product top-1 on val) | mean_prob | mean_logprob | vote
    target_accuracy: float = 0.95
    batch_size: int = 4096
    bootstrap_resamples: int = 1000  # resamples of products for the intervals that are not a binomial proportion
    # What the logit adjustment's tau maximises on val: top1 (a test set drawn like train, as Kaggle's) or macro
    # (every leaf alike). Top-1 can drop while macro accuracy rises.
    objective: str = "top1"
    tau_grid: tuple[float, ...] = tuple(round(0.1 * step, 1) for step in range(21))  # 0.0 .. 2.0; (0.0,): off
    calibrate: bool = True  # temperature scaling of product probabilities, T fitted on val
    calibration_products: int = 10_000  # val products (at random) whose full distributions fit T
    # Other runs one training change apart (e.g. the balanced_softmax run of the same seed), already evaluated on
    # the same split: each becomes a row of the levers table.
    compare_runs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.tau_grid = tuple(float(t) for t in self.tau_grid)
        self.compare_runs = tuple(str(r) for r in self.compare_runs)
        _check_choice(self.objective, ("top1", "macro"), "objective")
        _check(
            len(self.tau_grid) > 0 and all(math.isfinite(t) and t >= 0 for t in self.tau_grid),
            f"tau_grid needs finite values >= 0, got {list(self.tau_grid)}",
        )
        _check(self.calibration_products >= 1, "calibration_products must be >= 1")
        _check_choice(self.split, ("train", "val", "holdout", "test"), "split")
        _check_choice(self.aggregation, ("auto", "mean_prob", "mean_logprob", "vote"), "aggregation")
        _check(0.0 < self.target_accuracy <= 1.0, "target_accuracy must be in (0, 1]")
        _check(self.bootstrap_resamples >= 0, "bootstrap_resamples must be >= 0")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


@dataclasses.dataclass
class ServeConfig:
    """HTTP server: request limits and micro-batching of model forwards."""

    run: str = ""
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    top_k: int = 5
    max_images: int = 4  # photos per product (per request)
    max_upload_bytes: int = 10 * 1024 * 1024  # per photo
    # Declared width * height; larger is refused before decoding (bombs). 12 MP takes a phone photo (4000 x 3000);
    # non-JPEG formats decode at full size before they are reduced, so this bounds each decode's memory.
    max_pixels: int = 12_000_000
    # Pictures decoded at once: one full-size decode at a time bounds decoding memory (~50 MB for a 12 MP PNG),
    # and a 180x180 JPEG decodes in ~1 ms, far below a forward, so one thread keeps up with the model.
    decode_threads: int = 1
    max_queued_bytes: int = 64 * 1024 * 1024  # decoded pixels waiting for or in a forward; beyond this, 503
    header_timeout_s: float = 10.0  # request line + headers must arrive within this (slow clients are cut off)
    body_timeout_s: float = 60.0  # the whole upload must arrive within this ...
    body_idle_timeout_s: float = 10.0  # ... with no gap longer than this; else 408
    max_header_bytes: int = 64 * 1024  # request line + headers; larger gets 431
    docs: bool = True  # /docs (Swagger UI, served from local files) and /openapi.json
    batch_window_ms: float = 5.0  # longest wait for more requests once one is queued
    max_batch_images: int = 16  # images per forward; on 2 CPU cores the cost per image is lowest at ~8-16
    micro_batching: bool = True  # False: one forward per request (the benchmark's baseline)
    max_pending_requests: int = 512  # queued + decoding requests; beyond this the server answers 503

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "port must be in 0..65535")
        _check(self.top_k >= 1, "top_k must be >= 1")
        _check(self.max_images >= 1, "max_images must be >= 1")
        _check(self.max_upload_bytes >= 1, "max_upload_bytes must be >= 1")
        _check(self.max_pixels >= 1, "max_pixels must be >= 1")
        _check(self.batch_window_ms >= 0, "batch_window_ms must be >= 0")
        _check(self.max_batch_images >= self.max_images, "max_batch_images must be >= max_images")
        _check(self.max_pending_requests >= 1, "max_pending_requests must be >= 1")
        _check(self.decode_threads >= 1, "decode_threads must be >= 1")
        _check(self.max_queued_bytes >= 1, "max_queued_bytes must be >= 1")
        _check(min(self.header_timeout_s, self.body_timeout_s, self.body_idle_timeout_s) > 0, "timeouts must be > 0")
        _check(self.max_header_bytes >= 1024, "max_header_bytes must be >= 1024")


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def save_config(config: Any, path: str | Path) -> Path:
    """Write a dataclass config as JSON (atomically), tagged with its class name."""
    from prodcat.utils import atomic_write_text

    payload = {"_type": type(config).__name__}
    payload.update({k: _to_jsonable(v) for k, v in dataclasses.asdict(config).items()})
    return atomic_write_text(Path(path), json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build `cls` from a dict, ignoring unknown keys (older/newer runs) and re-running the checks."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


def load_config(cls: type[C], path: str | Path) -> C:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return config_from_dict(cls, data)
