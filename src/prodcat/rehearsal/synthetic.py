"""A full-size work directory without pictures: taxonomy, catalogs and a feature store of class-structured vectors.

Everything is written through the real code paths and formats (`Taxonomy.save`, the catalog Parquet schema,
`FeatureStore.create` / `write_shard` / `finalize`, the store's ExtractConfig), so train, evaluate and predict
read it exactly as they read an extracted store. Only the vectors are synthetic:

  feature = level-1 part + level-2 part + leaf part (the class centre) + a product part shared by its pictures
            + picture noise

so leaves under one level-2 group are closer to one another than to the rest (the hierarchy is learnable) and the
pictures of a product agree more than pictures of different products. Products per leaf follow the real counts
(`images_per_category.json`) when given, pictures per product the real 1-4 counts; a product's pictures are
consecutive rows. The catalogs' offset/length columns describe no file (there is no BSON): their source says so.
Peak memory stays at the per-row arrays (a few hundred MB at 15.5 M rows) plus one shard.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from prodcat.config import ExtractConfig, FullRehearsalConfig, save_config
from prodcat.data.split import SPLITS
from prodcat.data.synthetic.demo import (
    CategoryRow,
    category_counts,
    counts_from_images,
    make_taxonomy,
    read_taxonomy_rows,
)
from prodcat.data.taxonomy import Taxonomy
from prodcat.features.store import FeatureStore, ShardResult, make_rows
from prodcat.paths import WorkPaths
from prodcat.utils import get_logger, progress, write_json, write_parquet

__all__ = [
    "REAL",
    "FullPlan",
    "picture_counts",
    "store_bytes",
    "write_synthetic_workdir",
    "STORE_NAME",
    "SYNTHETIC_SOURCE",
]

log = get_logger("prodcat.rehearsal")

STORE_NAME = "synthetic-pooled"
SYNTHETIC_SOURCE = "synthetic:prodcat rehearsal-full (no BSON file; offsets are nominal)"

# The real Kaggle counts (README of ../shared/data/cdiscount).
REAL = {
    "train_products": 7_069_896,
    "train_images": 12_371_293,
    "test_products": 1_768_182,
    "test_images": 3_095_080,
    "images_per_product": (4_369_441, 1_128_588, 542_792, 1_029_075),  # products with 1, 2, 3, 4 pictures
    "train_bson_bytes": 58 * 10**9,
}
_BYTES_PER_PICTURE = 4_690  # nominal catalog lengths: 58 GB / 12.37 M pictures (document overhead included)


@dataclasses.dataclass
class FullPlan(FullRehearsalConfig):
    """The sizes (prodcat.config.FullRehearsalConfig, where their defaults and help live; the real Cdiscount counts)
    and what follows from them."""

    def train_images(self) -> int:
        """Train pictures: the real count at full size, the real pictures-per-product ratio otherwise."""
        if self.products == REAL["train_products"]:
            return REAL["train_images"]
        return round(self.products * REAL["train_images"] / REAL["train_products"])

    def test_images(self) -> int:
        if self.test_products == REAL["test_products"]:
            return REAL["test_images"]
        return round(self.test_products * REAL["test_images"] / REAL["test_products"])


def store_bytes(plan: FullPlan) -> int:
    """Bytes of the float16 shards the plan writes (train and test rows)."""
    return (plan.train_images() + plan.test_images()) * plan.dim * 2


def picture_counts(products: int, images: int) -> np.ndarray:
    """How many products have 1, 2, 3, 4 pictures: the real proportions, summing exactly to (products, images)."""
    if not products <= images <= 4 * products:
        raise ValueError(f"{images} pictures cannot spread over {products} products with 1-4 each")
    real = np.array(REAL["images_per_product"], dtype=np.float64)
    extra = images - products  # pictures beyond the first of each product
    scale = extra / float(real[1] + 2 * real[2] + 3 * real[3])
    two, three = round(real[1] * scale), round(real[2] * scale)
    three = min(three, max(0, (extra - two) // 2))
    four, rest = divmod(max(0, extra - two - 2 * three), 3)
    two = min(two + rest, products)  # the remainder (0-2 extra pictures) as one more 2-picture product each
    counts = np.array([products - two - three - four, two, three, four], dtype=np.int64)
    if counts.min() < 0 or int(counts @ np.arange(1, 5)) != images:
        raise ValueError(f"no 1-4 split of {images} pictures over {products} products near the real proportions")
    return counts


def _taxonomy_rows(plan: FullPlan) -> tuple[list[CategoryRow], np.ndarray]:
    rows = read_taxonomy_rows(plan.taxonomy_csv) if plan.taxonomy_csv else make_taxonomy(plan.categories, plan.seed)
    if plan.counts_json:
        return rows, counts_from_images(plan.counts_json, rows, plan.products)
    return rows, category_counts(len(rows), plan.products, plan.seed)


def _centres(taxonomy: Taxonomy, plan: FullPlan) -> np.ndarray:
    """(classes, dim) float32 class centres: level-1 + level-2 + leaf parts, each of its plan norm."""
    rng = np.random.default_rng([plan.seed, 1])

    def part(count: int, norm: float) -> np.ndarray:
        return (rng.standard_normal((count, plan.dim), dtype=np.float32) * (norm / np.sqrt(plan.dim))).astype(
            np.float32
        )

    level1 = part(len(taxonomy.level1_names), plan.level1_norm)
    level2 = part(len(taxonomy.level2_names), plan.level2_norm)
    leaf = part(taxonomy.num_classes, plan.leaf_norm)
    return level1[taxonomy.leaf_level1] + level2[taxonomy.leaf_level2] + leaf


@dataclasses.dataclass
class _Products:
    """Every product of the catalog in row order: id, label (-1 for test), pictures, split code (3 = test)."""

    product_id: np.ndarray
    label: np.ndarray
    num_images: np.ndarray
    split: np.ndarray


def _products(plan: FullPlan, taxonomy: Taxonomy, leaf_counts: np.ndarray, rows: list[CategoryRow]) -> _Products:
    rng = np.random.default_rng([plan.seed, 2])
    labels_by_row = taxonomy.labels_of(np.array([row.category_id for row in rows], dtype=np.int64))
    train_label = np.repeat(labels_by_row.astype(np.int32), leaf_counts)
    rng.shuffle(train_label)
    train_images = np.repeat(np.arange(1, 5, dtype=np.int8), picture_counts(plan.products, plan.train_images()))
    test_images = np.repeat(np.arange(1, 5, dtype=np.int8), picture_counts(plan.test_products, plan.test_images()))
    rng.shuffle(train_images)
    rng.shuffle(test_images)
    roll = rng.random(plan.products)
    split = np.where(roll < plan.holdout_fraction, 2, np.where(roll < plan.holdout_fraction + plan.val_fraction, 1, 0))
    total = plan.products + plan.test_products
    gaps = 1 + (rng.random(total) < 0.1) * rng.integers(1, 4, total)  # increasing ids with gaps, as in Kaggle's
    ids = np.cumsum(gaps, dtype=np.int64) - 1
    return _Products(
        product_id=ids,
        label=np.concatenate([train_label, np.full(plan.test_products, -1, dtype=np.int32)]),
        num_images=np.concatenate([train_images, test_images]),
        split=np.concatenate([split.astype(np.int8), np.full(plan.test_products, 3, dtype=np.int8)]),
    )


def _write_catalogs(paths: WorkPaths, products: _Products, taxonomy: Taxonomy, train: int) -> None:
    """catalog/train.parquet and test.parquet in ingest's schema (nominal offsets: there is no BSON)."""
    length = products.num_images.astype(np.int64) * _BYTES_PER_PICTURE
    offset = np.cumsum(length) - length
    metadata = {b"prodcat.source": SYNTHETIC_SOURCE.encode("utf-8")}
    label = products.label[:train]
    train_table = pa.table(
        {
            "product_id": pa.array(products.product_id[:train]),
            "offset": pa.array(offset[:train]),
            "length": pa.array(length[:train]),
            "num_images": pa.array(products.num_images[:train].astype(np.int32)),
            "category_id": pa.array(taxonomy.category_ids[label]),
            "label": pa.array(label),
            "level1": pa.array(taxonomy.leaf_level1[label]),
            "level2": pa.array(taxonomy.leaf_level2[label]),
            "split": pa.DictionaryArray.from_arrays(
                pa.array(products.split[:train].astype(np.int32)), pa.array(SPLITS)
            ),
            "group": pa.array(np.arange(train, dtype=np.int64)),  # no shared pictures: each product its own group
        }
    )
    test_table = pa.table(
        {
            "product_id": pa.array(products.product_id[train:]),
            "offset": pa.array(offset[train:] - offset[train]),
            "length": pa.array(length[train:]),
            "num_images": pa.array(products.num_images[train:].astype(np.int32)),
        }
    )
    write_parquet(paths.catalog_table("train"), train_table.replace_schema_metadata(metadata))
    write_parquet(paths.catalog_table("test"), test_table.replace_schema_metadata(metadata))


