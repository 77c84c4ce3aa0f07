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
    "CompareConfig",
    "SweepConfig",
    "EvalConfig",
    "PredictConfig",
    "ServeConfig",
    "ExportConfig",
    "PRECISIONS",
    "TTA_MODES",
    "FEATURE_KINDS",
    "CALIBRATION_MIN_COSINE",
    "OcrConfig",
    "TextFeatureConfig",
    "FusionConfig",
    "RehearsalConfig",
    "FullRehearsalConfig",
    "ConfigError",
    "option",
    "save_config",
    "load_config",
    "config_from_dict",
]

C = TypeVar("C")

# Inference precisions of extraction and serving: auto (bf16 only where the calibration below passes, else float32,
# by ONNX Runtime on the CPU) | float32 | bfloat16 (autocast). Training takes the last two.
PRECISIONS = ("auto", "float32", "bfloat16")
# auto keeps bf16 only if every calibration photo's pooled vector is within this cosine of float32's
# (prodcat.features.calibration_photos; the goal is 0.999 on every photo, the margin covers photos unlike these).
CALIBRATION_MIN_COSINE = 0.9995
# Test-time augmentation: flips only (the third-place Kaggle team found crops and transposes hurt).
TTA_MODES = ("none", "flip_mean")
# What a feature store keeps of the backbone: the globally pooled vector or the last feature map (channels last).
FEATURE_KINDS = ("pooled", "spatial")


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


def option(
    default: Any,
    help: str,
    *,
    aliases: tuple[str, ...] = (),
    short: str | None = None,
    path: bool = False,
    positional: bool = False,
) -> Any:
    """A config field with its description: the one place its default and --help text live.

    `prodcat.cli_options` derives the command-line flag `--field-name` from it. `aliases`: earlier names, still
    accepted as flags (`--alias`) and as keys of older config.json files. `path`: the CLI reads a file or folder (an
    empty default means the CLI requires one). `short`: a one-letter flag too (`-w`). `positional`: an argument.
    """
    metadata = {"help": help, "aliases": tuple(aliases), "short": short, "path": path, "positional": positional}
    return dataclasses.field(default=default, metadata=metadata)


def record(default: Any, help: str) -> Any:
    """A config field that records a fact (written by a stage, read back from its config.json), never a flag."""
    return dataclasses.field(default=default, metadata={"help": help, "aliases": (), "cli": False})


WORKDIR_HELP = "Working directory holding catalog, features, runs."
RUN_HELP = "Run directory (W/runs/NAME)."
SEED_HELP = "Random seed (same seed, same result)."
HEAD_HELP = (
    "linear | mlp | conv | hier (an mlp trunk with one output per taxonomy level, decoded consistently) | "
    "gated_product (attention over a product's 1-4 pictures, trained on products)."
)
LOSS_HELP = (
    "softmax (full) | sampled (sampled softmax: K negatives per step) | adaptive (adaptive softmax) | "
    "balanced_softmax (softmax on logits + log prior: long-tail training)."
)
OPTIMIZER_HELP = (
    "adamw | sgd | rowwise_adamw | rowwise_sgd, for every loss and head. rowwise_*: row-wise updates of the output "
    "layers (sparse rows with the sampled loss: what makes 1 M classes fit), AdamW / SGD elsewhere."
)
SEEDS_HELP = "Seeds 0..N-1 per arm (one seed shows no spread: n/a)."


