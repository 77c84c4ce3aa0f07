"""One way tests write a labelled feature store as evaluate, predict and training read it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prodcat.config import ExtractConfig, save_config
from prodcat.data.taxonomy import Taxonomy
from prodcat.features.store import FeatureStore, write_store
from prodcat.paths import WorkPaths

STORE = "toy"


def write_labelled_store(
    root: Path,
    taxonomy: Taxonomy,
    features: np.ndarray,
    *,
    product_id: np.ndarray,
    image_index: np.ndarray,
    label: np.ndarray,
    split: np.ndarray,
    shard_size: int = 64,
    store: str = STORE,
    with_config: bool = True,
) -> FeatureStore:
    """Rows of `features` as W/features/<store>: the level columns from `taxonomy`, and (`with_config`) the store's
    ExtractConfig that Predictor.load reads (backbone "arrays": no backbone is ever built on cached features)."""
    label = np.asarray(label)
    path = WorkPaths(root).feature_store(store)
    written = write_store(
        path,
        np.asarray(features, np.float32),
        product_id=np.asarray(product_id),
        image_index=np.asarray(image_index),
        label=label,
        level1=taxonomy.leaf_level1[label],
        level2=taxonomy.leaf_level2[label],
        split=np.asarray(split),
        shard_size=shard_size,
    )
    if with_config:
        save_store_config(root, store)
    return written


def save_store_config(root: Path, store: str = STORE) -> None:
    """The store's ExtractConfig that Predictor.load and evaluate read (no backbone is built on cached features)."""
    config = ExtractConfig(workdir=str(root), backbone="arrays", store_name=store, random_init=True)
    save_config(config, WorkPaths(root).feature_store(store) / "config.json")
