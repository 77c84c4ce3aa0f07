"""Flip test-time augmentation on the demo data (issue 14 lever 2): accuracy gained against extraction time paid.

One small synthetic demo is ingested (train / val / holdout grouped by duplicate pictures) and extracted twice with
the registered EfficientNet-Lite0 in the auto precision mode, through `prodcat.features.extract.extract`: once with
`tta="none"`, once with `tta="flip_mean"` (each vector the mean of the picture's and its mirror's features). Then the
same linear head (same optimizer, epochs, seeds 0-2, nothing tuned) trains on each store's train rows; product top-1
(mean of picture probabilities per product) and macro accuracy are reported on `holdout`, with n, the seed spread
and a 95% bootstrap interval over products, and the paired difference to `none` with its own interval.

A third row asks whether storing both views (`flip_store`) would be worth building: the head trains on the picture
and its mirror as two rows (mirror augmentation) and evaluation averages the two views' log-probabilities. Its
mirror features are derived from the two stores, mirror = 2 * flip_mean - none (float16 rows: off by about 1e-3
relative, far below what a linear head resolves), so no third extraction is needed.

Cost, measured side by side: the pictures/s of both extractions' loops (decode + forward + write, sequential: none,
then flip_mean; the end-to-end wall time with model setup is recorded too) and the runner alone (pack + normalise +
forward of the same decoded pictures, interleaved A B A B so drift hits both alike). The demo is synthetic (rendered
pictures, not photos): its numbers say how the lever behaves on those, not on Cdiscount.

Not part of `make bench` (about 3 minutes on 2 quiet cores; several more on a shared machine):
    PYTHONPATH=src python benchmarks/bench_tta.py [--products N] [--categories C] [--seeds S] [--quick]
Writes benchmarks/results/tta_flip_demo.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_samples, write_result  # noqa: E402
from bench_backbones import HeadRecipe, cpu_name  # noqa: E402

CACHE = Path(os.environ.get("PRODCAT_BENCH_CACHE", "/tmp/prodcat-bench"))
BACKBONE = "efficientnet_lite0"


@dataclasses.dataclass
class Rows:
    """The store rows one comparison uses: features per view, labels, products, splits (same for every store)."""

    views: list[np.ndarray]  # one (N, C) array per view of each picture (1 view, or picture + mirror)
    label: np.ndarray
    product: np.ndarray
    split: np.ndarray


def make_demo(products: int, categories: int) -> Path:
    """Synthetic demo data -> ingest with val and holdout splits; returns the work directory (cached)."""
    from prodcat.config import DemoConfig, IngestConfig
    from prodcat.data.catalog import ingest
    from prodcat.data.synthetic.demo import generate_demo

    root = CACHE / f"tta-{products}-{categories}"
    work = root / "W"
    if not (work / "catalog" / "pictures.parquet").is_file():
        shutil.rmtree(root, ignore_errors=True)
        generate_demo(root / "data", DemoConfig(products=products, test_products=1, categories=categories, seed=0))
        config = IngestConfig(
            data_dir=str(root / "data"), workdir=str(work), val_fraction=0.2, holdout_fraction=0.2, seed=0
        )
        ingest(config)
    return work


def extract_both(work: Path, batch: int) -> tuple[dict[str, Any], dict[str, float], dict[str, Any]]:
    """Both stores, built fresh (none first, then flip_mean); their paths, wall seconds and manifests."""
    from prodcat.config import ExtractConfig
    from prodcat.features.extract import extract
    from prodcat.features.store import FeatureStore

    stores, seconds, manifests = {}, {}, {}
    loop = _LoopTime()
    logging.getLogger("prodcat.extract").addHandler(loop)
    for tta in ("none", "flip_mean"):
        config = ExtractConfig(
            workdir=str(work), backbone=BACKBONE, splits=("train", "val", "holdout"), batch_size=batch, tta=tta,
            store_name=f"bench-tta-{tta}",
        )  # fmt: skip
        shutil.rmtree(work / "features" / config.name, ignore_errors=True)
        began = time.perf_counter()
        stores[tta] = FeatureStore.open(extract(config))
        seconds[tta] = time.perf_counter() - began
        seconds[f"{tta}_loop"] = loop.seconds
        manifests[tta] = stores[tta].manifest
    logging.getLogger("prodcat.extract").removeHandler(loop)
    return stores, seconds, manifests


class _LoopTime(logging.Handler):
    """The seconds extraction's own loop reports (decode + forward + write, no model setup), read off its log line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds = float("nan")

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("rank %d: %d images computed in %.1f s"):
            self.seconds = float(record.args[2])


