"""GPU extraction speed of legacy_xception at 180x180 (run by benchmarks/gpu_extract.sh on a lent GPU machine).

Measures, in one run on the same card: (a) model-only forward img/s on pre-made tensors (fp32 NCHW eager and the
auto mode: bf16 autocast + channels_last), (b) the whole `prodcat extract` path (BSON read, JPEG decode in
DataLoader workers, preprocess, forward, float16 shards) img/s on demo data, and their ratio, (c) whether GPU JPEG
decode would help: libjpeg-turbo img/s in one CPU process (times the DataLoader workers gives the CPU decode
capacity) against torchvision's batched nvJPEG decode on the card, on the same 180x180 Cdiscount-sized JPEGs.

    bash benchmarks/gpu_extract.sh [--products N]               (on the GPU machine)
    python benchmarks/bench_gpu_extract.py --device cpu --products 200 --batch 16 --workers 1   (smoke test here)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(
    batch: int, repeats: int, precision: str, device: torch.device, from_host: bool = False
) -> tuple[float, str]:
    """Forward img/s on a batch already on the device, or (from_host) on a pinned uint8 host batch as extraction
    feeds it: copy, normalise on the device, forward."""
    from prodcat.features.backbones import create_backbone
    from prodcat.features.inference import InferenceRunner

    runner = InferenceRunner(create_backbone("legacy_xception", random_init=True), precision=precision, device=device)
    x = torch.rand(batch, 3, 180, 180, device=device)
    if from_host:
        x = torch.randint(0, 256, (batch, 3, 180, 180), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        x = x.pin_memory() if device.type == "cuda" else x
    for _ in range(3):
        runner(x)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        runner(x)
    _sync(device)
    return batch * repeats / (time.perf_counter() - start), runner.mode


def jpeg_decode(workdir: Path, count: int, device: torch.device) -> dict[str, float]:
    """img/s of the extraction's own CPU decoder in this one process, and of nvJPEG batches of 256 on the card."""
    from prodcat.data.bson_index import BsonReader
    from prodcat.data.images import decode_image
    from prodcat.features.extract import plan_rows

    plan = plan_rows(workdir, ("train",))
    data: list[bytes] = []
    with BsonReader(plan.sources[0]) as reader:
        for row in range(len(plan.offset)):
            if len(data) >= count:
                break
            pictures = reader.pictures(int(plan.offset[row]), int(plan.length[row]))
            data.append(pictures[int(plan.image_index[row])])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one DataLoader worker's view
    try:
        cpu = len(data) / min(_timed(lambda: [decode_image(d) for d in data]) for _ in range(3))
    finally:
        torch.set_num_threads(threads)
    result = {"jpegs": len(data), "mean_jpeg_bytes": round(sum(map(len, data)) / len(data)), "cpu_one_process": cpu}
    if device.type == "cuda":
        import warnings

        import torchvision.io

        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]

        def gpu() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for i in range(0, len(tensors), 256):
                    torchvision.io.decode_jpeg(tensors[i : i + 256], device=device)
            _sync(device)

        gpu()  # nvJPEG handle and buffers
        result["gpu_batched"] = len(data) / min(_timed(gpu) for _ in range(3))
    return result


