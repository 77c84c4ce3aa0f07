"""Tiny synthetic work directories for the training tests: Gaussian class clusters in a real feature store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from prodcat.config import TrainConfig
from prodcat.data.taxonomy import Taxonomy
from prodcat.features.store import FeatureStore, write_store
from prodcat.paths import WorkPaths
from store_fixtures import save_store_config

STORE = "toy"
SPATIAL_STORE = "toy-spatial"


def make_workdir(
    root: Path,
    *,
    rows: int = 300,
    dim: int = 16,
    classes: int = 12,
    val_fraction: float = 0.2,
    separation: float = 3.0,
    seed: int = 0,
    spatial: bool = False,
    holdout_fraction: float = 0.0,
) -> tuple[Taxonomy, FeatureStore]:
    """Taxonomy (3 level-1s, 6 level-2s) + a store of noisy class centres, Zipf-ish class frequencies.

    `spatial` also writes a (2, 2, dim // 4) channels-last store under SPATIAL_STORE from the same rows.
    `holdout_fraction` > 0 makes the store evaluable: splits drawn per product (its two rows share one, and the
    product one label), a holdout split, and the store's ExtractConfig that `evaluate` reads.
    """
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, classes + 1) ** 0.5
    category = rng.choice(classes, size=rows, p=weights / weights.sum())
    categories = [(5000 + c, f"L1 {c % 3}", f"L2 {c % 6}", f"leaf {c}") for c in range(classes)]
    is_val = rng.random(rows) < val_fraction
    split = np.where(is_val, "val", "train")
    if holdout_fraction > 0:
        category = np.repeat(category[::2], 2)[:rows]
        draw = np.repeat(rng.random((rows + 1) // 2), 2)[:rows]
        split = np.select([draw < val_fraction, draw < val_fraction + holdout_fraction], ["val", "holdout"], "train")
        is_val = split != "train"
    counts = {5000 + c: int(((category == c) & ~is_val).sum()) for c in range(classes)}
    taxonomy = Taxonomy.from_rows(categories, counts)
    paths = WorkPaths(root)
    taxonomy.save(paths.taxonomy)
    label = taxonomy.labels_of(5000 + category)
    centres = rng.normal(size=(classes, dim)) * separation / np.sqrt(dim) * 2
    features = (centres[category] + rng.normal(size=(rows, dim))).astype(np.float32)
    columns: dict[str, Any] = dict(
        product_id=np.arange(rows) // 2 + 100,
        image_index=np.arange(rows) % 2,
        label=label,
        level1=taxonomy.leaf_level1[label],
        level2=taxonomy.leaf_level2[label],
        split=split,
    )
    store = write_store(paths.feature_store(STORE), features, shard_size=64, **columns)
    if holdout_fraction > 0:  # evaluable: Predictor.load reads the store's ExtractConfig
        save_store_config(root, STORE)
    if spatial:
        maps = features.reshape(rows, 2, 2, dim // 4)
        write_store(paths.feature_store(SPATIAL_STORE), maps, shard_size=64, **columns)
    return taxonomy, store


def tiny_config(root: Path, **overrides: Any) -> TrainConfig:
    """A config that trains in well under a second on the tiny store."""
    settings: dict[str, Any] = dict(
        workdir=str(root),
        store=STORE,
        head="linear",
        loss="softmax",
        lr=0.05,
        warmup_steps=2,
        epochs=2,
        batch_size=32,
        eval_every=5,
        hidden_dim=16,
        dropout=0.0,
        num_sampled=4,
        device="cpu",
    )
    settings.update(overrides)
    return TrainConfig(**settings)