@dataclasses.dataclass
class DemoConfig:
    """Synthetic Cdiscount-format data set (the embedded default)."""

    products: int = option(3000, "Labelled products (train.bson).")
    test_products: int = option(300, "Unlabelled products (test.bson; 0 writes none).")
    categories: int = option(60, "Leaf categories, drawn from the real taxonomy's names.")
    seed: int = option(0, "Random seed (same seed, same data).")
    image_size: int = option(180, "Side of the square pictures in pixels (Cdiscount's are 180).")
    jpeg_quality: int = option(90, "JPEG quality of the pictures, 1..100.")
    tail_power: float = option(1.0, "Leaf sizes = the real long tail ** tail_power (1: the real shape, 0: uniform).")
    unique_images_per_leaf: int | None = option(
        None, "Reuse a pool of this many rendered pictures per leaf (fast, for big files); default: render each."
    )
    stock_share: float = option(
        0.5, "Share of products showing a stock set shared with ~5 others (byte-identical pictures)."
    )
    placeholder_share: float = option(
        0.02, "Share of products showing only a placeholder picture shared by all categories."
    )
    # Covers (prodcat.data.synthetic.covers): alike in picture, told apart by their printed words.
    text_leaves: int | None = option(
        None, "Book/music/film/game cover leaves (default: min(8, categories // 5), none below 10 categories)."
    )
    # Real shape sources (the scale rehearsal).
    taxonomy_csv: str | None = option(
        None, "A Kaggle category_names.csv used as the taxonomy (--categories must equal its rows)."
    )
    category_counts_json: str | None = option(
        None, "A {category_id: images} JSON whose counts set the products per leaf (the real long tail)."
    )

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

    data_dir: str = option(
        "", "Folder with train.bson and/or test.bson and category_names.csv.", path=True, positional=True
    )
    workdir: str = option("", WORKDIR_HELP, short="-w", path=True)
    val_fraction: float = option(
        0.05, "Share of train.bson products for selection (checkpoint, aggregation, thresholds, hyper-parameters)."
    )
    holdout_fraction: float = option(0.05, "Share of train.bson products for reporting only (never tuned on).")
    seed: int = option(0, "Seed of the split (same seed, same split).")
    strict: bool = option(False, "Stop at the first bad document instead of skipping it.")

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
    """Counts per taxonomy level, histograms, head and tail categories."""

    workdir: str = option("", WORKDIR_HELP, short="-w", path=True)
    top_k: int = option(5, "Largest and smallest categories listed per level.")

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")


@dataclasses.dataclass
class ExtractConfig:
    """Frozen-backbone feature extraction into a sharded, memory-mappable store."""

    workdir: str = option("", WORKDIR_HELP, short="-w", path=True)
    backbone: str = option(
        "efficientnet_lite0",
        "efficientnet_lite0 (packaged weights) | efficientnet_lite1 | efficientnet_lite2 | legacy_xception | any "
        "timm model name.",
    )
    weights: str | None = option(None, "Local weights: .safetensors or a torch state dict.", path=True)
    random_init: bool = option(False, "Random weights (tests and speed runs only).")
    features: str = option("pooled", "Feature kind: pooled | spatial.")
    spatial_channels: int | None = option(
        None, "With --features spatial: keep the first N channels of the map (smaller store)."
    )
    splits: tuple[str, ...] = option(
        ("train", "val", "holdout", "test"),
        "Splits to extract; those the catalog lacks (e.g. no test.bson) are skipped.",
        aliases=("split",),
    )
    batch_size: int = option(64, "Pictures per forward.")
    workers: int | None = option(
        None, "DataLoader decode worker processes (default: auto, 0 on small CPU hosts, more with a GPU)."
    )
    shard_size: int = option(4096, "Pictures per shard (the unit a re-run resumes from).")
    limit: int | None = option(None, "At most this many products per split (quick looks).")
    precision: str = option(
        "auto",
        f"auto (bf16 only where a calibration keeps features within cosine {CALIBRATION_MIN_COSINE} of float32, "
        "else float32; ONNX Runtime on the CPU) | float32 | bfloat16 (PyTorch in that precision).",
    )
    distributed: bool = option(False, "Split shards across torchrun ranks.")
    store_name: str | None = option(
        None, "Store name under W/features (default <backbone>-<features>).", aliases=("name",)
    )
    dedupe: bool = option(
        True, "Run each distinct picture once (by catalog/pictures.parquet hash); copies share its vector."
    )
    # Serving applies the store's mode (from its config.json), so served rows equal stored ones.
    tta: str = option(
        "none",
        "Test-time augmentation: none | flip_mean (each vector the mean of the picture's features and its mirror's; "
        "2x backbone time).",
    )
    # Written by extract, not an option: the inference engine that made the store (FeatureExtractor.engine, e.g.
    # cpu-onnxruntime-fp32-bn-folded); the Predictor warns when its own differs. None: a store from before this.
    engine: str | None = record(None, "Inference engine that made the store (written by extract).")

    def __post_init__(self) -> None:
        _check_choice(self.features, FEATURE_KINDS, "features")
        _check_choice(self.tta, TTA_MODES, "tta")
        _check_choice(self.precision, PRECISIONS, "precision")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.shard_size >= 1, "shard_size must be >= 1")
        _check(self.workers is None or self.workers >= 0, "workers must be >= 0")
        _check(self.spatial_channels is None or self.spatial_channels >= 1, "spatial_channels must be >= 1")
        _check(self.limit is None or self.limit >= 1, f"limit must be >= 1 (or unset), got {self.limit}")
        _check_name(self.store_name, "store_name")
        self.splits = tuple(self.splits)
        for split in self.splits:
            _check_choice(split, ("train", "val", "holdout", "test"), "split")

    @property
    def name(self) -> str:
        """The store's folder name under W/features (TrainConfig.name is the run's, likewise resolved)."""
        return self.store_name or f"{self.backbone}-{self.features}"


