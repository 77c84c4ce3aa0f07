"""The rehearsal's stages as plain functions of JSON-able arguments (each runs in its own process).

Every stage returns a dict with `items` and `unit` (what its throughput counts) plus what it measured.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from prodcat.paths import WorkPaths
from prodcat.utils import atomic_open, progress, read_json

__all__ = [
    "probe_stage",
    "demo_data",
    "ingest_stage",
    "explore_stage",
    "extract_stage",
    "train_stage",
    "evaluate_stage",
    "predict_bson_stage",
    "predict_store_stage",
    "report_stage",
    "synthetic_stage",
    "predict_from_store",
]


def probe_stage(path: str, megabytes: int) -> dict[str, Any]:
    """Hold `megabytes` of memory and write them to `path`: what the records' RSS and disk columns must see."""
    block = np.ones(megabytes * 2**20, dtype=np.uint8)
    Path(path).write_bytes(block.tobytes())
    return {"items": megabytes, "unit": "MB"}


def demo_data(data_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    from prodcat.config import DemoConfig
    from prodcat.data.synthetic.demo import generate_demo

    summary = generate_demo(data_dir, DemoConfig(**config))
    return {"items": summary["train_images"] + summary["test_images"], "unit": "pictures", **summary}


def ingest_stage(data_dir: str, workdir: str, val_fraction: float, holdout_fraction: float) -> dict[str, Any]:
    from prodcat.config import IngestConfig
    from prodcat.data.catalog import ingest

    ingest(
        IngestConfig(data_dir=data_dir, workdir=workdir, val_fraction=val_fraction, holdout_fraction=holdout_fraction)
    )
    report = read_json(WorkPaths(workdir).ingest_report)
    files = report.get("files", {})
    products = sum(int(f.get("products", 0)) for f in files.values()) if isinstance(files, dict) else 0
    return {"items": products, "unit": "products", "duplicates": report.get("duplicates")}


def explore_stage(workdir: str) -> dict[str, Any]:
    from prodcat.report.explore import explore

    summary = explore(workdir)
    return {"items": int(summary.get("products", 0) or 0), "unit": "products"}


def extract_stage(workdir: str, batch_size: int = 64) -> dict[str, Any]:
    from prodcat.config import ExtractConfig
    from prodcat.features.extract import extract
    from prodcat.features.store import FeatureStore

    path = extract(ExtractConfig(workdir=workdir, splits=("train", "val", "holdout", "test"), batch_size=batch_size))
    manifest = FeatureStore.open(path).manifest
    dedupe = manifest.get("dedupe") or {}
    return {
        "items": int(manifest["rows"]),
        "unit": "pictures",
        "store": Path(path).name,
        "computed": dedupe.get("computed"),
        "copied": dedupe.get("copied"),
        "mode": manifest.get("mode"),
    }


def train_stage(config: dict[str, Any]) -> dict[str, Any]:
    """Train one run; also the epoch time implied by the measured step time (extrapolated when it stopped early)."""
    from prodcat.config import TrainConfig
    from prodcat.train.loop import train

    run_dir = train(TrainConfig(**config))
    summary = read_json(run_dir / "summary.json")
    meta_rows = int(summary["step"]) * int(config.get("batch_size", 256))
    steps_per_epoch = summary["step"] / max(summary["epoch"], 1e-12)
    step_seconds = summary["train_seconds"] / max(summary["step"], 1)
    return {
        "items": meta_rows,
        "unit": "training rows",
        "run": str(run_dir),
        "steps": summary["step"],
        "epochs": summary["epoch"],
        "train_seconds": summary["train_seconds"],
        "step_seconds": step_seconds,
        "steps_per_epoch": steps_per_epoch,
        "epoch_seconds": step_seconds * steps_per_epoch,
        "epoch_seconds_basis": "measured" if summary["epoch"] >= 1 else "extrapolated from the measured steps",
        "best_val_top1": (summary.get("best") or {}).get("value"),
        "final_val_top1": (summary.get("final") or {}).get("val_top1"),
    }


def evaluate_stage(run: str, bootstrap_resamples: int = 1000) -> dict[str, Any]:
    from prodcat.config import EvalConfig
    from prodcat.evaluate.evaluation import FREQUENCY_GROUPS, evaluate

    metrics = evaluate(EvalConfig(run=run, split="holdout", bootstrap_resamples=bootstrap_resamples))
    product, frequency = metrics["product"], metrics["taxonomy"]["frequency"]
    return {
        "items": int(metrics["images"]),
        "unit": "holdout pictures",
        "protocol": metrics["protocol"],
        "products": metrics["products"],
        "product_top1": product["top1"],
        "product_top1_ci95": product["top1_ci95"],
        "product_macro": product["macro"],
        "product_macro_ci95": product["macro_ci95"],
        "image_top1": metrics["image"]["top1"],
        "aggregation": product["aggregation"],
        "frequency": {g: (frequency.get(g) or {}).get("product_top1") for g in FREQUENCY_GROUPS},
        "frequency_products": {g: (frequency.get(g) or {}).get("products") for g in FREQUENCY_GROUPS},
    }


def predict_bson_stage(run: str, bson: str, out: str) -> dict[str, Any]:
    from prodcat.predict.submission import predict_bson

    summary = predict_bson(run, bson, out)
    return {"items": int(summary["products"]), "unit": "test products", **summary}


def report_stage(workdir: str) -> dict[str, Any]:
    from prodcat.report.html import build_report

    return {"items": 0, "unit": "", "report": str(build_report(workdir))}


def synthetic_stage(workdir: str, plan: dict[str, Any]) -> dict[str, Any]:
    from prodcat.rehearsal.synthetic import FullPlan, write_synthetic_workdir

    summary = write_synthetic_workdir(workdir, FullPlan(**plan))
    return {"items": summary["rows"], "unit": "feature rows", **summary}


def predict_store_stage(run: str, out: str, chunk_rows: int = 4096) -> dict[str, Any]:
    summary = predict_from_store(run, out, chunk_rows)
    return {"items": summary["products"], "unit": "test products", **summary}


def _test_order(workdir: str) -> np.ndarray:
    from prodcat.data.catalog import load_catalog

    return load_catalog(workdir, "test")["product_id"].to_numpy()


def predict_from_store(run: str, out: str, chunk_rows: int = 4096) -> dict[str, Any]:
    """Submission `_id,category_id` for every test product of the catalog, in catalog order, from the stored test
    features (no pictures decoded), a chunk of products at a time so memory stays flat at any catalog size.

    Products with no stored row get the most frequent training category. Training twins are not used here.
    """
    from prodcat.features.store import FeatureStore
    from prodcat.predict.predictor import Predictor, aggregate_products

    predictor = Predictor.load(run)
    workdir = predictor.extract_config.workdir
    store = FeatureStore.open(WorkPaths(workdir).feature_store(predictor.store_name))
    rows = store.split_indices("test", valid_only=True)
    row_product = store.column("product_id")[rows]
    starts = np.flatnonzero(np.r_[True, row_product[1:] != row_product[:-1]])  # a product's rows are consecutive
    ids, best = row_product[starts], np.empty(len(starts), dtype=np.int64)
    bounds = np.r_[starts, len(rows)]
    first = 0
    bar = progress(total=len(rows), desc="predict test (store)", unit="image")
    while first < len(starts):
        last = int(np.searchsorted(bounds, bounds[first] + chunk_rows, side="right")) - 1
        last = min(max(last, first + 1), len(starts))
        lo, hi = int(bounds[first]), int(bounds[last])
        log_probs = predictor.log_probs_from_features(store.read(rows[lo:hi]))
        index = np.repeat(np.arange(last - first), np.diff(bounds[first : last + 1]))
        best[first:last] = aggregate_products(log_probs, index, last - first, predictor.aggregation).argmax(axis=1)
        bar.update(hi - lo)
        first = last
    bar.close()
    order = _test_order(workdir)
    category = np.full(len(order), predictor.taxonomy.category_ids[0], dtype=np.int64)
    found = np.zeros(len(order), dtype=bool)
    if len(ids):
        by_id = np.argsort(ids, kind="stable")
        where = np.minimum(np.searchsorted(ids[by_id], order), len(ids) - 1)
        found = ids[by_id][where] == order
        category[found] = predictor.taxonomy.category_ids[best[by_id[where[found]]]]
    _write_submission(out, order, category)
    return {"products": len(order), "fallback_products": int((~found).sum()), "aggregation": predictor.aggregation,
            "source": "store (chunked)"}  # fmt: skip


def _write_submission(out: str, product_id: np.ndarray, category: np.ndarray, chunk: int = 200_000) -> None:
    with atomic_open(out) as handle:
        handle.write(b"_id,category_id\n")
        for start in range(0, len(product_id), chunk):
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\n").writerows(
                zip(product_id[start : start + chunk].tolist(), category[start : start + chunk].tolist(), strict=True)
            )
            handle.write(buffer.getvalue().encode("ascii"))
