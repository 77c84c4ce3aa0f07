"""A demo work directory with an extracted feature store (synthetic demo data), built once and reused by the
issue-14 benchmarks (bench_product_head, bench_new_categories): demo data -> ingest -> extract (Lite0, pooled)."""

from __future__ import annotations

from pathlib import Path

from prodcat.config import DemoConfig, ExtractConfig, IngestConfig
from prodcat.paths import WorkPaths

FEATURES = "efficientnet_lite0-pooled"
SIZES = {"full": {"products": 2000, "categories": 40}, "quick": {"products": 400, "categories": 12}}
SYNTHETIC = "demo data is synthetic (prodcat demo-data): numbers show the method at work, not Cdiscount"


def demo_store(workdir: Path, quick: bool, seed: int = 0) -> Path:
    """`workdir` with W/features/FEATURES extracted (train, val, holdout); skipped where it is there already.

    `seed` draws the synthetic catalogue (another seed: other products, pictures and leaf sizes)."""
    from prodcat.data.catalog import ingest
    from prodcat.data.synthetic.demo import generate_demo
    from prodcat.features.extract import extract

    paths = WorkPaths(workdir)
    if (paths.feature_store(FEATURES) / "manifest.json").is_file():
        return workdir
    size = SIZES["quick" if quick else "full"]
    data = workdir / "data"
    demo = DemoConfig(products=size["products"], test_products=10, categories=size["categories"], seed=seed)
    generate_demo(data, demo)
    ingest(IngestConfig(data_dir=str(data), workdir=str(workdir), val_fraction=0.15, seed=0))
    extract(
        ExtractConfig(
            workdir=str(workdir),
            backbone="efficientnet_lite0",
            features="pooled",
            splits=("train", "val", "holdout"),
            batch_size=64,
        )
    )
    return workdir