@dataclasses.dataclass
class TrainConfig:
    """Train a head on cached features."""

    workdir: str = option("", WORKDIR_HELP, short="-w", path=True)
    store: str = option(
        "efficientnet_lite0-pooled",
        "Feature store name under W/features (what `prodcat extract` wrote).",
        aliases=("features",),
    )
    head: str = option("linear", HEAD_HELP)
    loss: str = option("softmax", LOSS_HELP)  # the names: prodcat.model.losses registry
    run_name: str | None = option(None, "Run folder name under W/runs (default HEAD-LOSS-sSEED).")
    hidden_dim: int = option(1024, "Width of the mlp / conv / hier trunk.")
    dropout: float = option(0.2, "Dropout before the output layer.")
    num_sampled: int = option(256, "Negatives K per step for --loss sampled.")
    sampler: str = option("log_uniform", "How --loss sampled draws negatives: uniform | log_uniform | unigram.")
    unigram_alpha: float = option(0.75, "The unigram sampler draws classes in proportion to count ** alpha.")
    sample_with_replacement: bool = option(
        False, "Sampled negatives may repeat within one draw.", aliases=("with_replacement",)
    )
    remove_accidental_hits: bool = option(True, "Mask sampled negatives that are the true class.")
    logq_correction: bool = option(True, "Subtract log Q(class) from sampled logits (unbiased sampled softmax).")
    hier_weights: tuple[float, float, float] = option(
        (0.25, 0.25, 1.0), "Loss weights of the hier head's outputs: level 1, level 2, leaf."
    )
    optimizer: str = option("adamw", OPTIMIZER_HELP)  # the names: prodcat.model.optim registry
    lr: float = option(1e-3, "Peak learning rate (after warm-up, then cosine decay).")
    weight_decay: float = option(1e-4, "Decoupled weight decay.")
    momentum: float = option(0.9, "Momentum of sgd and rowwise_sgd.")
    warmup_steps: int = option(50, "Linear learning-rate warm-up steps.")
    epochs: float = option(10.0, "Passes over the train split (fractions allowed).")
    max_steps: int | None = option(None, "Stop after this many steps (overrides --epochs).")
    batch_size: int = option(256, "Examples per batch.")
    label_smoothing: float = option(0.0, "Label smoothing of the full softmax (0: none).")
    eval_every: int = option(100, "Validate (and checkpoint) every N steps.")
    seed: int = option(0, SEED_HELP)
    resume: bool = option(False, "Continue the run from its last checkpoint.")
    overwrite: bool = option(False, "Delete the run's earlier checkpoints, metrics and evaluation, and start over.")
    distributed: bool = option(False, "DistributedDataParallel under torchrun.")
    max_seconds: float | None = option(None, "End this session after this many seconds of training (checkpointed).")
    device: str = option("auto", "auto (CUDA when available) | cpu | cuda | cuda:N.")
    precision: str = option("float32", "float32 | bfloat16 (autocast).")
    memory_limit_gb: float = option(
        2.0, "Splits smaller than this (GB) are loaded once; larger ones are streamed with prefetch."
    )
    stop_after: int | None = option(None, "End this session after this global step (checkpointed); --resume continues.")

    def __post_init__(self) -> None:
        _check_choice(self.precision, PRECISIONS[1:], "precision")
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
        _check_name(self.store, "store")
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
        """The run's folder name under W/runs (ExtractConfig.name is the store's, likewise resolved)."""
        return self.run_name or f"{self.head}-{self.loss}-s{self.seed}"


