"""Issue 12, ingest: test rows kept when the _id is readable, damage inside `imgs` found, re-ingest all or nothing,
no silent caps (128+ pictures, an empty or garbage train.bson)."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import bson
import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import prodcat.data.bson_index as bson_index
import prodcat.data.catalog as catalog_module
import prodcat.data.staging as staging
from prodcat.cli import app
from prodcat.config import IngestConfig
from prodcat.data.bson_index import index_bson
from prodcat.data.catalog import IngestError, ingest, load_catalog
from prodcat.data.dedupe import load_pictures
from prodcat.data.kernels import bson_scan
from prodcat.data.taxonomy import Taxonomy
from prodcat.features.store import make_rows
from prodcat.paths import WorkPaths

CATEGORIES = [1000000001, 1000000002, 1000000003, 1000000004]


def run(data_dir: Path, workdir: Path, **kwargs) -> dict:
    return ingest(IngestConfig(data_dir=str(data_dir), workdir=str(workdir), **kwargs))


def image_entry(document: bytes, index: int) -> int:
    """Byte offset (inside `document`) of `imgs[index]`, the embedded `{picture: ...}` element."""
    return document.index(b"\x03" + str(index).encode() + b"\x00", document.index(b"\x04imgs\x00"))


def zeroed(document: bytes, at: int, count: int = 30) -> bytes:
    data = bytearray(document)
    data[at : at + count] = bytes(count)
    return bytes(data)


# -- 5: every readable test _id keeps its row ----------------------------------------------------------------------
def damaged_test_file(path: Path, make_product, write_bson) -> tuple[list[tuple[int, int]], list[int]]:
    """test.bson with wrong types, damage after the _id, an unreadable _id and a repeated _id: (frames, row ids)."""
    inner = bson.encode(make_product(4, None, 2))
    outer = bson.encode(make_product(5, None, 2))
    docs = [
        make_product(1, None, 1),
        {"_id": 2, "imgs": make_product(2, None, 1)["imgs"], "category_id": "x"},  # wrong-typed category_id
        {"_id": 3, "imgs": "no list"},  # wrong-typed imgs
        zeroed(inner, image_entry(inner, 1) + 7),  # the imgs walk finds it (the index's framing does not)
        zeroed(outer, image_entry(outer, 1)),  # the index finds it: the document does not decode
        {"_id": "abc", "imgs": []},  # no readable _id: no row
        make_product(7, None, 1),
        make_product(1, None, 2),  # repeated _id: the first document keeps the row
    ]
    return write_bson(path, docs), [1, 2, 3, 4, 5, 7]


@pytest.fixture(params=["python", "compiled"])
def index_path(request, monkeypatch) -> str:
    """Both index paths: the Python walk + numpy parse (small files) and the compiled walk (large files)."""
    if request.param == "compiled":
        if bson_scan.walk is None:
            pytest.skip("numba not installed")
        monkeypatch.setattr(bson_index, "_COMPILED_MIN_BYTES", 0)
    return request.param


def test_test_documents_with_readable_ids_keep_their_rows(
    tmp_path, write_bson, make_product, write_taxonomy_csv, index_path
):
    data = tmp_path / "data"
    frames, ids = damaged_test_file(data / "test.bson", make_product, write_bson)
    write_taxonomy_csv(data / "category_names.csv")
    assert index_bson(data / "test.bson").product_id.tolist() == [1, 4, 7, 1]  # train rules: damaged ones dropped
    assert index_bson(data / "test.bson", keep_damaged=True).product_id.tolist() == [1, 2, 3, 4, 5, 7, 1]
    report = run(data, tmp_path / "W")
    test = load_catalog(tmp_path / "W", "test")
    assert test["product_id"].to_pylist() == ids
    assert test["num_images"].to_pylist() == [1, 1, 0, 2, 0, 1]
    found = {(p["kind"], p["offset"], p["product_id"]) for p in report["problems"]}
    assert {
        ("bad_field", frames[1][0], 2),
        ("bad_field", frames[2][0], 3),
        ("decode_error", frames[3][0], 4),
        ("decode_error", frames[4][0], 5),
        ("bad_field", frames[5][0], None),
        ("duplicate_id", frames[7][0], 1),
    } == found
    duplicate = next(p for p in report["problems"] if p["kind"] == "duplicate_id")
    assert f"at byte {frames[0][0]}" in duplicate["reason"] and "the first" in duplicate["reason"]


def test_submission_rows_one_per_readable_id_in_order(tmp_path, write_bson, make_product, caplog):
    from prodcat.predict.submission import _submission_rows

    frames, ids = damaged_test_file(tmp_path / "query.bson", make_product, write_bson)
    with caplog.at_level(logging.WARNING, logger="prodcat"):
        rows = _submission_rows(tmp_path / "query.bson")
    assert rows.product_id.tolist() == ids
    messages = [record.getMessage() for record in caplog.records]
    assert any(f"at byte {frames[7][0]}: duplicate _id 1" in m and "keeps the first" in m for m in messages)
    assert any(f"at byte {frames[5][0]}" in m and "no row" in m for m in messages)
    assert not any(f"at byte {frames[2][0]}" in m and "no row" in m for m in messages)


# -- 7: damage inside a document ---------------------------------------------------------------------------------
def train_with_zeroed_entry(data: Path, write_bson, make_product, write_taxonomy_csv, shift: int) -> tuple[int, int]:
    """train.bson whose product 102 has 30 zeroed bytes `shift` bytes into imgs[1]: (its offset, the entry's)."""
    docs = [bson.encode(make_product(100 + i, CATEGORIES[i % 4], 3)) for i in range(6)]
    entry = image_entry(docs[2], 1)
    docs[2] = zeroed(docs[2], entry + shift)
    frames = write_bson(data / "train.bson", docs)
    write_taxonomy_csv(data / "category_names.csv")
    return frames[2][0], frames[2][0] + entry


@pytest.mark.parametrize("shift", [0, 3, 7, 12, 16])  # the entry's type, its length, its `picture` element header
def test_zeroed_bytes_inside_an_imgs_entry_are_reported(
    tmp_path, write_bson, make_product, write_taxonomy_csv, shift, index_path
):
    data = tmp_path / "data"
    offset, entry = train_with_zeroed_entry(data, write_bson, make_product, write_taxonomy_csv, shift)
    source = str((data / "train.bson").resolve())
    report = run(data, tmp_path / "W")
    assert [(p["kind"], p["offset"], p["file"]) for p in report["problems"]] == [("decode_error", offset, source)]
    if shift >= 7:  # framing and element lengths hold: only the walk through imgs sees it
        assert f"imgs[1] at byte {entry}" in report["problems"][0]["reason"]
    assert load_catalog(tmp_path / "W", "train")["product_id"].to_pylist() == [100, 101, 103, 104, 105]
    with pytest.raises(IngestError, match=f"strict mode: {source} at byte {offset}.*decode_error"):
        run(data, tmp_path / "strict", strict=True)


def test_zeroed_picture_bytes_are_not_structure(tmp_path, write_bson, make_product, write_taxonomy_csv):
    # Past the picture element's header the 30 bytes are the picture's own: BSON structure is intact, and whether
    # the picture decodes is found at extraction (pictures are never decoded at ingest).
    data = tmp_path / "data"
    train_with_zeroed_entry(data, write_bson, make_product, write_taxonomy_csv, shift=21)
    assert run(data, tmp_path / "W", strict=True)["problems"] == []


# -- 8: re-ingest is all or nothing ----------------------------------------------------------------------------------
def snapshot(workdir: Path) -> dict[str, bytes]:
    paths = WorkPaths(workdir)
    files = [paths.taxonomy, *sorted(paths.catalog.iterdir())]
    return {str(path.relative_to(workdir)): path.read_bytes() for path in files}


def second_data_dir(tmp_path: Path, write_bson, make_product, write_taxonomy_csv) -> Path:
    """Another data set: other products, another label order (category 4 most frequent), no test.bson."""
    data = tmp_path / "data2"
    write_bson(data / "train.bson", [make_product(500 + i, CATEGORIES[3 if i % 3 else i % 4], 1) for i in range(15)])
    write_taxonomy_csv(data / "category_names.csv")
    return data


def assert_consistent(workdir: Path) -> None:
    train = load_catalog(workdir, "train")
    taxonomy = Taxonomy.load(WorkPaths(workdir).taxonomy)
    assert np.array_equal(taxonomy.labels_of(train["category_id"].to_numpy()), train["label"].to_numpy())
    assert not list(workdir.glob(".ingest-*"))


def test_a_failed_write_leaves_the_previous_ingest(
    tiny_data_dir, tmp_path, write_bson, make_product, write_taxonomy_csv, monkeypatch
):
    workdir = tmp_path / "W"
    run(tiny_data_dir, workdir)
    before = snapshot(workdir)
    data = second_data_dir(tmp_path, write_bson, make_product, write_taxonomy_csv)

    def full_disk(path, table):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(catalog_module, "write_parquet", full_disk)  # catalog writes; the taxonomy was written
    with pytest.raises(IngestError, match="No space left on device.*previous ingest is unchanged"):
        run(data, workdir)
    assert snapshot(workdir) == before
    assert_consistent(workdir)


class Killed(BaseException):
    """Stands for kill -9: no handler of ingest runs."""


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4])
def test_a_killed_swap_is_finished_by_the_next_ingest(
    tiny_data_dir, tmp_path, write_bson, make_product, write_taxonomy_csv, monkeypatch, kill_at, caplog
):
    workdir = tmp_path / "W"
    run(tiny_data_dir, workdir)
    data = second_data_dir(tmp_path, write_bson, make_product, write_taxonomy_csv)
    calls: list = []
    real_replace = os.replace

    def replace(source, target):  # os.replace also ends each atomic file write: count only the swap's moves
        if Path(source).name in ("taxonomy.parquet", "catalog"):
            calls.append(source)
            if len(calls) == kill_at:
                raise Killed
        real_replace(source, target)

    monkeypatch.setattr(staging.os, "replace", replace)
    with pytest.raises(Killed):
        run(data, workdir)
    monkeypatch.setattr(staging.os, "replace", real_replace)
    assert list(workdir.glob(".ingest-staging-*"))  # left behind, as a kill would
    with caplog.at_level(logging.WARNING, logger="prodcat"):
        done = staging.recover(workdir)
    assert len(done) == 1 and "finished the swap" in done[0]
    assert load_catalog(workdir, "train")["product_id"].to_pylist() == list(range(500, 515))
    assert not WorkPaths(workdir).catalog_table("test").exists()
    assert_consistent(workdir)