def runner_rates(work: Path, pictures: int, batch: int, repeats: int) -> dict[str, float]:
    """Pictures/s of pack + normalise + forward, tta none vs flip_mean, on the same decoded pictures, interleaved."""
    from prodcat.data.bson_index import BsonReader
    from prodcat.data.catalog import catalog_source, load_catalog
    from prodcat.data.images import decode_image
    from prodcat.features.backbones import Preprocessor, create_backbone
    from prodcat.features.inference import InferenceRunner

    table = load_catalog(work, "train").to_pydict()
    images: list[torch.Tensor] = []
    with BsonReader(catalog_source(work, "train")) as reader:
        for offset, length in zip(table["offset"], table["length"], strict=True):
            images += [decode_image(data) for data in reader.pictures(int(offset), int(length))]
            if len(images) >= pictures:
                break
    images = images[:pictures]
    backbone = create_backbone(BACKBONE)
    preprocess, runner = Preprocessor(backbone.spec), InferenceRunner(backbone, precision="auto")

    def run(tta: str) -> None:
        for start in range(0, len(images), batch):
            runner(preprocess.pack(images[start : start + batch]), tta=tta)

    samples = interleaved_samples({"none": lambda: run("none"), "flip_mean": lambda: run("flip_mean")}, repeats)
    return {name: len(images) / statistics.median(values) for name, values in samples.items()} | {
        "mode": runner.mode,
        "pictures": len(images),
    }


def rows_of(stores: dict[str, Any]) -> dict[str, Rows]:
    """The labelled rows of each variant: none, flip_mean, and flip_store derived as (none, 2 * flip_mean - none)."""
    plain, mean = stores["none"], stores["flip_mean"]
    if not np.array_equal(plain.column("product_id"), mean.column("product_id")):
        raise RuntimeError("the two stores do not hold the same rows")
    keep = np.flatnonzero(plain.column("valid") & mean.column("valid") & (plain.column("split") != "test"))
    base = dict(
        label=plain.column("label")[keep], product=plain.column("product_id")[keep], split=plain.column("split")[keep]
    )
    none, flip = plain.read(keep), mean.read(keep)
    return {
        "none": Rows([none], **base),
        "flip_mean": Rows([flip], **base),
        "flip_store": Rows([none, 2.0 * flip - none], **base),
    }