def _row_table(products: _Products, taxonomy: Taxonomy) -> tuple[pa.Table, np.ndarray]:
    """The store's row plan, and per row its product index."""
    counts = products.num_images.astype(np.int64)
    product_index = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    starts = np.cumsum(counts) - counts
    image_index = (np.arange(len(product_index), dtype=np.int64) - starts[product_index]).astype(np.int8)
    names = np.array([*SPLITS, "test"], dtype=object)
    label = products.label[product_index]
    stored_label = np.where(label >= 0, label, 0).astype(np.int32)  # test rows carry no label (0, as extraction's)
    table = make_rows(
        products.product_id[product_index],
        image_index,
        stored_label,
        taxonomy.leaf_level1[stored_label],
        taxonomy.leaf_level2[stored_label],
        names[products.split[product_index]],
    )
    return table, product_index


def _hidden_test_labels(plan: FullPlan, taxonomy: Taxonomy) -> np.ndarray:
    """True leaves of the test products (kept out of the store), drawn with the train class frequencies."""
    rng = np.random.default_rng([plan.seed, 3])
    frequency = taxonomy.train_counts / taxonomy.train_counts.sum()
    return rng.choice(taxonomy.num_classes, size=plan.test_products, p=frequency).astype(np.int32)


def _write_shards(
    store: FeatureStore, centres: np.ndarray, label: np.ndarray, product: np.ndarray, plan: FullPlan
) -> None:
    """Shard by shard: centre of the row's leaf + its product's part + noise, cast to float16."""
    for shard in progress(store.missing_shards(), total=store.num_shards, desc="synthetic store", unit="shard"):
        start, stop = store.shard_rows(shard)
        rng = np.random.default_rng([plan.seed, 4, shard])
        rows = slice(start, stop)
        first = int(product[start])
        local = product[rows] - first  # a product straddling two shards gets a part in each: harmless noise
        product_part = rng.standard_normal((int(local[-1]) + 1, plan.dim), dtype=np.float32) * plan.product_spread
        features = rng.standard_normal((stop - start, plan.dim), dtype=np.float32)
        features += centres[label[rows]]
        features += product_part[local]
        store.write_shard(shard, ShardResult(features.astype(np.float16), []))


