"""`prodcat explore` on a full-scale catalog: 7,069,896 products shaped like Kaggle's train.bson.

The catalog is synthetic but real in shape: products per category are the real per-category image counts of
`../shared/data/cdiscount/images_per_category.json` scaled to 7,069,896 products, images per product follow the
real distribution exactly (1: 4,369,441; 2: 1,128,588; 3: 542,792; 4: 1,029,075, so 12,371,293 images), the
taxonomy is the real `category_names.csv`, and the Parquet catalog has the schema ingest writes.

Goal: explore under 15 s. Printed beside it, measured interleaved: reading the three columns explore needs, so the
ratio shows how much of the time is counting and drawing rather than Parquet I/O.

    python benchmarks/bench_explore.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prodcat.data.split import stratified_split
from prodcat.data.taxonomy import Taxonomy, read_category_csv
from prodcat.paths import WorkPaths
from prodcat.report.explore import explore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_times, write_result  # noqa: E402

NAME = "explore_7m_seconds"
GOAL_SECONDS = 15.0
DATA_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cdiscount"
FULL_PRODUCTS = 7_069_896
# Kaggle's train.bson: products having 1, 2, 3 and 4 images.
IMAGES_PER_PRODUCT = {1: 4_369_441, 2: 1_128_588, 3: 542_792, 4: 1_029_075}


def scaled_counts(images_per_category: dict[int, int], products: int) -> dict[int, int]:
    """Per-category product counts proportional to image counts, summing exactly to `products` (each >= 1)."""
    ids = np.array(sorted(images_per_category), dtype=np.int64)
    weights = np.array([images_per_category[i] for i in ids.tolist()], dtype=np.float64)
    exact = weights / weights.sum() * (products - len(ids))
    counts = np.floor(exact).astype(np.int64) + 1
    # Largest remainders get the products that flooring dropped.
    short = products - int(counts.sum())
    counts[np.argsort(-(exact - np.floor(exact)), kind="stable")[:short]] += 1
    return dict(zip(ids.tolist(), counts.tolist(), strict=True))


def images_per_product(products: int, rng: np.random.Generator) -> np.ndarray:
    """Images per product in the real proportions (exact at full scale), shuffled."""
    shares = np.array(list(IMAGES_PER_PRODUCT.values()), dtype=np.float64) / FULL_PRODUCTS
    sizes = np.floor(shares * products).astype(np.int64)
    sizes[0] += products - int(sizes.sum())
    return rng.permutation(np.repeat(np.array(list(IMAGES_PER_PRODUCT), dtype=np.int8), sizes))


def build_catalog(workdir: Path, products: int, seed: int = 0) -> dict:
    """Write W/taxonomy.parquet and W/catalog/train.parquet with ingest's schema; returns build facts."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    rows = read_category_csv(DATA_DIR / "category_names.csv")
    raw = json.loads((DATA_DIR / "images_per_category.json").read_text(encoding="utf-8"))
    counts = scaled_counts({int(k): int(v) for k, v in raw.items()}, products)
    taxonomy = Taxonomy.from_rows(rows, counts)
    paths = WorkPaths(workdir)
    taxonomy.save(paths.taxonomy)
    labels = rng.permutation(np.repeat(np.arange(taxonomy.num_classes, dtype=np.int32), taxonomy.train_counts))
    num_images = images_per_product(products, rng)
    length = (num_images.astype(np.int32) * rng.integers(4_000, 9_000, products, dtype=np.int32)) + 60
    is_val = stratified_split(labels, 0.05, seed)
    table = pa.table(
        {
            "product_id": pa.array(np.arange(products, dtype=np.int64) * 2),
            "offset": pa.array(np.concatenate([[0], np.cumsum(length[:-1], dtype=np.int64)])),
            "length": pa.array(length),
            "num_images": pa.array(num_images),
            "category_id": pa.array(taxonomy.category_ids[labels]),
            "label": pa.array(labels),
            "level1": pa.array(taxonomy.leaf_level1[labels]),
            "level2": pa.array(taxonomy.leaf_level2[labels]),
            "split": pa.array(np.where(is_val, "val", "train")).dictionary_encode(),
        }
    ).replace_schema_metadata({b"prodcat.source": b"synthetic:bench_explore"})
    paths.catalog.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, paths.catalog_table("train"))
    return {
        "products": products,
        "images": int(num_images.sum(dtype=np.int64)),
        "leaves": taxonomy.num_classes,
        "build_seconds": round(time.perf_counter() - start, 2),
        "parquet_mb": round(paths.catalog_table("train").stat().st_size / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="70k products, one repeat, no result file")
    args = parser.parse_args()
    if not (DATA_DIR / "category_names.csv").is_file():
        print(f"SKIP {NAME}: {DATA_DIR} is absent (real category_names.csv and images_per_category.json needed)")
        return
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        pass
    products = 70_000 if args.quick else FULL_PRODUCTS
    repeats = 1 if args.quick else 3
    with tempfile.TemporaryDirectory(prefix="bench_explore_") as tmp:
        facts = build_catalog(Path(tmp), products)
        print(
            f"built {facts['products']:,} products, {facts['images']:,} images in {facts['build_seconds']} s",
            flush=True,
        )
        train_path = WorkPaths(tmp).catalog_table("train")
        summary: dict = {}

        def run_explore() -> None:
            summary.update(explore(tmp))

        times = interleaved_times(
            {
                "explore": run_explore,
                "read_columns": lambda: pq.read_table(train_path, columns=["label", "num_images", "split"]),
            },
            repeats=repeats,
            warmup=1,
        )
    assert summary["products"] == products and summary["images"] == facts["images"], "explore miscounted"
    details = {
        **facts,
        "explore_seconds": round(times["explore"], 3),
        "read_seconds": round(times["read_columns"], 3),
        "explore_over_read": round(times["explore"] / max(times["read_columns"], 1e-9), 1),
        "repeats": repeats,
        "leaves_for_50pct": summary["coverage"]["leaves_for_share"]["0.5"],
        "leaves_for_90pct": summary["coverage"]["leaves_for_share"]["0.9"],
    }
    print(json.dumps(details))
    if args.quick:
        ok = "ok" if times["explore"] <= GOAL_SECONDS else "MISS"
        print(f"BENCH {NAME}_quick {times['explore']:.4f} s goal <= {GOAL_SECONDS} {ok} (quick: no result file)")
        return
    write_result(NAME, times["explore"], "s", GOAL_SECONDS, "<=", details)


if __name__ == "__main__":
    main()