def evaluate_head(rows: Rows, seed: int, recipe: HeadRecipe, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Train the linear head on every view of the train rows; (hit 0/1, label) per `split` product."""
    from prodcat.predict.predictor import aggregate_products

    train = rows.split == "train"
    stacked = np.concatenate([view[train] for view in rows.views])
    mean, std = stacked.mean(0), stacked.std(0) + 1e-6
    views = [torch.from_numpy((view - mean) / std).float() for view in rows.views]
    y = torch.from_numpy(rows.label.astype(np.int64))
    torch.manual_seed(seed)
    head = nn.Linear(views[0].shape[1], int(rows.label.max()) + 1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    train_rows = np.flatnonzero(train)
    # (view, row) pairs: with two views the mirror is one more training picture (the augmentation).
    pairs = torch.from_numpy(np.stack(np.meshgrid(np.arange(len(views)), train_rows, indexing="ij"), -1).reshape(-1, 2))
    x_all = torch.stack(views)
    generator = torch.Generator().manual_seed(seed)
    epochs = max(1, recipe.epochs // len(views))  # the same number of optimizer steps for every variant
    for _ in range(epochs):
        for batch in pairs[torch.randperm(len(pairs), generator=generator)].split(recipe.batch_size):
            optimizer.zero_grad()
            nn.functional.cross_entropy(head(x_all[batch[:, 0], batch[:, 1]]), y[batch[:, 1]]).backward()
            optimizer.step()
    evaluated = np.flatnonzero(rows.split == split)
    with torch.no_grad():  # two views: the mean of their log-probabilities per picture
        log_probs = torch.stack([head(view[evaluated]).log_softmax(1) for view in views]).mean(0).numpy()
    ids, product_index = np.unique(rows.product[evaluated], return_inverse=True)
    product_log_probs = aggregate_products(log_probs, product_index, len(ids), "mean_prob")
    label = np.zeros(len(ids), dtype=np.int64)
    label[product_index] = rows.label[evaluated]
    return (product_log_probs.argmax(1) == label).astype(np.float64), label


def _bootstrap(values: np.ndarray, statistic: Any, resamples: int = 2000) -> list[float]:
    rng = np.random.default_rng(0)
    draws = [statistic(rng.integers(0, len(values), len(values))) for _ in range(resamples)]
    return [round(float(np.percentile(draws, 2.5)), 4), round(float(np.percentile(draws, 97.5)), 4)]


def summary_row(hits: list[np.ndarray], label: np.ndarray, baseline: list[np.ndarray] | None) -> dict[str, Any]:
    """Top-1 and macro over seeds, seed spread, intervals over products (seed-averaged hits), paired delta."""
    from prodcat.evaluate.evaluation import macro_accuracy

    top1 = [float(h.mean()) for h in hits]
    macro = [macro_accuracy(h, np.ones(len(h)), label) for h in hits]
    per_product = np.mean(hits, axis=0)
    row = {
        "product_top1": round(statistics.mean(top1), 4),
        "top1_seed_std": round(statistics.stdev(top1), 4) if len(top1) > 1 else "n/a",
        "top1_ci95": _bootstrap(per_product, lambda d: per_product[d].mean()),
        "macro": round(statistics.mean(macro), 4),
        "macro_seed_std": round(statistics.stdev(macro), 4) if len(macro) > 1 else "n/a",
        "macro_ci95": _bootstrap(per_product, lambda d: macro_accuracy(per_product[d], np.ones(len(d)), label[d])),
        "per_seed_top1": [round(a, 4) for a in top1],
        "n_products": len(per_product),
    }
    if baseline is not None:
        difference = per_product - np.mean(baseline, axis=0)
        row["top1_minus_none"] = round(float(difference.mean()), 4)
        row["top1_minus_none_ci95"] = _bootstrap(difference, lambda d: difference[d].mean())
    return row


def print_table(results: dict[str, dict[str, Any]], split: str) -> None:
    print(f"\nproduct accuracy on {split} (SYNTHETIC demo data), linear head, 3 seeds:")
    print(f"{'tta':11} {'top-1':>7} {'seed sd':>8} {'95% CI':>13} {'macro':>7} {'delta':>7} {'delta CI':>15} {'n':>4}")
    for name, r in results.items():
        sd = r["top1_seed_std"] if isinstance(r["top1_seed_std"], str) else f"{r['top1_seed_std']:.4f}"
        ci = f"{r['top1_ci95'][0]:.3f}-{r['top1_ci95'][1]:.3f}"
        delta = f"{r.get('top1_minus_none', 0.0):+.4f}"
        dci = (
            f"{r['top1_minus_none_ci95'][0]:+.3f}..{r['top1_minus_none_ci95'][1]:+.3f}"
            if "top1_minus_none_ci95" in r
            else "-"
        )
        top1, macro, n = r["product_top1"], r["macro"], r["n_products"]
        print(f"{name:11} {top1:7.4f} {sd:>8} {ci:>13} {macro:7.4f} {delta:>7} {dci:>15} {n:4d}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, one seed, no file written")
    parser.add_argument("--products", type=int, default=600)
    parser.add_argument("--categories", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    products, categories, seeds = (100, 5, 1) if args.quick else (args.products, args.categories, args.seeds)
    load_before, started = os.getloadavg(), time.perf_counter()
    work = make_demo(products, categories)
    stores, seconds, manifests = extract_both(work, batch=32)
    rates = runner_rates(work, pictures=32 if args.quick else 96, batch=32, repeats=1 if args.quick else 3)
    recipe, split = HeadRecipe(), "holdout"
    variants = rows_of(stores)
    results: dict[str, dict[str, Any]] = {}
    baseline = None
    for name, rows in variants.items():
        outcomes = [evaluate_head(rows, seed, recipe, split) for seed in range(seeds)]
        hits = [hit for hit, _ in outcomes]
        results[name] = summary_row(hits, outcomes[0][1], baseline)
        baseline = hits if name == "none" else baseline
    print_table(results, split)
    computed = {tta: manifests[tta]["dedupe"]["computed"] for tta in manifests}
    modes = ("none", "flip_mean")
    cost = {
        "extract_wall_s": {tta: round(seconds[tta], 1) for tta in modes},
        "extract_loop_s": {tta: round(seconds[f"{tta}_loop"], 1) for tta in modes},
        "extract_pictures_per_s": {tta: round(computed[tta] / seconds[f"{tta}_loop"], 1) for tta in modes},
        "extract_time_ratio_flip_over_none": round(seconds["flip_mean_loop"] / seconds["none_loop"], 2),
        "extract_note": "pictures/s of extraction's loop (decode + forward + write, as its log reports; model setup, "
        "ONNX export and calibration excluded: they are in the wall seconds), sequential: none then flip_mean; "
        "pictures = distinct pictures computed (dedupe on)",
        "runner_pictures_per_s": {k: round(v, 1) for k, v in rates.items() if k in ("none", "flip_mean")},
        "runner_time_ratio_flip_over_none": round(rates["none"] / rates["flip_mean"], 2),
        "runner_note": f"pack + normalise + forward of {rates['pictures']} decoded pictures, batch 32, interleaved, "
        "median of 3; JPEG decoding excluded",
        "mode": rates["mode"],
        "store_bytes": "same for both (one float16 vector per row); flip_store would double it",
    }
    print(f"\nextract pictures/s {cost['extract_pictures_per_s']} (time x{cost['extract_time_ratio_flip_over_none']});"
          f" runner {cost['runner_pictures_per_s']} (x{cost['runner_time_ratio_flip_over_none']})")  # fmt: skip
    details = {
        "data": "SYNTHETIC demo data (prodcat.data.synthetic.demo.generate_demo): rendered pictures, not photos",
        "demo": {"products": products, "categories": categories, "seed": 0, "val": 0.2, "holdout": 0.2},
        "rows": {tta: manifests[tta]["rows"] for tta in manifests},
        "computed_pictures": computed,
        "backbone": BACKBONE,
        "eval_split": split,
        "eval_note": "the head has no tuned setting and nothing is selected, so no val step; reported on holdout",
        "head": dataclasses.asdict(recipe) | {"kind": "linear on standardised pooled features", "seeds": seeds},
        "aggregation": "mean of picture probabilities per product (flip_store: views' log-probs averaged first)",
        "flip_store_note": "simulated: mirror = 2 * flip_mean - none from the two float16 stores; epochs halved so "
        "it takes the same optimizer steps on twice the rows",
        "results": results,
        "cost": cost,
        "cpu": cpu_name(),
        "threads": 2,
        "loadavg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "contention": "shared 2-core machine, other jobs alongside: pictures/s indicative, ratios side by side",
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    gain = results["flip_mean"]["top1_minus_none"]
    if args.quick:
        print(f"BENCH tta_flip_demo_quick {gain:.4f} (quick: no result file)")
        return
    # value: flip_mean minus none product top-1 on holdout; no goal (a lever is reported whether or not it helps).
    write_result("tta_flip_demo", gain, "top1_flip_mean_minus_none", None, ">=", details)


if __name__ == "__main__":
    main()