def _check_optimizer(name: str) -> None:
    # The names live in one registry, beside the optimizers; torch is loaded anyway wherever a TrainConfig is built.
    from prodcat.model.optim import list_optimizers

    _check_choice(name, list_optimizers(), "optimizer")


def _check_head(name: str) -> None:
    # The head registry's names ("hier" among them); torch is loaded by now.
    from prodcat.model.heads import list_heads

    _check_choice(name, list_heads(), "head")


def _like(cls: type, name: str, default: Any = dataclasses.MISSING, help: str | None = None) -> Any:
    """A field with `cls.name`'s default and help (either replaced): one description for one meaning."""
    source = next(f for f in dataclasses.fields(cls) if f.name == name)
    metadata = {**source.metadata, "help": help or source.metadata["help"]}
    value = source.default if default is dataclasses.MISSING else default
    return dataclasses.field(default=value, metadata=metadata)


def _check_experiment(config: CompareConfig | SweepConfig) -> None:
    _check_name(config.store, "store")
    _check(config.seeds >= 1, f"seeds must be >= 1, got {config.seeds}")
    _check_number(config.epochs, "epochs", 0.0, strict=True)
    _check(config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}")


@dataclasses.dataclass
class CompareConfig:
    """Same head, budget, seeds and optimizer, one loss per arm (x optimizers): `prodcat compare`."""

    workdir: str = _like(TrainConfig, "workdir")
    store: str = _like(TrainConfig, "store")
    head: str = _like(TrainConfig, "head")
    losses: tuple[str, ...] = option(("softmax", "sampled", "adaptive"), f"Losses compared: {LOSS_HELP}")
    seeds: int = option(3, SEEDS_HELP)
    epochs: float = _like(TrainConfig, "epochs", 5.0)
    num_sampled: int = _like(TrainConfig, "num_sampled", 64)
    batch_size: int = _like(TrainConfig, "batch_size")
    optimizer: str | None = option(None, f"Held fixed across arms (default {TrainConfig.optimizer}). {OPTIMIZER_HELP}")
    optimizers: tuple[str, ...] = option((), "The optimizer as a second factor: every loss with each of these.")
    arms: tuple[tuple[str, str], ...] = option(
        (), "loss:optimizer cells of that grid instead, e.g. softmax:adamw,sampled:rowwise_sgd (--losses ignored)."
    )
    # A fresh process per run: a process's peak RSS never goes down, so runs sharing one would inherit the largest.
    isolate: bool = option(True, "Train each run in its own (spawned) process, so its peak RSS is its own.")
    note: str | None = option(None, "A line added to the report's notes (e.g. that the data is synthetic).")

    def __post_init__(self) -> None:
        self.losses = tuple(self.losses)
        self.optimizers = tuple(self.optimizers)
        self.arms = tuple((str(loss), str(name)) for loss, name in self.arms)
        _check(bool(self.losses or self.arms), "compare needs at least one loss (or arm)")
        for loss in (*self.losses, *(loss for loss, _ in self.arms)):
            _check_choice(loss, LOSS_NAMES, "loss")
        _check_experiment(self)


