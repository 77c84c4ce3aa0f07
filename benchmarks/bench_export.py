"""Issue 11: serving latency per product from the exported ONNX file (OnnxPredictor, ONNX Runtime) against the PyTorch
Predictor of the same run, side by side; and how far their answers are apart on the demo holdout.

Demo data is synthetic (prodcat demo-data): the numbers show the export at work, not Cdiscount. The run: the demo
store of `_demo_store` (efficientnet_lite0, pooled, 180 x 180 pictures), a linear softmax head, `prodcat evaluate`
(aggregation, tau and T chosen on val), `prodcat export`. Each holdout product (1-4 pictures, decoded beforehand) is
classified by both, interleaved A B A B on the same product (`predict_product`, what one unbatched request costs the
server), after a warm-up; 2 threads each (torch.set_num_threads(2), ONNX Runtime intra-op 2).

Result export_onnx_latency_p50_vs_predictor: p50 ONNX / p50 PyTorch (no goal: the issue asks for the figure); details
hold p50 / p90 of both, the Predictor's engine (on a CPU its backbone already runs in ONNX Runtime, or bf16 where that
keeps the features), and the agreement on every holdout product (top-1, largest probability gap).

    python benchmarks/bench_export.py [--quick] [--workdir W]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bson
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, write_result  # noqa: E402
from _demo_store import FEATURES, SYNTHETIC, demo_store  # noqa: E402

THREADS = 2
SIZES = {"full": {"products": 300, "epochs": 6.0}, "quick": {"products": 20, "epochs": 2.0}}


def _run(workdir: Path, epochs: float) -> Path:
    from prodcat.config import EvalConfig, ExportConfig, TrainConfig
    from prodcat.evaluate.evaluation import evaluate
    from prodcat.predict.export import export_onnx
    from prodcat.train.loop import train

    config = TrainConfig(workdir=str(workdir), store=FEATURES, head="linear", loss="softmax", epochs=epochs,
                         batch_size=128, run_name="bench-export", overwrite=True, device="cpu")  # fmt: skip
    run = train(config)
    evaluate(EvalConfig(run=str(run), split="holdout", bootstrap_resamples=100))
    export_onnx(ExportConfig(run=str(run), out=str(run / "export" / "model.onnx"), overwrite=True))
    return run


def _holdout(workdir: Path, limit: int) -> list[list[torch.Tensor]]:
    from prodcat.data.catalog import load_catalog
    from prodcat.data.images import decode_image

    wanted = set(load_catalog(workdir, "train", split="holdout")["product_id"].to_pylist())
    with open(workdir / "data" / "train.bson", "rb") as source:
        documents = [doc for doc in bson.decode_file_iter(source) if int(doc["_id"]) in wanted][:limit]
    return [[decode_image(picture["picture"]) for picture in doc["imgs"]] for doc in documents]


def _agreement(expected: list[Any], got: list[Any]) -> dict[str, Any]:
    same = sum(a.top[0].label == b.top[0].label for a, b in zip(expected, got, strict=True))
    gaps = [abs(x.probability - y.probability) for a, b in zip(expected, got, strict=True)
            for x, y in zip(a.top, b.top, strict=True) if x.label == y.label]  # fmt: skip
    return {"products": len(expected), "top1_same": same, "max_probability_difference": max(gaps, default=0.0)}


def _latencies(predictors: dict[str, Any], products: list[list[torch.Tensor]]) -> dict[str, list[float]]:
    """Seconds per product of each predictor, A B A B on the same product."""
    for predictor in predictors.values():
        for product in products[:5]:
            predictor.predict_product(product)
    samples: dict[str, list[float]] = {name: [] for name in predictors}
    for product in products:
        for name, predictor in predictors.items():
            start = time.perf_counter()
            predictor.predict_product(product)
            samples[name].append(time.perf_counter() - start)
    return samples


def _engine(predictor: Any) -> str:
    try:  # the engine of the Predictor's FeatureExtractor (private: the name of what it chose)
        return str(predictor._feature_path().engine)
    except Exception:  # noqa: BLE001 - only a label in the results
        return "unknown"


def _percentiles(values: list[float]) -> dict[str, float]:
    milliseconds = np.asarray(values) * 1e3
    return {f"p{q}_ms": round(float(np.percentile(milliseconds, q)), 3) for q in (50, 90)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="reuse (or build) this demo work directory")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    size = SIZES["quick" if args.quick else "full"]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-export-"))
    demo_store(workdir, args.quick)
    run = _run(workdir, size["epochs"])

    from prodcat.predict.onnx_predictor import OnnxPredictor
    from prodcat.predict.predictor import Predictor

    products = _holdout(workdir, size["products"])
    predictors = {"pytorch": Predictor.load(run), "onnx": OnnxPredictor.load(run / "export" / "model.onnx", THREADS)}
    agreement = _agreement(*(p.predict_products(products) for p in predictors.values()))
    load_before = os.getloadavg()[0]
    samples = _latencies(predictors, products)
    torch_p50, onnx_p50 = statistics.median(samples["pytorch"]), statistics.median(samples["onnx"])
    details = {
        "data": SYNTHETIC,
        "run": f"{FEATURES} + linear softmax, evaluated (choices on val), exported",
        "split": "holdout",
        "n_products": len(products),
        "pictures_per_product": round(sum(map(len, products)) / len(products), 2),
        "pytorch": {**_percentiles(samples["pytorch"]), "engine": _engine(predictors["pytorch"])},
        "onnx": {**_percentiles(samples["onnx"]), "engine": "onnxruntime CPU, the whole graph"},
        "agreement": agreement,
        "threads": THREADS,
        "cpu": cpu_model(),
        # Other work on the host (1-minute load, before / after timing): A B interleaving shares it out evenly, but
        # the milliseconds themselves grow with it.
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "aggregation": predictors["onnx"].aggregation,
    }
    print(f"pytorch {details['pytorch']}  onnx {details['onnx']}  agreement {agreement}", flush=True)
    write_result("export_onnx_latency_p50_vs_predictor", onnx_p50 / torch_p50, "ratio", None, "<=", details)


if __name__ == "__main__":
    main()