def test_leftovers_of_a_dead_ingest_are_removed_and_a_live_one_is_refused(tiny_data_dir, tmp_path, caplog):
    workdir = tmp_path / "W"
    run(tiny_data_dir, workdir)
    before = snapshot(workdir)
    dead = workdir / f"{staging.STAGING_PREFIX}{2**22 + 12345}"  # above Linux's pid_max: never a live process
    (dead / "catalog").mkdir(parents=True)
    (dead / "taxonomy.parquet").write_bytes(b"half written")
    with caplog.at_level(logging.WARNING, logger="prodcat"):
        run(tiny_data_dir, workdir)
    assert not dead.exists() and any("half-written" in r.getMessage() for r in caplog.records)
    assert snapshot(workdir).keys() == before.keys()
    live = workdir / f"{staging.STAGING_PREFIX}{os.getppid()}"
    live.mkdir()
    with pytest.raises(IngestError, match=f"another ingest \\(pid {os.getppid()}\\)"):
        run(tiny_data_dir, workdir)
    assert live.exists() and snapshot(workdir) == snapshot(workdir)


def test_reingest_without_test_bson_removes_the_old_test_catalog(tiny_data_dir, tmp_path):
    workdir = tmp_path / "W"
    run(tiny_data_dir, workdir)
    assert WorkPaths(workdir).catalog_table("test").exists()
    (tiny_data_dir / "test.bson").unlink()
    report = run(tiny_data_dir, workdir)
    assert not WorkPaths(workdir).catalog_table("test").exists() and "test" not in report["files"]
    assert set(load_pictures(workdir)["source"].to_pylist()) == {"train"}
    assert_consistent(workdir)


