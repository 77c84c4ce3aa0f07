"""Extraction pipeline vs model-only forward (issue: feature extraction at scale).

pipeline: the whole extract path after set-up (BSON read by catalog offsets, JPEG decode + preprocess in a DataLoader
worker, forward in the auto mode, float16 shard writes) over demo data. model-only: the same runner's forward on
pre-made tensors of the same batch size and image count. Interleaved A B A B, medians, 2 torch threads.
Goal: pipeline_img_per_s / model_only_img_per_s >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

CACHE = Path(os.environ.get("PRODCAT_BENCH_CACHE", "/tmp/prodcat-bench"))


def _workdir(products: int) -> Path:
    from prodcat.config import DemoConfig, IngestConfig
    from prodcat.data.catalog import ingest
    from prodcat.data.synthetic.demo import generate_demo

    root = CACHE / f"extract-{products}"
    if not (root / "W" / "catalog" / "train.parquet").is_file():
        shutil.rmtree(root, ignore_errors=True)
        generate_demo(
            root / "data", DemoConfig(products=products, test_products=0, categories=30, unique_images_per_leaf=32)
        )
        ingest(IngestConfig(data_dir=str(root / "data"), workdir=str(root / "W"), val_fraction=0.0))
    return root / "W"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--workers", type=int, default=None, help="default: auto, as `prodcat extract`")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from prodcat.config import ExtractConfig
    from prodcat.distributed import DistInfo
    from prodcat.features.backbones import create_backbone
    from prodcat.features.extract import _run_shards, plan_rows
    from prodcat.features.extractor import FeatureExtractor
    from prodcat.features.inference import InferenceRunner
    from prodcat.features.store import FeatureStore

    products, batch, repeats = (60, 32, 2) if args.quick else (400, 32, 3)
    workdir = _workdir(products)
    backbone = create_backbone(args.backbone)
    runner = InferenceRunner(backbone, precision="auto")
    extractor = FeatureExtractor(runner)  # extraction's one feature path (pooled, no TTA)
    plan = plan_rows(workdir, ("train",), dedupe=False)  # every row through the backbone, as model_only below
    images = plan.rows.num_rows
    config = ExtractConfig(
        workdir=str(workdir),
        backbone=args.backbone,
        batch_size=batch,
        workers=args.workers,
        shard_size=1024,
        splits=("train",),
        dedupe=False,
    )
    tensors = torch.randn(batch, *backbone.spec.input_size)

    def pipeline() -> float:
        path = workdir / "features" / "bench"
        shutil.rmtree(path, ignore_errors=True)
        store = FeatureStore.create(
            path,
            plan.rows,
            (backbone.spec.num_features,),
            config.shard_size,
            {"backbone": args.backbone, "weights_id": backbone.weights_id, "kind": "pooled", "preprocessing": None},
        )
        start = time.perf_counter()
        _run_shards(store, store.missing_shards(), plan, extractor, config, DistInfo())
        return time.perf_counter() - start

    def model_only() -> float:
        start = time.perf_counter()
        for first in range(0, images, batch):
            runner(tensors[: min(batch, images - first)])
        return time.perf_counter() - start

    model_only()  # warm-up: allocator, oneDNN kernels, page cache
    pipeline()
    times: dict[str, list[float]] = {"pipeline": [], "model_only": []}
    for _ in range(repeats):
        times["pipeline"].append(pipeline())
        times["model_only"].append(model_only())
    pipe = images / statistics.median(times["pipeline"])
    model = images / statistics.median(times["model_only"])
    details = {
        "backbone": args.backbone,
        "mode": runner.mode,
        "batch": batch,
        "images": images,
        "workers": "auto" if args.workers is None else args.workers,
        "threads": 2,
        "pipeline_img_per_s": round(pipe, 1),
        "model_only_img_per_s": round(model, 1),
        "pipeline_s": times["pipeline"],
        "model_only_s": times["model_only"],
    }
    name = "extract_pipeline_vs_model" + ("_quick" if args.quick else "")
    if args.quick:
        print(f"BENCH {name} {pipe / model:.3f} ratio (quick: no result file) {details}")
        return
    write_result(name, pipe / model, "ratio", 0.9, ">=", details)


if __name__ == "__main__":
    main()
