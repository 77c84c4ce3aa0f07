"""A tiny work directory of PRODUCTS (1-4 pictures each, one label per product) in a real feature store, with
train / val / holdout splits, for the product head and prototype tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prodcat.config import TrainConfig
from prodcat.data.taxonomy import Taxonomy
from prodcat.features.store import FeatureStore
from prodcat.paths import WorkPaths
from store_fixtures import write_labelled_store

STORE = "toy"
DIM = 16
CLASSES = 6
ROWS = [(7000 + c, f"L1 {c % 2}", f"L2 {c % 3}", f"leaf {c}") for c in range(CLASSES)]


def make_product_workdir(
    root: Path, products: int = 150, seed: int = 0, centres: np.ndarray | None = None
) -> tuple[Taxonomy, FeatureStore, np.ndarray]:
    """Products of 1-4 noisy pictures around their class centre (ids decrease in store order); 60/20/20 split by
    product. Returns the taxonomy, the store and the class centres."""
    rng = np.random.default_rng(seed)
    taxonomy = Taxonomy.from_rows(ROWS, {row[0]: 10 for row in ROWS})
    paths = WorkPaths(root)
    taxonomy.save(paths.taxonomy)
    centres = rng.normal(size=(CLASSES, DIM)) * 1.5 if centres is None else centres
    features, product_id, image_index, label, split = [], [], [], [], []
    for p in range(products):
        leaf = p % CLASSES
        name = ("train", "train", "train", "val", "holdout")[p % 5]
        for j in range(int(rng.integers(1, 5))):
            features.append(centres[leaf] + rng.normal(size=DIM))
            product_id.append(90_000 - 3 * p)
            image_index.append(j)
            label.append(leaf)
            split.append(name)
    label_array = np.array(label)
    store = write_labelled_store(root, taxonomy, np.array(features), product_id=np.array(product_id),
                                 image_index=np.array(image_index), label=label_array, split=np.array(split),
                                 shard_size=40)  # fmt: skip
    return taxonomy, store, centres


def product_config(root: Path, head: str = "gated_product", **overrides: object) -> TrainConfig:
    settings: dict = dict(
        workdir=str(root), store=STORE, head=head, loss="softmax", lr=0.05, warmup_steps=0, epochs=6,
        batch_size=16, eval_every=20, device="cpu", dropout=0.0, run_name=head,
    )  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)