@dataclasses.dataclass
class SweepConfig:
    """Sampled softmax at each number of negatives K, plus the full softmax, one optimizer: `prodcat sweep`."""

    workdir: str = _like(TrainConfig, "workdir")
    store: str = _like(TrainConfig, "store")
    head: str = _like(TrainConfig, "head")
    num_sampled: tuple[int, ...] = option((8, 32, 128, 512, 2048), "Sampled negatives K tried (clipped to C - 1).")
    sampler: str = _like(TrainConfig, "sampler")
    epochs: float = _like(TrainConfig, "epochs", 5.0)
    seeds: int = option(3, SEEDS_HELP)
    batch_size: int = _like(TrainConfig, "batch_size")
    optimizer: str | None = option(
        None, f"Every K and the full-softmax line (default {TrainConfig.optimizer}). {OPTIMIZER_HELP}"
    )
    isolate: bool = option(False, "Train each run in its own (spawned) process, so its peak RSS is its own.")
    note: str | None = option(None, "A line added to the report's notes (e.g. that the data is synthetic).")

    def __post_init__(self) -> None:
        self.num_sampled = tuple(int(k) for k in self.num_sampled)
        _check(bool(self.num_sampled), "sweep needs at least one num_sampled value")
        _check(min(self.num_sampled) >= 1, f"num_sampled values must be >= 1, got {list(self.num_sampled)}")
        _check_choice(self.sampler, ("uniform", "log_uniform", "unigram"), "sampler")
        _check_experiment(self)


@dataclasses.dataclass
class EvalConfig:
    """Evaluate a run: choices (aggregation, auto-accept threshold) are made on val, numbers reported on `split`."""

    run: str = option("", RUN_HELP, path=True)
    split: str = option(
        "holdout", "Split reported on: holdout (nothing was tuned on it) | val (the selection split: optimistic)."
    )
    aggregation: str = option("auto", "auto (best product top-1 on val) | mean_prob | mean_logprob | vote.")
    target_accuracy: float = option(0.95, "Auto-accept threshold: the lowest reaching this product accuracy on val.")
    batch_size: int = option(4096, "Rows per forward.")
    bootstrap_resamples: int = option(
        1000, "Resamples of products for the intervals that are not a binomial proportion."
    )
    objective: str = option(
        "top1",
        "What the logit adjustment's tau maximises on val: top1 (test drawn like train, as Kaggle's) | macro (every "
        "leaf alike). Top-1 can drop while macro rises.",
    )
    tau_grid: tuple[float, ...] = option(
        tuple(round(0.1 * step, 1) for step in range(21)), "Logit-adjustment tau values tried on val (0.0 alone: off)."
    )
    calibrate: bool = option(True, "Temperature scaling of product probabilities, T fitted on val.")
    calibration_products: int = option(10_000, "Val products (at random) whose full distributions fit T.")
    compare_runs: tuple[str, ...] = option(
        (),
        "Evaluated runs one training change apart (e.g. a balanced_softmax run of the same seed), on the same "
        "split: each becomes a row of the levers table.",
    )

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
class PredictConfig:
    """Classify every product of a BSON file into a Kaggle submission."""

    run: str = option("", RUN_HELP, path=True)
    bson: str = option("", "A Kaggle BSON file (test.bson).", path=True)
    out: str = option("submission.csv", "Submission CSV: _id,category_id.", path=True)
    batch_size: int = option(64, "Products per forward.")

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