def _timed(fn: Callable[[], object]) -> float:  # one call; callers take the best of three
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def pipeline(
    workdir: Path, products: int, batch: int, workers: list[int | None], profile: bool = False
) -> dict[str, dict[str, float]]:
    """Per decode-worker count: end-to-end img/s of a full `extract` run, and the steady-state rate with set-up
    (model load, worker start, store creation) cancelled out: (images_full - images_half) / (s_full - s_half)."""
    from prodcat.config import ExtractConfig
    from prodcat.features.extract import extract
    from prodcat.features.store import FeatureStore

    def timed(**overrides: object) -> tuple[int, float]:
        values = dict(
            workdir=str(workdir),
            backbone="legacy_xception",
            random_init=True,
            splits=("train",),
            batch_size=batch,
            shard_size=8192,
        )
        start = time.perf_counter()
        path = extract(ExtractConfig(**{**values, **overrides}))
        return len(FeatureStore.open(path)), time.perf_counter() - start

    timed(limit=batch * 2, store_name="warm", shard_size=4096, workers=workers[0])  # model load, autotune, page cache
    results = {}
    for count in workers:
        tag = "auto" if count is None else str(count)
        half_images, half_seconds = timed(limit=products // 2, store_name=f"half-{tag}", workers=count)
        images, seconds = timed(store_name=f"full-{tag}", workers=count)
        results[tag] = {
            "images": images,
            "seconds": seconds,
            "end_to_end": images / seconds,
            "steady_state": (images - half_images) / max(seconds - half_seconds, 1e-9),
        }
    if profile:  # where the main process spends a default run (printed, not part of the result)
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(timed, limit=products // 2, store_name="profiled")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
    return results


def make_demo(workdir: Path, products: int) -> None:
    from prodcat.config import DemoConfig, IngestConfig
    from prodcat.data.catalog import ingest
    from prodcat.data.synthetic.demo import generate_demo

    generate_demo(
        workdir / "data", DemoConfig(products=products, test_products=0, categories=60, unique_images_per_leaf=64)
    )
    ingest(IngestConfig(data_dir=str(workdir / "data"), workdir=str(workdir), val_fraction=0.0))


def main() -> None:
    from prodcat.features.extract import auto_workers

    parser = argparse.ArgumentParser()
    parser.add_argument("--products", type=int, default=30000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", default="4,8,auto", help="decode worker counts to compare (auto = the default)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one default run")
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) | cpu (a smoke test of this script)")
    args = parser.parse_args()
    device = torch.device(args.device)
    workers = [None if part == "auto" else int(part) for part in args.workers.split(",")]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fp32, _ = model_only(args.batch, 20, "float32", device)
    best, mode = model_only(args.batch, 40, "auto", device)
    from_host, _ = model_only(args.batch, 40, "auto", device, from_host=True)
    with tempfile.TemporaryDirectory() as tmp:
        make_demo(Path(tmp), args.products)
        decode = jpeg_decode(Path(tmp), 4096, device)
        runs = pipeline(Path(tmp), args.products, args.batch, workers, args.profile)
    headline = runs["auto"] if "auto" in runs else runs[max(runs, key=lambda tag: runs[tag]["end_to_end"])]
    default_workers = auto_workers(device)
    cpu_capacity = decode["cpu_one_process"] * default_workers
    details = {
        "card": card,
        "batch": args.batch,
        "auto_workers": default_workers,
        "cpus": os.cpu_count(),
        "images": headline["images"],
        "mode": mode,
        "model_only_fp32_img_per_s": round(fp32, 1),
        "model_only_auto_img_per_s": round(best, 1),
        "auto_vs_fp32": round(best / fp32, 3),
        "model_only_from_host_uint8_img_per_s": round(from_host, 1),
        "pipeline_img_per_s": round(headline["end_to_end"], 1),
        "pipeline_vs_model": round(headline["end_to_end"] / best, 3),
        "pipeline_steady_state_img_per_s": round(headline["steady_state"], 1),
        "pipeline_steady_state_vs_model": round(headline["steady_state"] / best, 3),
        "by_workers": {tag: {key: round(value, 1) for key, value in run.items()} for tag, run in runs.items()},
        "jpeg_decode": {key: round(value, 1) for key, value in decode.items()},
        "cpu_decode_capacity_img_per_s": round(cpu_capacity, 1),
        # GPU decode pays off only when the CPU workers cannot keep up with the forward and nvJPEG is faster.
        "gpu_decode_would_help": bool(cpu_capacity < best and decode.get("gpu_batched", 0.0) > cpu_capacity),
        "torch": torch.__version__,
    }
    print(details, flush=True)
    write_result("gpu_extract_xception_img_per_s", headline["end_to_end"], "img/s", None, ">=", details, device=card)


if __name__ == "__main__":
    main()
