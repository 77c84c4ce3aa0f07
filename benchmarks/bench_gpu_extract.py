"""GPU extraction speed of legacy_xception at 180x180 (run by benchmarks/gpu_extract.sh on a lent GPU machine).

Measures, in one run on the same card: (a) model-only forward img/s on pre-made tensors (fp32 NCHW eager and the
auto mode: bf16 autocast + channels_last), (b) the whole `prodcat extract` path (BSON read, JPEG decode in
DataLoader workers, preprocess, forward, float16 shards) img/s on demo data, and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402


def model_only(batch: int, repeats: int, precision: str) -> float:
    from prodcat.features.backbones import create_backbone
    from prodcat.features.inference import InferenceRunner

    runner = InferenceRunner(
        create_backbone("legacy_xception", random_init=True), precision=precision, device=torch.device("cuda")
    )
    x = torch.rand(batch, 3, 180, 180, device="cuda")
    for _ in range(3):
        runner(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        runner(x)
    torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start), runner.mode


def pipeline(workdir: Path, products: int, batch: int, workers: int) -> tuple[float, int]:
    from prodcat.config import DemoConfig, ExtractConfig, IngestConfig
    from prodcat.data.catalog import ingest
    from prodcat.data.demo import generate_demo
    from prodcat.features.extract import extract
    from prodcat.features.store import FeatureStore

    generate_demo(
        workdir / "data", DemoConfig(products=products, test_products=0, categories=60, unique_images_per_leaf=64)
    )
    ingest(IngestConfig(data_dir=str(workdir / "data"), workdir=str(workdir), val_fraction=0.0))

    def config(**overrides: object) -> ExtractConfig:
        values = dict(
            workdir=str(workdir),
            backbone="legacy_xception",
            random_init=True,
            splits=("train",),
            batch_size=batch,
            workers=workers,
            shard_size=8192,
        )
        return ExtractConfig(**{**values, **overrides})

    # Warm-up run on a few products (model load, cuDNN autotune), then the timed full run.
    extract(config(limit=batch * 2, name="warm", shard_size=4096))
    start = time.perf_counter()
    path = extract(config())
    seconds = time.perf_counter() - start
    images = len(FeatureStore.open(path))
    return images / seconds, images


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--products", type=int, default=30000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=12)
    args = parser.parse_args()
    card = torch.cuda.get_device_name(0)
    fp32, _ = model_only(args.batch, 20, "float32")
    best, mode = model_only(args.batch, 40, "auto")
    with tempfile.TemporaryDirectory() as tmp:
        pipe, images = pipeline(Path(tmp), args.products, args.batch, args.workers)
    details = {
        "card": card,
        "batch": args.batch,
        "workers": args.workers,
        "images": images,
        "mode": mode,
        "model_only_fp32_img_per_s": round(fp32, 1),
        "model_only_auto_img_per_s": round(best, 1),
        "pipeline_img_per_s": round(pipe, 1),
        "pipeline_vs_model": round(pipe / best, 3),
        "torch": torch.__version__,
    }
    print(details, flush=True)
    write_result("gpu_extract_xception_img_per_s", pipe, "img/s", None, ">=", details, device=card)


if __name__ == "__main__":
    main()
