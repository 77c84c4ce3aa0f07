"""`prodcat ingest`: BSON files + taxonomy -> Parquet catalogs, labels, a product-level split and a problem report.

Outputs (see `WorkPaths`):
  catalog/train.parquet     product_id, offset, length, num_images, category_id, label, level1, level2, split, group
  catalog/test.parquet      product_id, offset, length, num_images
  catalog/pictures.parquet  one row per picture: source, product_id, image_index, hash, offset, length (dedupe.py)
  catalog/ingest_report.json, catalog/config.json, taxonomy.parquet
All of them are written into a staging folder and swapped in together (data/staging.py).
`split` is train / val / holdout, stratified by leaf and grouped by duplicate pictures; label order, the unigram
sampler and frequency groups count the train split only (`Taxonomy.train_counts`).
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
from prodcat.data import dedupe
from prodcat.data.bson_index import BsonIndex, BsonProblem, index_bson
from prodcat.data.split import SPLITS, grouped_split
from prodcat.data.staging import StagingError, staged
from prodcat.data.taxonomy import Taxonomy, TaxonomyError, read_category_csv
from prodcat.paths import WorkPaths
from prodcat.utils import get_logger, write_json, write_parquet

__all__ = ["ingest", "IngestError", "load_catalog", "catalog_source", "TRAIN_COLUMNS", "TEST_COLUMNS"]

TRAIN_COLUMNS = (
    "product_id", "offset", "length", "num_images", "category_id", "label", "level1", "level2", "split", "group",
)  # fmt: skip
TEST_COLUMNS = ("product_id", "offset", "length", "num_images")
_MAX_WARNINGS = 20
log = get_logger("prodcat.ingest")


class IngestError(RuntimeError):
    """Ingest cannot go on: missing/malformed inputs, or the first problem under --strict."""


def ingest(config: IngestConfig) -> dict:
    """Index the data directory into `config.workdir`; returns the ingest report (also written as JSON).

    Everything is written into a staging folder first and swapped in at the end (data/staging.py), so a failed or
    killed re-ingest leaves the previous taxonomy and catalogs as they were, and outputs the new data lacks (a
    test.parquet without test.bson) do not survive it.
    """
    data_dir = Path(config.data_dir)
    start = time.perf_counter()
    try:
        rows = read_category_csv(data_dir / "category_names.csv")
    except TaxonomyError as error:
        raise IngestError(str(error)) from error
    sources = {name: data_dir / f"{name}.bson" for name in ("train", "test") if (data_dir / f"{name}.bson").is_file()}
    if not sources:
        raise IngestError(f"{data_dir}: no train.bson or test.bson found")
    # Indexed leniently, then strict mode fails on the first problem by offset, before anything is written.
    # Test files keep every product whose _id is readable: a submission needs its row.
    indexes = {name: index_bson(path, keep_damaged=name == "test") for name, path in sources.items()}
    # Every document's pictures are located now: their walk is also the structure check of `imgs`.
    located = {name: dedupe.hash_pictures(index) for name, index in indexes.items()}
    known_ids = np.array(sorted({row[0] for row in rows}), dtype=np.int64)
    checked = {
        name: _check_products(name, index, known_ids, located[name]["damaged"]) for name, index in indexes.items()
    }
    if "train" in indexes:  # (an empty test.bson is allowed: a test catalog of 0 products, as given)
        _require_products(indexes["train"], checked["train"][0])
    for name, (_, problems) in checked.items():
        if config.strict and problems:
            raise IngestError(f"strict mode: {problems[0]}")
    pictures = {name: dedupe.select_pictures(located[name], checked[name][0]) for name in indexes}
    try:
        with staged(config.workdir) as out:
            report = _write_outputs(out, config, rows, indexes, checked, pictures)
            report["seconds"] = round(time.perf_counter() - start, 3)
            write_json(out.ingest_report, report)
    except StagingError as error:
        raise IngestError(str(error)) from error
    except OSError as error:
        raise IngestError(
            f"{config.workdir}: writing the new catalogs failed ({error}); the previous ingest is unchanged"
        ) from error
    _warn(report["problems"])
    return report


def _write_outputs(
    out: WorkPaths,
    config: IngestConfig,
    rows: list,
    indexes: dict[str, BsonIndex],
    checked: dict[str, tuple[np.ndarray, list[BsonProblem]]],
    pictures: dict[str, dict],
) -> dict:
    """Taxonomy, catalogs, picture table and config into `out` (the staging folder); returns the report."""
    report: dict = {"data_dir": str(Path(config.data_dir).resolve()), "files": {}, "problems": [], "duplicates": {}}
    split = None
    if "train" in indexes:
        split = _split_train(indexes["train"], checked["train"][0], pictures["train"], config)
    counts = _category_counts(split["category_id"][split["code"] == 0]) if split is not None else {}
    taxonomy = Taxonomy.from_rows(rows, counts)  # label order from the train split only
    taxonomy.save(out.taxonomy)
    tables = []
    for name, index in indexes.items():
        keep, problems = checked[name]
        table = _train_table(index, keep, taxonomy, split) if name == "train" else _test_table(index, keep)
        _write_catalog(out.catalog_table(name), table, index.path)
        tables.append(dedupe.pictures_table(name, index.product_id[keep], pictures[name]))
        report["files"][name] = _file_summary(index, table, problems)
        report["problems"] += [dataclasses.asdict(p) for p in problems]
        report["duplicates"][name] = _duplicate_summary(pictures[name], split if name == "train" else None)
    if "train" in pictures and "test" in pictures:
        report["duplicates"]["test"]["pictures_seen_in_train"] = _seen_in(pictures["test"], pictures["train"])
    write_parquet(dedupe.pictures_path(out.root), pa.concat_tables(tables))
    report["taxonomy"] = {"leaves": taxonomy.num_classes, "level1": taxonomy.num_level1, "level2": taxonomy.num_level2}
    save_config(config, out.catalog / "config.json")
    return report


def _require_products(index: BsonIndex, keep: np.ndarray) -> None:
    """A train file with no usable product is an error, never an empty catalog (a silent 0-product ingest)."""
    if np.any(keep):
        return
    found = f"{index.file_size} bytes, {len(index)} readable documents, {len(index.problems)} damaged or unusable"
    raise IngestError(
        f"{index.path}: no usable product ({found}); check that it is Kaggle's file (size, download complete) "
        "or move it out of the data folder"
    )


def _check_products(
    name: str, index: BsonIndex, known_ids: np.ndarray, damaged: list[tuple[int, str]] = ()
) -> tuple[np.ndarray, list[BsonProblem]]:
    """Rows to keep, and every problem of the file (damage plus unusable products) sorted by offset.

    Train products need intact `imgs`, images, a category from the taxonomy and an id not seen before; the others
    are dropped. Test products are all kept but a repeated `_id` (Kaggle wants one row per test `_id`: the first
    document wins), and the rest only reported. `damaged`: (row, reason) of documents whose `imgs` do not parse.
    """
    is_train, rows = name == "train", np.arange(len(index))
    # Test documents the index could only partly read are kept and reported by the index already.
    reported = np.isin(index.offset, [p.offset for p in index.problems if p.product_id is not None])
    damaged = [(row, why) for row, why in damaged if not reported[row]]
    broken = np.zeros(len(index), dtype=bool)
    broken[np.array([row for row, _ in damaged], dtype=np.int64)] = True
    no_images = (index.num_images <= 0) & ~broken & ~reported
    unknown = ~np.isin(index.category_id, known_ids) & ~broken if is_train else np.zeros(len(index), dtype=bool)
    unusable = broken | no_images | unknown if is_train else np.zeros(len(index), dtype=bool)
    first_row = _first_with_same_id(index.product_id, ~unusable)
    repeat = first_row != rows
    outcome = "dropped" if is_train else "kept"
    problems = list(index.problems)
    for row, why in damaged:
        problems.append(BsonProblem(index.path, int(index.offset[row]), "decode_error", f"{why} ({outcome})",
                                    int(index.product_id[row])))  # fmt: skip
    for row in np.flatnonzero(no_images | unknown | repeat):
        if no_images[row]:
            kind, reason = "no_images", f"product has no images ({outcome})"
        elif unknown[row]:
            category = int(index.category_id[row])
            missing = "no category_id field" if category < 0 else f"category_id {category} not in category_names.csv"
            kind, reason = "unknown_category", f"{missing} ({outcome})"
        else:
            first_offset = int(index.offset[first_row[row]])
            wins = "dropped" if is_train else "dropped: the submission has one row per _id, the first"
            kind, reason = "duplicate_id", f"same _id as the product at byte {first_offset} ({wins})"
        problems.append(BsonProblem(index.path, int(index.offset[row]), kind, reason, int(index.product_id[row])))
    keep = ~(unusable | repeat)
    return keep, sorted(problems, key=lambda p: p.offset)


def _first_with_same_id(product_id: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """For each candidate row, the first candidate row with the same id (itself if none earlier); others: own row."""
    first_row = np.arange(len(product_id))
    rows = np.flatnonzero(candidate)
    _, first, inverse = np.unique(product_id[rows], return_index=True, return_inverse=True)
    first_row[rows] = rows[first[inverse.reshape(-1)]]
    return first_row


def _category_counts(category_ids: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(category_ids, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


def _split_train(index: BsonIndex, keep: np.ndarray, pictures: dict[str, np.ndarray], config: IngestConfig) -> dict:
    """Duplicate groups of the kept train products, and their split codes (stratified by category id)."""
    present = pictures["length"] > 0  # an `imgs` element without a picture links nothing
    keys, product_row = dedupe.hash_keys(pictures["hash"][present]), pictures["document"][present]
    category_id = index.category_id[keep]
    groups = dedupe.duplicate_groups(product_row, keys, len(category_id))
    code = grouped_split(category_id, groups, config.val_fraction, config.holdout_fraction, config.seed)
    return {"groups": groups, "code": code, "category_id": category_id, "keys": keys, "product_row": product_row}


def _duplicate_summary(pictures: dict[str, np.ndarray], split: dict | None) -> dict:
    """Duplicate statistics of one catalog's pictures; train adds groups, leaves and a check across splits."""
    if split is None:
        keys = dedupe.hash_keys(pictures["hash"])
        stats = dedupe.duplicate_stats(keys, pictures["document"], np.zeros(0, dtype=np.int64))
        return {k: stats[k] for k in ("pictures", "distinct_pictures", "duplicate_share")}
    stats = dedupe.duplicate_stats(split["keys"], split["product_row"], split["groups"], split["category_id"])
    code = split["code"][split["product_row"]]
    low, high = np.full(stats["distinct_pictures"], 9, dtype=np.int8), np.zeros(stats["distinct_pictures"], np.int8)
    np.minimum.at(low, split["keys"], code)
    np.maximum.at(high, split["keys"], code)
    stats["hashes_in_two_splits"] = int(np.count_nonzero(low != high))  # 0 by construction
    return stats