@dataclasses.dataclass
class ServeConfig:
    """HTTP server: request limits and micro-batching of model forwards."""

    # Plain strings, not required paths: either one names what to serve (serve() refuses neither in one line).
    run: str = option("", "Run directory (W/runs/NAME); optional with --onnx.")
    onnx: str = option("", "Serve from this exported file (`prodcat export`, ONNX Runtime) instead of PyTorch.")
    host: str = option("127.0.0.1", "Address to listen on (loopback by default; 0.0.0.0 for every one).")
    port: int = option(8000, "TCP port (checked before the model loads).")
    top_k: int = option(5, "Categories returned per product.")
    max_images: int = option(4, "Photos per product (per request).")
    max_upload_bytes: int = option(10 * 1024 * 1024, "Bytes per photo.")
    # Non-JPEG formats decode at full size before they are reduced, so this bounds each decode's memory.
    max_pixels: int = option(
        12_000_000, "Declared width * height; larger is refused before decoding (12 MP takes a 4000 x 3000 photo)."
    )
    # One full-size decode at a time bounds decoding memory (~50 MB for a 12 MP PNG), and a 180x180 JPEG decodes in
    # ~1 ms, far below a forward, so one thread keeps up with the model.
    decode_threads: int = option(1, "Pictures decoded at once.")
    max_queued_bytes: int = option(
        64 * 1024 * 1024, "Decoded pixels waiting for or in a forward; beyond this the server answers 503."
    )
    header_timeout_s: float = option(10.0, "Seconds for the request line and headers (slow clients are cut off).")
    body_timeout_s: float = option(60.0, "Seconds for the whole upload (else 408).")
    body_idle_timeout_s: float = option(10.0, "Longest gap in an upload, in seconds (else 408).")
    max_header_bytes: int = option(64 * 1024, "Request line + headers, in bytes; larger gets 431.")
    docs: bool = option(True, "/docs (Swagger UI, served from local files) and /openapi.json.")
    batch_window_ms: float = option(5.0, "Longest wait for more requests once one is queued, in ms.")
    max_batch_images: int = option(16, "Images per forward; on 2 CPU cores the cost per image is lowest at ~8-16.")
    micro_batching: bool = option(
        True, "Batch concurrent requests into one forward (off: one forward per request, the benchmark's baseline)."
    )
    max_pending_requests: int = option(512, "Queued + decoding requests; beyond this the server answers 503.")

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


@dataclasses.dataclass
class ExportConfig:
    """ONNX export of a run: one graph from a product's uint8 pictures to its top-k leaves (prodcat.predict.export)."""

    run: str = option("", RUN_HELP, path=True)
    out: str = option("", "The .onnx file to write; its JSON sidecar goes beside it as OUT.json.", path=True)
    top_k: int = option(5, "Leaves per product, fixed in the graph.")
    which: str = option("best", "Checkpoint: best | last.")
    overwrite: bool = option(
        False, "Replace an existing OUT and its sidecar (without it, an existing file is an error)."
    )

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        _check_choice(self.which, ("best", "last"), "which")
        _check(bool(self.out), "export needs an output file (--out model.onnx)")


# The OCR registries' names (prodcat.ocr.engine, prodcat.ocr.select), here without numpy or PIL so the CLI can build
# its options at once; a test holds them equal to the registries.
OCR_ENGINES = ("rapidocr", "tesseract")
OCR_SELECTORS = ("all", "text_likely")
FUSIONS = ("auto", "late", "concat")


@dataclasses.dataclass
class OcrConfig:
    """OCR over catalog pictures into W/ocr/."""

    workdir: str = option("", WORKDIR_HELP, short="-w", path=True)
    splits: tuple[str, ...] = option(("train", "val", "holdout", "test"), "Splits to read.", aliases=("split",))
    engine: str = option("tesseract", "OCR engine: tesseract | rapidocr.")
    select: str = option("all", "Pictures read: all | text_likely (a cheap text-presence test first).")
    workers: int | None = option(None, "OCR worker processes (default: one per core; 0: in this process).")
    shard_size: int = option(256, "Pictures per shard (the resume unit).")
    limit: int | None = option(None, "At most this many products per split (quick looks).")
    examples: int = option(6, "Pictures drawn in examples.png (by prodcat.report.ocr_examples, from the tables).")

    def __post_init__(self) -> None:
        self.splits = tuple(self.splits)
        for split in self.splits:
            if split not in ("train", "val", "holdout", "test"):
                raise ConfigError(f"unknown split {split!r}; use train, val, holdout, test")
        if self.engine not in OCR_ENGINES:
            raise ConfigError(f"unknown OCR engine {self.engine!r}; known: {', '.join(OCR_ENGINES)}")
        if self.select not in OCR_SELECTORS:
            raise ConfigError(f"unknown selection {self.select!r}; known: {', '.join(OCR_SELECTORS)}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")