# -- 11: no silent caps ------------------------------------------------------------------------------------------
def test_products_with_128_or_more_pictures_keep_them(tmp_path, write_bson, make_product, write_taxonomy_csv):
    data = tmp_path / "data"
    docs = [make_product(100 + i, CATEGORIES[i % 4], 2) for i in range(5)] + [make_product(7, CATEGORIES[0], 200)]
    write_bson(data / "train.bson", docs)
    write_taxonomy_csv(data / "category_names.csv")
    report = run(data, tmp_path / "W", strict=True)
    assert report["problems"] == []
    train = load_catalog(tmp_path / "W", "train")
    assert train["num_images"].to_pylist()[-1] == 200 and report["files"]["train"]["images"] == 210
    pictures = load_pictures(tmp_path / "W", "train").to_pandas()
    assert pictures[pictures.product_id == 7].image_index.tolist() == list(range(200))
    rows = make_rows(np.full(200, 7), np.arange(200), *(np.zeros(200),) * 3, np.array(["train"] * 200))
    assert rows["image_index"].to_pylist() == list(range(200))  # the feature store keeps them apart too


def test_more_pictures_than_the_cap_are_reported(tmp_path, write_bson, make_product, write_taxonomy_csv, monkeypatch):
    monkeypatch.setattr(bson_index, "MAX_IMAGES", 150)  # the real cap is 32767 (int16)
    data = tmp_path / "data"
    frames = write_bson(data / "train.bson", [make_product(1, CATEGORIES[0], 1), make_product(7, CATEGORIES[0], 200)])
    write_taxonomy_csv(data / "category_names.csv")
    report = run(data, tmp_path / "W")
    assert [(p["kind"], p["offset"], p["product_id"]) for p in report["problems"]] == [
        ("too_many_images", frames[1][0], 7)
    ]
    assert "200 pictures; the first 150 are kept" in report["problems"][0]["reason"]
    assert load_catalog(tmp_path / "W", "train")["num_images"].to_pylist() == [1, 150]
    assert len(load_pictures(tmp_path / "W", "train")) == 151


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, np.random.default_rng(0).bytes(5000)])
@pytest.mark.parametrize("strict", [False, True])
def test_empty_or_garbage_train_bson_is_an_error(tmp_path, write_taxonomy_csv, content, strict):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.bson").write_bytes(content)
    write_taxonomy_csv(data / "category_names.csv")
    args = ["ingest", str(data), "--workdir", str(tmp_path / "W")] + (["--strict"] if strict else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.bson: no usable product" in lines[0], lines
    assert f"{len(content)} bytes" in lines[0]
    assert not (tmp_path / "W").exists() or not WorkPaths(tmp_path / "W").catalog.exists()


def test_report_on_disk_matches_and_names_no_staging_path(tiny_data_dir, tmp_path):
    report = run(tiny_data_dir, tmp_path / "W")
    on_disk = json.loads(WorkPaths(tmp_path / "W").ingest_report.read_text())
    assert on_disk == report and ".ingest-" not in json.dumps(on_disk)
    assert pq.read_schema(WorkPaths(tmp_path / "W").catalog_table("train")).metadata[b"prodcat.source"]


def test_a_store_written_with_int8_image_index_still_resumes(tmp_path):
    import pyarrow as pa

    from prodcat.features.store import FeatureStore, StoreError

    rows = make_rows(np.array([1, 1, 2]), np.array([0, 1, 0]), *(np.zeros(3),) * 3, np.array(["train"] * 3))
    FeatureStore.create(tmp_path / "s", rows, (4,), 2, {})
    old = pq.read_table(tmp_path / "s" / "rows.parquet")
    position = old.schema.get_field_index("image_index")
    old = old.set_column(position, "image_index", old["image_index"].cast(pa.int8()))  # as stores were written
    pq.write_table(old, tmp_path / "s" / "rows.parquet")
    FeatureStore.create(tmp_path / "s", rows, (4,), 2, {})  # same rows: accepted
    other = make_rows(np.array([1, 1, 2]), np.array([0, 2, 0]), *(np.zeros(3),) * 3, np.array(["train"] * 3))
    with pytest.raises(StoreError, match="differs in rows"):
        FeatureStore.create(tmp_path / "s", other, (4,), 2, {})


def test_a_failed_swap_says_how_to_finish_it(
    tiny_data_dir, tmp_path, write_bson, make_product, write_taxonomy_csv, monkeypatch
):
    workdir = tmp_path / "W"
    run(tiny_data_dir, workdir)
    data = second_data_dir(tmp_path, write_bson, make_product, write_taxonomy_csv)
    real_replace = os.replace

    def replace(source, target):
        if Path(source).name == "catalog" and staging.STAGING_PREFIX in str(source):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(staging.os, "replace", replace)
    with pytest.raises(IngestError, match="swapping in the new ingest failed.*run `prodcat ingest` again"):
        run(data, workdir)
    monkeypatch.setattr(staging.os, "replace", real_replace)
    staging.recover(workdir)
    assert load_catalog(workdir, "train")["product_id"].to_pylist() == list(range(500, 515))
    assert_consistent(workdir)