def _seen_in(pictures: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> int:
    """How many of `pictures` have a byte-identical twin among `reference` (test pictures with a train twin)."""
    keys = dedupe.hash_keys(np.concatenate([pictures["hash"], reference["hash"]]))
    return int(np.isin(keys[: len(pictures["hash"])], keys[len(pictures["hash"]) :]).sum())


def _train_table(index: BsonIndex, keep: np.ndarray, taxonomy: Taxonomy, split: dict) -> pa.Table:
    labels = taxonomy.labels_of(index.category_id[keep])
    return pa.table(
        {
            "product_id": pa.array(index.product_id[keep]),
            "offset": pa.array(index.offset[keep]),
            "length": pa.array(index.length[keep]),
            "num_images": pa.array(index.num_images[keep]),
            "category_id": pa.array(index.category_id[keep]),
            "label": pa.array(labels.astype(np.int32)),
            "level1": pa.array(taxonomy.leaf_level1[labels]),
            "level2": pa.array(taxonomy.leaf_level2[labels]),
            "split": pa.DictionaryArray.from_arrays(pa.array(split["code"]), pa.array(SPLITS)),
            "group": pa.array(split["groups"].astype(np.int64)),
        }
    )


def _test_table(index: BsonIndex, keep: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "product_id": pa.array(index.product_id[keep]),
            "offset": pa.array(index.offset[keep]),
            "length": pa.array(index.length[keep]),
            "num_images": pa.array(index.num_images[keep]),
        }
    )


