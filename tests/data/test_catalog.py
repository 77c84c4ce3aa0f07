"""`ingest`: catalogs, labels and split, and every kind of bad input reported (or fatal under strict)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import bson
import numpy as np
import pyarrow.parquet as pq
import pytest

from prodcat.config import IngestConfig
from prodcat.data.bson_index import BsonReader
from prodcat.data.catalog import TEST_COLUMNS, TRAIN_COLUMNS, IngestError, catalog_source, ingest, load_catalog
from prodcat.data.taxonomy import Taxonomy
from prodcat.paths import WorkPaths

CATEGORIES = [1000000001, 1000000002, 1000000003, 1000000004]


def run(data_dir: Path, workdir: Path, **kwargs) -> dict:
    return ingest(IngestConfig(data_dir=str(data_dir), workdir=str(workdir), **kwargs))


def test_catalogs_labels_and_split(tiny_data_dir, tmp_path):
    workdir = tmp_path / "work"
    report = run(tiny_data_dir, workdir, val_fraction=0.3, seed=1)
    paths = WorkPaths(workdir)
    train = load_catalog(workdir, "train")
    assert tuple(train.column_names) == TRAIN_COLUMNS
    assert train["product_id"].to_pylist() == list(range(100, 112))
    assert train["num_images"].to_pylist() == [1 + i % 4 for i in range(12)]
    taxonomy = Taxonomy.load(paths.taxonomy)
    category = train["category_id"].to_numpy()
    labels = train["label"].to_numpy()
    assert np.array_equal(taxonomy.labels_of(category), labels)
    assert np.array_equal(taxonomy.leaf_level1[labels], train["level1"].to_numpy())
    assert np.array_equal(taxonomy.leaf_level2[labels], train["level2"].to_numpy())
    # Label order follows the counts of the train split only (val and holdout never shape the model's classes).
    in_train = train["split"].to_numpy(zero_copy_only=False) == "train"
    assert taxonomy.train_counts.tolist() == np.bincount(labels[in_train], minlength=6).tolist()
    assert taxonomy.train_counts.tolist() == sorted(taxonomy.train_counts.tolist(), reverse=True)
    assert taxonomy.train_counts.sum() == in_train.sum() < 12
    splits = ("train", "val", "holdout")
    parts = {split: load_catalog(workdir, "train", split)["product_id"].to_pylist() for split in splits}
    assert sorted(parts["train"] + parts["val"] + parts["holdout"]) == list(range(100, 112))
    assert not set(parts["train"]) & set(parts["val"])
    assert report["files"]["train"]["val_products"] == len(parts["val"]) > 0
    assert report["files"]["train"]["holdout_products"] == len(parts["holdout"])
    test = load_catalog(workdir, "test")
    assert tuple(test.column_names) == TEST_COLUMNS and test["product_id"].to_pylist() == [900, 901, 902]
    assert catalog_source(workdir, "train") == (tiny_data_dir / "train.bson").resolve()
    assert catalog_source(workdir, "test") == (tiny_data_dir / "test.bson").resolve()
    assert json.loads((paths.catalog / "config.json").read_text())["val_fraction"] == 0.3
    assert report["problems"] == [] and report["taxonomy"] == {"leaves": 6, "level1": 4, "level2": 4}
    assert json.loads(paths.ingest_report.read_text())["files"]["train"]["images"] == 30


def test_catalog_offsets_read_back_the_pictures(tiny_data_dir, tmp_path):
    run(tiny_data_dir, tmp_path / "work")
    train = load_catalog(tmp_path / "work", "train")
    with open(tiny_data_dir / "train.bson", "rb") as handle:
        expected = [[image["picture"] for image in doc["imgs"]] for doc in bson.decode_file_iter(handle)]
    with BsonReader(catalog_source(tmp_path / "work", "train")) as reader:
        got = [
            reader.pictures(o, n) for o, n in zip(train["offset"].to_pylist(), train["length"].to_pylist(), strict=True)
        ]
    assert got == expected


def test_split_is_deterministic(tiny_data_dir, tmp_path):
    first = run(tiny_data_dir, tmp_path / "a", val_fraction=0.4, seed=5)
    second = run(tiny_data_dir, tmp_path / "b", val_fraction=0.4, seed=5)
    assert first["files"]["train"]["val_products"] == second["files"]["train"]["val_products"]
    a, b = (load_catalog(tmp_path / w, "train")["split"].to_pylist() for w in ("a", "b"))
    assert a == b
    assert set(load_catalog(tmp_path / "a", "train", "val")["product_id"].to_pylist())
    run(tiny_data_dir, tmp_path / "c", val_fraction=0.0, holdout_fraction=0.0)
    assert set(load_catalog(tmp_path / "c", "train")["split"].to_pylist()) == {"train"}


# -- bad input ----------------------------------------------------------------------------------------------------
def bad_train(case: str, data_dir: Path, write_bson, make_product, write_taxonomy_csv) -> tuple[str, int, list[int]]:
    """Write train.bson with one problem of `case`: (kind, offset, product ids that must survive)."""
    docs = [make_product(100 + i, CATEGORIES[i % 4], 1 + i % 4) for i in range(6)]
    ids = [100 + i for i in range(6)]
    if case == "no_images":
        docs[2] = make_product(102, CATEGORIES[0], 0)
    elif case == "unknown_category":
        docs[2] = make_product(102, 42, 1)
    elif case == "no_category":
        docs[2] = make_product(102, None, 1)
    elif case == "duplicate_id":
        docs[3] = make_product(101, CATEGORIES[1], 2)
    path = data_dir / "train.bson"
    frames = write_bson(path, docs)
    data = bytearray(path.read_bytes())
    victim = 3 if case == "duplicate_id" else 2
    offset = frames[victim][0]
    if case == "truncated":
        victim, offset = 5, frames[5][0]
        data = data[: frames[5][0] + 30]
    elif case == "bad_length":
        data[offset : offset + 4] = (2**30).to_bytes(4, "little")  # runs past the end of the file, mid-file
    elif case == "decode_error":
        data[offset + 4] = 0xEE
    elif case == "trailing_bytes":
        victim, offset = None, len(data)
        data += b"\x01\x02\x03\x04\x05\x06"
    path.write_bytes(bytes(data))
    write_taxonomy_csv(data_dir / "category_names.csv")
    kind = "unknown_category" if case == "no_category" else case
    return kind, offset, [product_id for i, product_id in enumerate(ids) if i != victim]


CASES = [
    "truncated",
    "bad_length",
    "decode_error",
    "no_images",
    "unknown_category",
    "no_category",
    "duplicate_id",
    "trailing_bytes",
]


@pytest.mark.parametrize("case", CASES)
def test_each_problem_is_reported_and_skipped(case, tmp_path, write_bson, make_product, write_taxonomy_csv, caplog):
    data_dir, workdir = tmp_path / "data", tmp_path / "work"
    kind, offset, survivors = bad_train(case, data_dir, write_bson, make_product, write_taxonomy_csv)
    with caplog.at_level(logging.WARNING, logger="prodcat"):
        report = run(data_dir, workdir)
    source = str((data_dir / "train.bson").resolve())
    on_disk = json.loads(WorkPaths(workdir).ingest_report.read_text())
    assert on_disk == report
    assert [(p["kind"], p["offset"], p["file"]) for p in on_disk["problems"]] == [(kind, offset, source)]
    assert on_disk["files"]["train"]["problems"] == 1 and on_disk["files"]["train"]["problem_kinds"] == {kind: 1}
    assert on_disk["files"]["train"]["products"] == len(survivors)
    assert load_catalog(workdir, "train")["product_id"].to_pylist() == survivors
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(source in w and f"at byte {offset}" in w and kind in w for w in warnings), warnings


@pytest.mark.parametrize("case", CASES)
def test_strict_stops_at_the_first_problem(case, tmp_path, write_bson, make_product, write_taxonomy_csv):
    data_dir, workdir = tmp_path / "data", tmp_path / "work"
    kind, offset, _ = bad_train(case, data_dir, write_bson, make_product, write_taxonomy_csv)
    source = str((data_dir / "train.bson").resolve())
    with pytest.raises(IngestError, match=f"strict mode: {source} at byte {offset}.*{kind}"):
        run(data_dir, workdir, strict=True)
    assert not WorkPaths(workdir).catalog_table("train").exists()  # nothing half-written


def test_many_problems_in_one_file(tmp_path, write_bson, make_product, write_taxonomy_csv):
    docs = [make_product(100 + i, CATEGORIES[i % 4], 1 + i % 4) for i in range(10)]
    docs[1] = make_product(101, CATEGORIES[0], 0)
    docs[4] = make_product(104, 42, 1)
    path = tmp_path / "data" / "train.bson"
    frames = write_bson(path, docs)
    data = bytearray(path.read_bytes())
    data[frames[6][0] + 4] = 0xEE
    data[frames[8][0] : frames[8][0] + 4] = (2**30).to_bytes(4, "little")
    path.write_bytes(bytes(data[:-10]))
    write_taxonomy_csv(tmp_path / "data" / "category_names.csv")
    report = run(tmp_path / "data", tmp_path / "work")
    expected = [
        ("no_images", frames[1][0]),
        ("unknown_category", frames[4][0]),
        ("decode_error", frames[6][0]),
        ("bad_length", frames[8][0]),
        ("truncated", frames[9][0]),
    ]
    assert [(p["kind"], p["offset"]) for p in report["problems"]] == expected
    assert load_catalog(tmp_path / "work", "train")["product_id"].to_pylist() == [100, 102, 103, 105, 107]


def test_test_products_without_images_are_kept(tmp_path, write_bson, make_product, write_taxonomy_csv, caplog):
    data_dir = tmp_path / "data"
    frames = write_bson(
        data_dir / "test.bson",
        [make_product(7, None, 2), make_product(8, None, 0), {"_id": 9}, make_product(10, None, 1)],
    )
    write_taxonomy_csv(data_dir / "category_names.csv")
    with caplog.at_level(logging.WARNING, logger="prodcat"):
        report = run(data_dir, tmp_path / "work")
    test = load_catalog(tmp_path / "work", "test")
    assert test["product_id"].to_pylist() == [7, 8, 9, 10]
    assert test["num_images"].to_pylist() == [2, 0, 0, 1]
    assert [(p["kind"], p["offset"], p["product_id"]) for p in report["problems"]] == [
        ("no_images", frames[1][0], 8),
        ("no_images", frames[2][0], 9),
    ]
    assert "train" not in report["files"] and report["files"]["test"]["products"] == 4
    assert sum(f"at byte {frames[1][0]}" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(IngestError, match=f"at byte {frames[1][0]}.*no_images"):
        run(data_dir, tmp_path / "strict", strict=True)


def test_many_warnings_are_capped(tmp_path, write_bson, make_product, write_taxonomy_csv, caplog):
    docs = [make_product(i, 42, 1) for i in range(30)] + [make_product(99, CATEGORIES[0], 1)]
    write_bson(tmp_path / "data" / "train.bson", docs)
    write_taxonomy_csv(tmp_path / "data" / "category_names.csv")
    with caplog.at_level(logging.WARNING, logger="prodcat"):
        report = run(tmp_path / "data", tmp_path / "work")
    assert len(report["problems"]) == 30 and report["files"]["train"]["products"] == 1
    assert len(caplog.records) == 21 and "10 more problems" in caplog.records[-1].getMessage()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "category file not found"),
        (b"id,l1,l2,l3\n1,a,b,c\n", "header must be"),
        (b"category_id,category_level1,category_level2,category_level3\n1,a,b\n", "expected 4 fields"),
        (b"category_id,category_level1,category_level2,category_level3\none,a,b,c\n", "is not an integer"),
        (b"category_id,category_level1,category_level2,category_level3\n1,a,b,c\n1,a,b,d\n", "repeats line 2"),
        (b"category_id,category_level1,category_level2,category_level3\n1,\xff,b,c\n", "not UTF-8"),
    ],
)
def test_bad_csv_is_a_clear_error(tmp_path, write_bson, make_product, content, message):
    data_dir = tmp_path / "data"
    write_bson(data_dir / "train.bson", [make_product(1, 1, 1)])
    if content is not None:
        (data_dir / "category_names.csv").write_bytes(content)
    with pytest.raises(IngestError, match=message) as caught:
        run(data_dir, tmp_path / "work")
    assert "category_names.csv" in str(caught.value)


def test_no_bson_files(tmp_path, write_taxonomy_csv):
    write_taxonomy_csv(tmp_path / "data" / "category_names.csv")
    with pytest.raises(IngestError, match="no train.bson or test.bson"):
        run(tmp_path / "data", tmp_path / "work")


def test_load_catalog_before_ingest(tmp_path):
    with pytest.raises(FileNotFoundError, match="prodcat ingest"):
        load_catalog(tmp_path, "train")


def test_real_train_example(shared_data_dir, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # Link, never copy, the real files: ingest wants them side by side under Kaggle's names.
    (data_dir / "train.bson").symlink_to(shared_data_dir / "train_example.bson")
    (data_dir / "category_names.csv").symlink_to(shared_data_dir / "category_names.csv")
    report = run(data_dir, tmp_path / "work")
    summary = report["files"]["train"]
    assert (summary["products"], summary["images"], summary["problems"]) == (82, 110, 0)
    train = load_catalog(tmp_path / "work", "train")
    assert len(set(train["category_id"].to_pylist())) == 36
    assert report["taxonomy"] == {"leaves": 5270, "level1": 49, "level2": 486}
    taxonomy = Taxonomy.load(WorkPaths(tmp_path / "work").taxonomy)
    assert taxonomy.train_counts[:36].min() >= 1 and taxonomy.train_counts[36:].max() == 0
    assert pq.read_schema(WorkPaths(tmp_path / "work").catalog_table("train")).metadata[b"prodcat.source"]
