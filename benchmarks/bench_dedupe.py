"""Extraction with vs without dedupe on duplicate-rich demo data (issue 10, part C).

Data: the demo generator's train.bson, rewritten so that products reuse picture bytes like the real set (stock photos
reused within a leaf, a few placeholders shared by every leaf): about 38% of the pictures are copies of another
(real Cdiscount train: 1 - 7.77 M / 12.37 M = 37%). Then ingest and the per-picture hash table.
Timed end to end after set-up (the model is built once and shared): plan (hash join, owners) + decode + forward +
copies + float16 shard writes + finalize, over the same rows; interleaved A B A B, medians, 2 torch threads.
Goal: pictures/s with dedupe / pictures/s without >= 1.3 (the ceiling at 38% copies is 1 / 0.62 = 1.6), and the two
stores bit-identical (max abs difference 0).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, write_result  # noqa: E402

CACHE = Path(os.environ.get("PRODCAT_BENCH_CACHE", "/tmp/prodcat-bench"))
STOCK_SHARE = 0.37  # chance a picture is replaced by an earlier picture of the same leaf (a reused stock photo)
PLACEHOLDER_SHARE = 0.03  # chance it is one of a few placeholders shared by every leaf
PLACEHOLDERS = 3


def _duplicate(path: Path, seed: int) -> dict[str, float]:
    """Rewrite a demo train.bson in place with reused pictures; returns the share of pictures that are copies."""
    import bson

    rng = np.random.default_rng(seed)
    with open(path, "rb") as handle:
        documents = list(bson.decode_file_iter(handle))
    seen: dict[int, list[bytes]] = {}
    placeholders: list[bytes] = []
    for document in documents:
        leaf = int(document["category_id"])
        for image in document["imgs"]:
            picture, draw = bytes(image["picture"]), rng.random()
            if len(placeholders) < PLACEHOLDERS:
                placeholders.append(picture)
            elif draw < PLACEHOLDER_SHARE:
                picture = placeholders[int(rng.integers(PLACEHOLDERS))]
            elif draw < PLACEHOLDER_SHARE + STOCK_SHARE and seen.get(leaf):
                picture = seen[leaf][int(rng.integers(len(seen[leaf])))]
            image["picture"] = bson.Binary(picture)
            seen.setdefault(leaf, []).append(picture)
    with open(path, "wb") as handle:
        for document in documents:
            handle.write(bson.encode(document))
    pictures = [bytes(image["picture"]) for document in documents for image in document["imgs"]]
    return {"pictures": len(pictures), "copy_share": 1 - len(set(pictures)) / len(pictures)}


def _picture_table(workdir: Path) -> None:
    """Ingest writes catalog/pictures.parquet since issue 10; older ingests get it written here the same way."""
    import bson
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prodcat.data.catalog import catalog_source, load_catalog
    from prodcat.features.extract import picture_digest

    path = workdir / "catalog" / "pictures.parquet"
    if path.is_file():
        return
    data = Path(catalog_source(workdir, "train")).read_bytes()
    table = load_catalog(workdir, "train")
    rows: dict[str, list] = {key: [] for key in ("source", "product_id", "image_index", "hash", "offset", "length")}
    for product_id, offset, length in zip(*(table[c].to_pylist() for c in ("product_id", "offset", "length"))):
        cursor = offset
        for index, image in enumerate(bson.decode(data[offset : offset + length])["imgs"]):
            picture = bytes(image["picture"])
            cursor = data.index(picture, cursor, offset + length)
            for key, value in zip(rows, ("train", product_id, index, picture_digest(picture), cursor, len(picture))):
                rows[key].append(value)
            cursor += len(picture)
    types = [pa.string(), pa.int64(), pa.int16(), pa.binary(16), pa.int64(), pa.int32()]
    pq.write_table(pa.table({k: pa.array(v, t) for (k, v), t in zip(rows.items(), types)}), path)


def _workdir(products: int) -> tuple[Path, dict[str, float]]:
    from prodcat.config import DemoConfig, IngestConfig
    from prodcat.data.catalog import ingest
    from prodcat.data.synthetic.demo import generate_demo

    root = CACHE / f"dedupe-{products}"
    if not (root / "W" / "catalog" / "pictures.parquet").is_file():
        shutil.rmtree(root, ignore_errors=True)
        generate_demo(root / "data", DemoConfig(products=products, test_products=0, categories=20, seed=3))
        _duplicate(root / "data" / "train.bson", seed=3)
        ingest(IngestConfig(data_dir=str(root / "data"), workdir=str(root / "W"), val_fraction=0.1))
        _picture_table(root / "W")
    return root / "W", _copy_share(root / "W")


def _copy_share(workdir: Path) -> dict[str, float]:
    import pyarrow.parquet as pq

    table = pq.read_table(workdir / "catalog" / "pictures.parquet", columns=["hash"])
    distinct = len(set(table["hash"].to_pylist()))
    return {"pictures": table.num_rows, "distinct": distinct, "copy_share": round(1 - distinct / table.num_rows, 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--products", type=int, default=None)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from prodcat.config import ExtractConfig
    from prodcat.distributed import DistInfo
    from prodcat.features.backbones import create_backbone
    from prodcat.features.extract import _complete_partial, _run_shards, plan_rows
    from prodcat.features.extractor import FeatureExtractor
    from prodcat.features.inference import InferenceRunner
    from prodcat.features.store import FeatureStore

    products, repeats = (args.products or (60 if args.quick else 300)), (1 if args.quick else 3)
    workdir, share = _workdir(products)
    backbone = create_backbone(args.backbone)
    runner = InferenceRunner(backbone, precision="auto")
    extractor = FeatureExtractor(runner)  # extraction's one feature path (pooled, no TTA)
    config = ExtractConfig(workdir=str(workdir), backbone=args.backbone, batch_size=32, shard_size=256, workers=0)
    splits = ("train", "val")
    load = {"start": os.getloadavg()[0]}
    plans: dict[bool, dict] = {}

    def extract_once(dedupe: bool) -> float:
        path = workdir / "features" / ("dedupe" if dedupe else "plain")
        shutil.rmtree(path, ignore_errors=True)
        start = time.perf_counter()
        plan = plan_rows(workdir, splits, dedupe=dedupe)
        plans[dedupe] = plan.dedupe
        meta = {"backbone": args.backbone, "weights_id": backbone.weights_id, "kind": "pooled", "preprocessing": None}
        store = FeatureStore.create(path, plan.rows, (backbone.spec.num_features,), config.shard_size, meta)
        _run_shards(store, store.missing_shards(), plan, extractor, config, DistInfo())
        _complete_partial(store, list(range(store.num_shards)), plan.owner)
        store.finalize()
        return time.perf_counter() - start

    extract_once(False)  # warm-up: kernels, page cache
    times: dict[str, list[float]] = {"plain": [], "dedupe": []}
    for _ in range(repeats):
        times["plain"].append(extract_once(False))
        times["dedupe"].append(extract_once(True))
    load["end"] = os.getloadavg()[0]
    plain_store = FeatureStore.open(workdir / "features" / "plain")
    dedupe_store = FeatureStore.open(workdir / "features" / "dedupe")
    difference = float(np.abs(plain_store.read_all() - dedupe_store.read_all()).max())
    rows = len(plain_store)
    plain, dedupe = rows / statistics.median(times["plain"]), rows / statistics.median(times["dedupe"])
    details = {
        "backbone": args.backbone,
        "mode": runner.mode,
        "cpu": cpu_model(),
        "threads": 2,
        "batch": config.batch_size,
        "products": products,
        "rows": rows,
        **share,
        "computed_with_dedupe": plans[True]["computed"],
        "plain_pictures_per_s": round(plain, 1),
        "dedupe_pictures_per_s": round(dedupe, 1),
        "plain_s": [round(t, 3) for t in times["plain"]],
        "dedupe_s": [round(t, 3) for t in times["dedupe"]],
        "features_max_abs_diff": difference,
        "load_average_1min": load,
        "data": "synthetic demo pictures, duplicated by this benchmark",
    }
    if difference != 0:
        print(f"WARNING dedupe and plain stores differ: max abs diff {difference}")
    name = "extract_dedupe_speedup" + ("_quick" if args.quick else "")
    if args.quick:
        print(f"BENCH {name} {dedupe / plain:.3f} ratio (quick: no result file) {details}")
        return
    write_result(name, dedupe / plain, "ratio", 1.3, ">=", details)


if __name__ == "__main__":
    main()