def _write_catalog(path: Path, table: pa.Table, source: str) -> None:
    write_parquet(path, table.replace_schema_metadata({b"prodcat.source": source.encode("utf-8")}))


def _file_summary(index: BsonIndex, table: pa.Table, problems: list[BsonProblem]) -> dict:
    summary = {
        "path": index.path,
        "bytes": index.file_size,
        "products": table.num_rows,
        "images": int(pc.sum(table["num_images"]).as_py() or 0),
        "problems": len(problems),
        "problem_kinds": {},
    }
    for problem in problems:
        summary["problem_kinds"][problem.kind] = summary["problem_kinds"].get(problem.kind, 0) + 1
    if "split" in table.column_names:
        splits = table["split"].to_numpy(zero_copy_only=False)
        for name in SPLITS:
            summary[f"{name}_products"] = int(np.sum(splits == name))
    return summary


def _warn(problems: list[dict]) -> None:
    for problem in problems[:_MAX_WARNINGS]:
        log.warning(str(BsonProblem(**problem)))
    if len(problems) > _MAX_WARNINGS:
        log.warning(
            "... and %d more problems; all are listed in catalog/ingest_report.json", len(problems) - _MAX_WARNINGS
        )


def load_catalog(workdir: str | Path, name: str, split: str | None = None) -> pa.Table:
    """Read `train` or `test` catalog; `split` filters train rows to `train`, `val` or `holdout`."""
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