@dataclasses.dataclass(frozen=True)
class TextFeatureConfig:
    """How words become a vector (prodcat.ocr.text_features); saved with a run so serving hashes the same way."""

    n_features: int = 2**18
    min_n: int = 3
    max_n: int = 5
    min_confidence: float = 0.5  # words the engine is less sure of are dropped (noise on photos)
    min_length: int = 2  # single characters read off a photo's texture carry nothing

    def __post_init__(self) -> None:
        if self.n_features < 16:
            raise ConfigError(f"n_features must be >= 16, got {self.n_features}")
        if not 1 <= self.min_n <= self.max_n:
            raise ConfigError(f"need 1 <= min_n <= max_n, got {self.min_n}, {self.max_n}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ConfigError(f"min_confidence must be in [0, 1], got {self.min_confidence}")


@dataclasses.dataclass
class FusionConfig:
    """Train a text model beside a picture run (saved with it, so serving fuses the same way)."""

    run: str = option("", "The picture run to add a text model to (W/runs/NAME).", path=True)
    fusion: str = option("auto", "auto (the better product top-1 on val) | late | concat.")
    n_features: int = option(2**14, "Hashed text vector size (the head has n_features x classes weights).")
    min_confidence: float = option(0.5, "Words the OCR engine is less sure of are dropped.")
    epochs: int = option(40, "Epochs over the train products.")
    lr: float = option(3e-3, "Learning rate of the text model.")
    weight_decay: float = option(1e-4, "Decoupled weight decay.")
    batch_size: int = option(128, "Products per batch.")
    seed: int | None = option(None, "Random seed (default: the picture run's).")
    late_weights: tuple[float, ...] = option(
        (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0), "Weights of the text model tried on val for late fusion."
    )
    overwrite: bool = option(False, "Replace the run's text model (RUN/text/).")

    def __post_init__(self) -> None:
        self.late_weights = tuple(float(w) for w in self.late_weights)
        if self.fusion not in FUSIONS:
            raise ConfigError(f"unknown fusion {self.fusion!r}; use {', '.join(FUSIONS)}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs and batch_size must be >= 1 and lr > 0")
        if not self.late_weights or min(self.late_weights) < 0:
            raise ConfigError(f"late_weights must be non-negative and not empty, got {self.late_weights}")
        TextFeatureConfig(n_features=self.n_features, min_confidence=self.min_confidence)  # checks those two


@dataclasses.dataclass
class RehearsalConfig:
    """Sizes of `prodcat rehearsal` (prodcat.rehearsal.RehearsalPlan adds what is derived from them). The defaults are
    sized for <= 45 minutes on 2 quiet cores (docs/scale.md)."""

    # ~70k train pictures; extraction (~250 pictures/s on 2 cores) dominates with training.
    products: int = option(40_000, "Train products (>= categories).")
    test_products: int = option(4_000, "Test products.")
    categories: int = option(5270, "Leaves (must match --taxonomy-csv when given).")
    taxonomy_csv: str | None = option(None, "Kaggle's category_names.csv as the taxonomy (else a synthetic tree).")
    counts_json: str | None = option(None, "images_per_category.json: the real long tail (else the fitted one).")
    # 0.6, not the demo's 0.5: at ~8 products per leaf fewer stock sets are shared; 0.6 gives ~37 % copies.
    stock_share: float = option(0.6, "Share of products showing a stock set shared with others.")
    seeds: int = option(3, "Training seeds per arm.")
    epochs: float = option(5.0, "Epochs of every training run.")
    num_sampled: int = option(1024, "Negatives K of the sampled-softmax arm.")
    optimizer: str = option("adamw", "Optimizer of every arm.")
    lr: float = option(1e-3, "Peak learning rate of every arm.")
    # 1,024, not 256: the batch rehearsal-full uses, and a quarter of the steps' fixed part (~0.04 s of CPU at 5,270
    # classes, mostly AdamW). The "same cost at 256 and 1,024" once measured here was OpenMP spin-waiting under load.
    batch_size: int = option(1024, "Training batch (rows per step).")
    eval_every: int = option(25, "Validate every N steps.")
    val_fraction: float = option(0.05, "Share of products for selection.")
    holdout_fraction: float = option(0.05, "Share of products for reporting only.")
    arms: tuple[tuple[str, str], ...] = option(
        (("linear", "softmax"), ("linear", "sampled"), ("linear", "adaptive"), ("hier", "softmax")),
        "head:loss arms trained.",
    )
    bootstrap_resamples: int = option(1000, "Resamples of evaluate's intervals.")

    def __post_init__(self) -> None:
        self.arms = tuple((str(head), str(loss)) for head, loss in self.arms)
        if self.seeds < 1 or self.epochs <= 0 or self.num_sampled < 1:
            raise ConfigError("seeds and num_sampled must be >= 1 and epochs > 0")
        if self.products < self.categories:
            raise ConfigError(f"products ({self.products}) must be >= categories ({self.categories})")


@dataclasses.dataclass
class FullRehearsalConfig:
    """Sizes of `prodcat rehearsal-full` (prodcat.rehearsal.FullPlan adds what is derived from them); the defaults
    are the real Cdiscount counts (prodcat.rehearsal.synthetic.REAL, a test holds them equal)."""

    products: int = option(7_069_896, "Train products (the default: the real count).")
    test_products: int = option(1_768_182, "Test products (the default: the real count).")
    dim: int = option(1280, "Feature dimension (1,280 = Xception; smaller only if disk demands).")
    categories: int = option(5270, "Leaves of the synthetic taxonomy (must match --taxonomy-csv when given).")
    taxonomy_csv: str | None = option(None, "Kaggle's category_names.csv as the taxonomy.")
    counts_json: str | None = option(None, "images_per_category.json: real products per leaf.")
    # Small, as validation runs every eval_every steps.
    val_fraction: float = option(0.01, "Share of products for selection.")
    holdout_fraction: float = option(0.05, "Share of products for reporting only.")
    shard_size: int = option(65_536, "Rows per feature-store shard.")
    seed: int = option(0, SEED_HELP)
    # Picture noise has std 1; these set how far apart the synthetic classes are.
    level1_norm: float = option(3.0, "Norm of the level-1 part of each class centre.")
    level2_norm: float = option(3.0, "Norm of the level-2 part of each class centre.")
    leaf_norm: float = option(3.5, "Norm of the leaf part of each class centre.")
    product_spread: float = option(0.4, "Per-dimension spread of the product part.")
    train_steps: int = option(300, "Training steps per loss (epoch time extrapolated).", aliases=("steps",))
    batch_size: int = option(1024, "Training batch (rows per step).")
    num_sampled: int = option(1024, "Negatives K of the sampled-softmax run.")
    optimizer: str = option("adamw", "Optimizer of both runs.")
    lr: float = option(2e-3, "Peak learning rate of both runs.")
    bootstrap_resamples: int = option(1000, "Resamples of evaluate's intervals.")

    def __post_init__(self) -> None:
        if self.products < 1 or self.test_products < 1:
            raise ConfigError("products and test_products must be >= 1")
        if self.dim < 1 or self.shard_size < 1 or self.train_steps < 1 or self.batch_size < 1:
            raise ConfigError("dim, shard_size, train_steps and batch_size must be >= 1")
        if not (0 < self.val_fraction and 0 < self.holdout_fraction and self.val_fraction + self.holdout_fraction < 1):
            raise ConfigError("val_fraction and holdout_fraction must be > 0 and sum to < 1")


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
    """Build `cls` from a dict, ignoring unknown keys (older/newer runs) and re-running the checks. A field's
    earlier name (its `aliases`, e.g. TrainConfig.store was `features`) is read when the field itself is absent."""
    values = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        for key in (field.name, *field.metadata.get("aliases", ())):
            if key in data:
                values[field.name] = data[key]
                break
    return cls(**values)


def load_config(cls: type[C], path: str | Path) -> C:
    """Read a `save_config` file; one saved from another config class is refused (its keys would be ignored)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    saved = data.get("_type", cls.__name__)
    _check(saved == cls.__name__, f"{path} holds a {saved}, not a {cls.__name__}")
    return config_from_dict(cls, data)