def write_synthetic_workdir(workdir: str | Path, plan: FullPlan) -> dict[str, Any]:
    """Taxonomy, catalogs and a complete feature store STORE_NAME for `plan`; returns counts."""
    paths = WorkPaths(workdir)
    rows, leaf_counts = _taxonomy_rows(plan)
    counts = {row.category_id: int(count) for row, count in zip(rows, leaf_counts, strict=True)}
    taxonomy = Taxonomy.from_rows([tuple(row) for row in rows], counts)
    taxonomy.save(paths.taxonomy)
    products = _products(plan, taxonomy, leaf_counts, rows)
    _write_catalogs(paths, products, taxonomy, plan.products)
    table, row_product = _row_table(products, taxonomy)
    hidden = _hidden_test_labels(plan, taxonomy)
    row_label = np.concatenate([products.label[: plan.products], hidden])[row_product]
    meta = {"backbone": "synthetic", "weights_id": "none", "kind": "pooled", "preprocessing": None}
    store = FeatureStore.create(paths.feature_store(STORE_NAME), table, (plan.dim,), plan.shard_size, meta)
    del table
    _write_shards(store, _centres(taxonomy, plan), row_label, row_product, plan)
    store.finalize()
    # Predictor.load reads the store's ExtractConfig; no backbone is ever built on stored features.
    save_config(
        ExtractConfig(workdir=str(workdir), backbone="synthetic", store_name=STORE_NAME, random_init=True),
        paths.feature_store(STORE_NAME) / "config.json",
    )
    truth = {"product_id": products.product_id[plan.products :], "label": hidden}
    write_parquet(paths.root / "rehearsal_test_truth.parquet", pa.table(truth))
    summary = {
        "products": plan.products,
        "test_products": plan.test_products,
        "train_rows": plan.train_images(),
        "test_rows": plan.test_images(),
        "rows": len(store),
        "dim": plan.dim,
        "classes": taxonomy.num_classes,
        "splits": {name: int((products.split == code).sum()) for code, name in enumerate([*SPLITS, "test"])},
        "store_bytes": store_bytes(plan),
    }
    write_json(paths.root / "rehearsal_synthetic.json", summary)
    return summary
