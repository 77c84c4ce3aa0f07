"""Feature loader vs training step: can the store feed a linear head without starving it?

Side by side, interleaved (A B A B ...), median of the repeats, torch.set_num_threads(2):
- A, loader: `FeatureLoader` in streamed mode (the path for splits over `memory_limit_gb`): random global batches of
  1024 rows (a `StepPlan` permutation) read from the memory-mapped float16 shards by its prefetch thread pool and
  moved to the device.
- B, step: one training step (forward + backward + AdamW) of a linear head with full softmax, D = 1280,
  C = 5270 (Cdiscount's leaf count), batch 1024, on a batch already on the device.
Value: loader rows/s / step rows/s (goal >= 2). Details also give the resident (in-memory) loader and the
end-to-end streamed loop (loader feeding the step) against the step alone.

The store is written just before the measurement, so its pages are in the page cache: this measures the loader's
CPU path (gather, float16 copy, pinning, transfer), not a cold disk.

    python benchmarks/bench_loader.py [--quick] [--device cpu|cuda] [--name RESULT]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from prodcat.config import TrainConfig
from prodcat.features.loaders import FeatureLoader
from prodcat.features.store import write_store
from prodcat.model import build_classifier, build_optimizer
from prodcat.train.loop import StepPlan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_times, write_result  # noqa: E402

FULL = {"rows": 65_536, "dim": 1280, "classes": 5270, "batch": 1024, "batches_per_call": 8, "repeats": 7}
QUICK = {"rows": 4096, "dim": 128, "classes": 500, "batch": 256, "batches_per_call": 4, "repeats": 3}
GOAL = 2.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_store(root: Path, rows: int, dim: int, classes: int) -> object:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((rows, dim), dtype=np.float32)
    label = rng.integers(0, classes, rows)
    return write_store(
        root / "store",
        features,
        product_id=np.arange(rows),
        image_index=np.zeros(rows),
        label=label,
        level1=np.zeros(rows),
        level2=np.zeros(rows),
        split=np.array(["train"] * rows),
        shard_size=4096,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--name", default="loader_vs_step", help="result name (the GPU script writes its own)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    torch.set_num_threads(2)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    batch, per_call = sizes["batch"], sizes["batches_per_call"]
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        store = _make_store(Path(tmp), sizes["rows"], sizes["dim"], sizes["classes"])
        rows = store.split_indices("train")  # type: ignore[attr-defined]
        plan = StepPlan.create(len(rows), TrainConfig(batch_size=batch, epochs=1000.0))
        streamed = FeatureLoader(store, rows, device, memory_limit_bytes=0)  # type: ignore[arg-type]
        resident = FeatureLoader(store, rows, device, memory_limit_bytes=1e12)  # type: ignore[arg-type]
        torch.manual_seed(0)
        model = build_classifier("linear", "softmax", (sizes["dim"],), sizes["classes"], dropout=0.0).to(device)
        optimizer = build_optimizer(model, "adamw", 1e-3, 1e-4, 0.9)
        features = torch.randn(batch, sizes["dim"], device=device).half()
        targets = {"leaf": torch.randint(0, sizes["classes"], (batch,), device=device)}
        cursor = {"step": 0}

        def next_positions() -> list[np.ndarray]:
            start = cursor["step"]
            cursor["step"] += per_call
            return [plan.global_batch(s) for s in range(start, start + per_call)]

        def step(x: torch.Tensor, y: dict[str, torch.Tensor]) -> None:
            model.loss(x, y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def read(loader: FeatureLoader) -> None:
            for x, _ in loader.batches(next_positions()):
                x.float().sum()  # touch the batch on the device, as the head's first layer would
            _sync(device)

        def steps() -> None:
            for _ in range(per_call):
                step(features, targets)
            _sync(device)

        def pipeline() -> None:
            for x, y in streamed.batches(next_positions()):
                step(x, y)
            _sync(device)

        times = interleaved_times(
            {"loader": lambda: read(streamed), "step": steps, "resident": lambda: read(resident), "pipeline": pipeline},
            repeats=sizes["repeats"],
            warmup=1,
        )
    rate = {name: per_call * batch / seconds for name, seconds in times.items()}
    details = {
        "loader_rows_per_s": round(rate["loader"]),
        "step_rows_per_s": round(rate["step"]),
        "resident_loader_rows_per_s": round(rate["resident"]),
        "pipeline_rows_per_s": round(rate["pipeline"]),
        "pipeline_vs_step": round(rate["pipeline"] / rate["step"], 3),
        "batch": batch,
        "dim": sizes["dim"],
        "classes": sizes["classes"],
        "store_rows": sizes["rows"],
        "workers": streamed.workers,
        "prefetch": streamed.prefetch,
        "page_cache": "warm",
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    print(
        f"loader {rate['loader']:,.0f} rows/s (resident {rate['resident']:,.0f}), step {rate['step']:,.0f} rows/s, "
        f"streamed loop {rate['pipeline']:,.0f} rows/s on {device}",
        flush=True,
    )
    return write_result(
        args.name,
        rate["loader"] / rate["step"],
        "ratio",
        GOAL,
        ">=",
        details,
        device=str(device) if device.type == "cpu" else details["gpu"],
    )


if __name__ == "__main__":
    main()
