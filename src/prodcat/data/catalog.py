"""`prodcat ingest`: BSON files + taxonomy -> Parquet catalogs, labels, a product-level split and a problem report.

Outputs (see `WorkPaths`):
  catalog/train.parquet  product_id, offset, length, num_images, category_id, label, level1, level2, split
  catalog/test.parquet   product_id, offset, length, num_images
  catalog/ingest_report.json, catalog/config.json, taxonomy.parquet
Each catalog also records its source BSON path in the Parquet metadata (`prodcat.source`), so later stages read
pictures back by offset without being told where the data lives.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prodcat.config import IngestConfig, save_config
from prodcat.data.bson_index import BsonDamageError, BsonIndex, BsonProblem, index_bson
from prodcat.data.split import stratified_split
from prodcat.data.taxonomy import Taxonomy, TaxonomyError, read_category_csv
from prodcat.paths import WorkPaths
from prodcat.utils import atomic_write_bytes, get_logger, write_json

__all__ = ["ingest", "IngestError", "load_catalog", "catalog_source", "TRAIN_COLUMNS", "TEST_COLUMNS"]

TRAIN_COLUMNS = ("product_id", "offset", "length", "num_images", "category_id", "label", "level1", "level2", "split")
TEST_COLUMNS = ("product_id", "offset", "length", "num_images")
_MAX_WARNINGS = 20
log = get_logger("prodcat.ingest")


class IngestError(RuntimeError):
    """Ingest cannot go on: missing/malformed inputs, or the first problem under --strict."""


def ingest(config: IngestConfig) -> dict:
    """Index the data directory into `config.workdir`; returns the ingest report (also written as JSON)."""
    data_dir, paths = Path(config.data_dir), WorkPaths(config.workdir)
    start = time.perf_counter()
    try:
        rows = read_category_csv(data_dir / "category_names.csv")
    except TaxonomyError as error:
        raise IngestError(str(error)) from error
    sources = {name: data_dir / f"{name}.bson" for name in ("train", "test") if (data_dir / f"{name}.bson").is_file()}
    if not sources:
        raise IngestError(f"{data_dir}: no train.bson or test.bson found")
    indexes = {name: _index(path, config.strict) for name, path in sources.items()}
    known = {row[0] for row in rows}
    report: dict = {"data_dir": str(data_dir.resolve()), "files": {}, "problems": []}
    if "train" in indexes:
        train_index = indexes["train"]
        keep, problems = _usable_train(train_index, known, config.strict)
        counts = _category_counts(train_index.category_id[keep])
        taxonomy = Taxonomy.from_rows(rows, counts)
        table = _train_table(train_index, keep, taxonomy, config)
        _write_catalog(paths.catalog_table("train"), table, train_index.path)
        report["files"]["train"] = _file_summary(train_index, table, problems)
        report["problems"] += [dataclasses.asdict(p) for p in problems]
    else:
        taxonomy = Taxonomy.from_rows(rows, {})
    taxonomy.save(paths.taxonomy)
    if "test" in indexes:
        test_index = indexes["test"]
        problems = list(test_index.problems) + _empty_products(test_index)
        table = _test_table(test_index)
        _write_catalog(paths.catalog_table("test"), table, test_index.path)
        report["files"]["test"] = _file_summary(test_index, table, problems)
        report["problems"] += [dataclasses.asdict(p) for p in problems]
    report["taxonomy"] = {"leaves": taxonomy.num_classes, "level1": taxonomy.num_level1,
                          "level2": taxonomy.num_level2}
    report["seconds"] = round(time.perf_counter() - start, 3)
    write_json(paths.ingest_report, report)
    save_config(config, paths.catalog / "config.json")
    _warn(report["problems"])
    return report


def _index(path: Path, strict: bool) -> BsonIndex:
    try:
        return index_bson(path, strict=strict)
    except BsonDamageError as error:
        raise IngestError(f"strict mode: {error}") from error


def _usable_train(index: BsonIndex, known: set[int], strict: bool) -> tuple[np.ndarray, list[BsonProblem]]:
    """Train products need images and a category from the taxonomy; the others are reported, not kept."""
    problems = list(index.problems)
    keep = np.ones(len(index), dtype=bool)
    known_ids = np.fromiter(known, dtype=np.int64)
    for row in np.flatnonzero(index.num_images <= 0):
        problems.append(BsonProblem(index.path, int(index.offset[row]), "no_images", "product has no images",
                                    int(index.product_id[row])))
        keep[row] = False
    unknown = ~np.isin(index.category_id, known_ids)
    for row in np.flatnonzero(unknown & keep):
        category = int(index.category_id[row])
        reason = "no category_id field" if category < 0 else f"category_id {category} is not in category_names.csv"
        problems.append(BsonProblem(index.path, int(index.offset[row]), "unknown_category", reason,
                                    int(index.product_id[row])))
        keep[row] = False
    if strict and problems:
        raise IngestError(f"strict mode: {min(problems, key=lambda p: p.offset)}")
    problems.sort(key=lambda p: p.offset)
    return keep, problems


def _empty_products(index: BsonIndex) -> list[BsonProblem]:
    # Test products without images stay in the catalog (a submission needs a row for each); we only report them.
    return [BsonProblem(index.path, int(index.offset[row]), "no_images", "product has no images (kept)",
                        int(index.product_id[row])) for row in np.flatnonzero(index.num_images <= 0)]


def _category_counts(category_ids: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(category_ids, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


def _train_table(index: BsonIndex, keep: np.ndarray, taxonomy: Taxonomy, config: IngestConfig) -> pa.Table:
    labels = taxonomy.labels_of(index.category_id[keep])
    is_val = stratified_split(labels, config.val_fraction, config.seed)
    return pa.table({
        "product_id": pa.array(index.product_id[keep]),
        "offset": pa.array(index.offset[keep]),
        "length": pa.array(index.length[keep]),
        "num_images": pa.array(index.num_images[keep]),
        "category_id": pa.array(index.category_id[keep]),
        "label": pa.array(labels.astype(np.int32)),
        "level1": pa.array(taxonomy.leaf_level1[labels]),
        "level2": pa.array(taxonomy.leaf_level2[labels]),
        "split": pa.array(np.where(is_val, "val", "train")).dictionary_encode(),
    })


def _test_table(index: BsonIndex) -> pa.Table:
    return pa.table({"product_id": pa.array(index.product_id), "offset": pa.array(index.offset),
                     "length": pa.array(index.length), "num_images": pa.array(index.num_images)})


def _write_catalog(path: Path, table: pa.Table, source: str) -> None:
    table = table.replace_schema_metadata({b"prodcat.source": source.encode("utf-8")})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _file_summary(index: BsonIndex, table: pa.Table, problems: list[BsonProblem]) -> dict:
    summary = {"path": index.path, "bytes": index.file_size, "products": table.num_rows,
               "images": int(pc.sum(table["num_images"]).as_py() or 0), "problems": len(problems),
               "problem_kinds": {}}
    for problem in problems:
        summary["problem_kinds"][problem.kind] = summary["problem_kinds"].get(problem.kind, 0) + 1
    if "split" in table.column_names:
        splits = table["split"].to_numpy(zero_copy_only=False)
        summary["train_products"] = int(np.sum(splits == "train"))
        summary["val_products"] = int(np.sum(splits == "val"))
    return summary


def _warn(problems: list[dict]) -> None:
    for problem in problems[:_MAX_WARNINGS]:
        log.warning(str(BsonProblem(**problem)))
    if len(problems) > _MAX_WARNINGS:
        log.warning("... and %d more problems; all are listed in catalog/ingest_report.json",
                    len(problems) - _MAX_WARNINGS)


def load_catalog(workdir: str | Path, name: str, split: str | None = None) -> pa.Table:
    """Read `train` or `test` catalog; `split` filters train rows to `train` or `val`."""
    path = WorkPaths(workdir).catalog_table(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no catalog; run `prodcat ingest DATA_DIR --workdir {workdir}` first")
    table = pq.read_table(path)
    if split is not None:
        mask = pc.equal(table["split"].cast(pa.string()), split)
        table = table.filter(mask)
    return table


def catalog_source(workdir: str | Path, name: str) -> Path:
    """The BSON file a catalog indexes."""
    metadata = pq.read_schema(WorkPaths(workdir).catalog_table(name)).metadata or {}
    source = metadata.get(b"prodcat.source")
    if source is None:
        raise IngestError(f"{WorkPaths(workdir).catalog_table(name)}: no source path; re-run ingest")
    return Path(source.decode("utf-8"))
