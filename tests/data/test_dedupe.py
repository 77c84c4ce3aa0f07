"""Picture hashes at ingest, duplicate groups, the duplicate-aware split and the demo generator's duplicates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import bson
import numpy as np
import pyarrow.parquet as pq
import pytest
import xxhash

from prodcat.config import DemoConfig, IngestConfig
from prodcat.data import dedupe
from prodcat.data.bson_index import BsonReader, index_bson
from prodcat.data.catalog import ingest, load_catalog
from prodcat.data.synthetic.demo import generate_demo
from prodcat.data.taxonomy import Taxonomy
from prodcat.paths import WorkPaths

CATEGORIES = [1000000001, 1000000002, 1000000003, 1000000004]


def run(data_dir: Path, workdir: Path, **kwargs) -> dict:
    return ingest(IngestConfig(data_dir=str(data_dir), workdir=str(workdir), **kwargs))


def picture_bytes(key: int, size: int = 300) -> bytes:
    """Distinct bytes per key (long enough for XXH3's compiled path unless `size` says otherwise)."""
    return b"\xff\xd8" + np.random.default_rng(key).integers(0, 256, size, dtype=np.uint8).tobytes()


def splits_of(workdir: Path) -> dict[int, str]:
    train = load_catalog(workdir, "train")
    return dict(zip(train["product_id"].to_pylist(), train["split"].cast("string").to_pylist(), strict=True))


# -- hashing ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compiled", [True, False])
def test_hashes_equal_xxh3_128_for_every_length(compiled, monkeypatch):
    if not compiled:
        monkeypatch.setattr(dedupe, "compiled_hasher", lambda: None)
    elif dedupe.compiled_hasher() is None:
        pytest.skip("numba not installed")
    data = np.random.default_rng(0).integers(0, 256, 40_000, dtype=np.uint8).tobytes()
    lengths = np.r_[np.arange(0, 1100), [1024, 1025, 2048, 2049, 4095, 9000, 20_000]]
    starts = np.random.default_rng(1).integers(0, len(data) - 20_000, len(lengths))
    got = dedupe.hash_ranges(data, starts, lengths)
    expected = [xxhash.xxh3_128_digest(data[s : s + n]) for s, n in zip(starts.tolist(), lengths.tolist())]
    assert [bytes(row) for row in got] == expected
    assert bytes(dedupe.hash_ranges(data, np.array([-1]), np.array([0]))[0]) == xxhash.xxh3_128_digest(b"")


def test_union_find_is_transitive_and_takes_the_smallest_row():
    # Products 0-1 share hash 10, 1-4 share 11, 4-2 share 12 (a chain 0-1-4-2); 3 and 5 share 13; 6 has none.
    product_row = np.array([0, 1, 1, 4, 4, 2, 3, 5, 5, 2])
    keys = np.array([10, 10, 11, 11, 12, 12, 13, 13, 13, 14])
    expected = [0, 0, 0, 3, 0, 3, 6]
    assert dedupe.duplicate_groups(product_row, keys, 7).tolist() == expected
    order = np.random.default_rng(0).permutation(len(keys))  # picture order does not matter
    assert dedupe.duplicate_groups(product_row[order], keys[order], 7).tolist() == expected
    stats = dedupe.duplicate_stats(keys - 10, product_row, np.array(expected), np.array([1, 1, 2, 3, 1, 3, 4]))
    assert stats["groups"] == 2 and stats["products_in_groups"] == 6 and stats["largest_group"] == 4
    assert stats["group_sizes"]["2"] == 1 and stats["group_sizes"]["3-4"] == 1
    assert stats["distinct_pictures"] == 5 and stats["duplicate_share"] == pytest.approx(1 - 5 / 10)
    assert stats["most_reused"][0] == {"copies": 3, "products": 2, "picture_row": 6, "categories": 1}


# -- ingest ---------------------------------------------------------------------------------------------------------
def write_data(data: Path, write_bson, write_taxonomy_csv, train: list[list[int]], test: list[list[int]]) -> None:
    """train.bson / test.bson whose products show the pictures keyed by each inner list."""
    docs = [
        {"_id": 100 + i, "imgs": [{"picture": picture_bytes(k)} for k in keys], "category_id": CATEGORIES[i % 4]}
        for i, keys in enumerate(train)
    ]
    write_bson(data / "train.bson", docs)
    write_bson(
        data / "test.bson",
        [{"_id": 900 + i, "imgs": [{"picture": picture_bytes(k)} for k in keys]} for i, keys in enumerate(test)],
    )
    write_taxonomy_csv(data / "category_names.csv")


def test_pictures_table_schema_order_and_bytes(tmp_path, write_bson, write_taxonomy_csv):
    train = [[1, 2], [3], [1], [4, 5, 6], [7], [3, 8]]
    write_data(tmp_path / "data", write_bson, write_taxonomy_csv, train, [[2, 9], [10]])
    run(tmp_path / "data", tmp_path / "work")
    table = dedupe.load_pictures(tmp_path / "work")
    assert table.schema.equals(dedupe.PICTURES_SCHEMA)
    assert table["source"].to_pylist() == ["train"] * 10 + ["test"] * 3
    assert table["product_id"].to_pylist() == [100, 100, 101, 102, 103, 103, 103, 104, 105, 105, 900, 900, 901]
    assert table["image_index"].to_pylist() == [0, 1, 0, 0, 0, 1, 2, 0, 0, 1, 0, 1, 0]
    keys = [k for keys in train for k in keys] + [2, 9, 10]
    hashes = [bytes(h) for h in table["hash"].to_pylist()]
    assert hashes == [xxhash.xxh3_128_digest(picture_bytes(k)) for k in keys]
    assert hashes[0] == hashes[3] and hashes[1] == hashes[10] and len(set(hashes)) == 10  # byte-identical: equal
    data = {
        "train": (tmp_path / "data" / "train.bson").read_bytes(),
        "test": (tmp_path / "data" / "test.bson").read_bytes(),
    }
    for row, key in zip(table.to_pylist(), keys, strict=True):
        assert data[row["source"]][row["offset"] : row["offset"] + row["length"]] == picture_bytes(key)
    assert dedupe.load_pictures(tmp_path / "work", "test").num_rows == 3
    assert load_catalog(tmp_path / "work", "train")["group"].to_pylist() == [0, 1, 0, 3, 4, 1]


def test_odd_layouts_are_located_by_the_python_walker(tmp_path, write_bson, encode_reordered):
    """Extra fields, more than ten images, `_id` last, a short picture: same rows as pymongo's decode."""
    docs = [
        {"_id": 1, "imgs": [{"picture": picture_bytes(1), "note": "x"}], "category_id": CATEGORIES[0]},
        {"_id": 2, "imgs": [{"picture": picture_bytes(k, 20 + k)} for k in range(12)], "category_id": CATEGORIES[1]},
        encode_reordered({"_id": 3, "imgs": [{"picture": picture_bytes(3)}], "category_id": CATEGORIES[2]}),
        {"_id": 4, "imgs": [{"picture": picture_bytes(4, 10)}, {"other": 1}], "category_id": CATEGORIES[3]},
    ]
    write_bson(tmp_path / "train.bson", docs)
    index = index_bson(tmp_path / "train.bson")
    pictures = dedupe.hash_pictures(index)
    raw = (tmp_path / "train.bson").read_bytes()
    with BsonReader(tmp_path / "train.bson") as reader:
        expected = [reader.pictures(o, n) for o, n in zip(index.offset.tolist(), index.length.tolist())]
    got: list[list[bytes]] = [[] for _ in expected]
    for doc, at, size, digest in zip(pictures["document"], pictures["offset"], pictures["length"], pictures["hash"]):
        piece = raw[at : at + size] if at >= 0 else b""
        got[doc].append(piece)
        assert bytes(digest) == xxhash.xxh3_128_digest(piece)
    assert got == expected and pictures["image_index"][pictures["document"] == 1].tolist() == list(range(12))


def test_no_picture_is_in_two_splits_and_groups_stay_whole(tmp_path, write_bson, write_taxonomy_csv):
    rng = np.random.default_rng(0)
    # 400 products; each shows 1-3 pictures, a quarter of them from a shared pool of 300 (chains of groups form).
    train = [
        [int(k) if rng.random() < 0.25 else 1000 + 4 * i + j for j, k in enumerate(rng.integers(0, 300, 1 + i % 3))]
        for i in range(400)
    ]
    write_data(tmp_path / "data", write_bson, write_taxonomy_csv, train, [])
    report = run(tmp_path / "data", tmp_path / "work", val_fraction=0.2, holdout_fraction=0.2, seed=3)
    pictures = dedupe.load_pictures(tmp_path / "work", "train").to_pylist()
    split = splits_of(tmp_path / "work")
    sides: dict[bytes, set[str]] = {}
    for row in pictures:
        sides.setdefault(row["hash"], set()).add(split[row["product_id"]])
    assert all(len(s) == 1 for s in sides.values())
    assert report["duplicates"]["train"]["hashes_in_two_splits"] == 0
    counts = {name: sum(s == name for s in split.values()) for name in ("train", "val", "holdout")}
    assert counts["val"] > 0 and counts["holdout"] > 0 and counts["train"] > counts["val"]
    catalog = load_catalog(tmp_path / "work", "train").to_pylist()
    groups = {}
    for row in catalog:
        groups.setdefault(row["group"], set()).add(row["split"])
    assert all(len(s) == 1 for s in groups.values())
    assert brute_force_groups(train) == [row["group"] for row in catalog]


def brute_force_groups(train: list[list[int]]) -> list[int]:
    """Connected components by repeated merging: the smallest product index of each component."""
    group = list(range(len(train)))
    changed = True
    while changed:
        changed = False
        for a in range(len(train)):
            for b in range(a + 1, len(train)):
                if group[a] != group[b] and set(train[a]) & set(train[b]):
                    low = min(group[a], group[b])
                    old = {group[a], group[b]}
                    group = [low if g in old else g for g in group]
                    changed = True
    return group


def test_taxonomy_counts_come_from_the_train_split_only(tmp_path, write_bson, write_taxonomy_csv):
    train = [[i] for i in range(60)]
    write_data(tmp_path / "data", write_bson, write_taxonomy_csv, train, [])
    run(tmp_path / "data", tmp_path / "work", val_fraction=0.3, holdout_fraction=0.3, seed=1)
    taxonomy = Taxonomy.load(WorkPaths(tmp_path / "work").taxonomy)
    catalog = load_catalog(tmp_path / "work", "train", "train")
    ids, counts = np.unique(catalog["category_id"].to_numpy(), return_counts=True)
    expected = dict(zip(ids.tolist(), counts.tolist()))
    assert {int(c): int(n) for c, n in zip(taxonomy.category_ids, taxonomy.train_counts) if n} == expected
    assert sum(expected.values()) < 60 and taxonomy.num_classes == 6  # every leaf of the CSV keeps a label


def test_real_example_ingests_with_a_picture_table(shared_data_dir, tmp_path):
    example = shared_data_dir / "train_example.bson"
    if not example.is_file():
        pytest.skip(f"{example} not found")
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(example, data / "train.bson")
    shutil.copy(shared_data_dir / "category_names.csv", data / "category_names.csv")
    report = run(data, tmp_path / "work")
    table = dedupe.load_pictures(tmp_path / "work", "train")
    assert report["files"]["train"]["products"] == 82 and table.num_rows == report["files"]["train"]["images"]
    raw = (data / "train.bson").read_bytes()
    with open(data / "train.bson", "rb") as handle:
        expected = [image["picture"] for doc in bson.decode_file_iter(handle) for image in doc["imgs"]]
    assert [raw[o : o + n] for o, n in zip(table["offset"].to_pylist(), table["length"].to_pylist())] == expected
    assert report["duplicates"]["train"]["pictures"] == len(expected)


SMALL_DEMO = DemoConfig(products=300, test_products=30, categories=10, image_size=32, jpeg_quality=60)


# -- demo generator -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """A small demo set at the default duplicate settings, ingested."""
    root = tmp_path_factory.mktemp("demo_dupes")
    summary = generate_demo(root / "data", SMALL_DEMO)
    return root, summary, run(root / "data", root / "work", val_fraction=0.12, holdout_fraction=0.12)


def test_demo_duplicate_share_is_like_cdiscount(demo):
    _, summary, report = demo
    share = report["duplicates"]["train"]["duplicate_share"]
    assert 0.30 <= share <= 0.45 and summary["train_duplicate_share"] == pytest.approx(share, abs=1e-4)
    assert report["duplicates"]["train"]["hashes_in_two_splits"] == 0
    assert report["duplicates"]["test"]["pictures_seen_in_train"] > 0  # test products share stock photos too


def test_demo_has_placeholders_and_sibling_stock_photos(demo):
    root, _, _ = demo
    pictures = dedupe.load_pictures(root / "work", "train").to_pylist()
    catalog = {row["product_id"]: row for row in load_catalog(root / "work", "train").to_pylist()}
    leaves: dict[bytes, set[tuple[int, int]]] = {}
    for row in pictures:
        product = catalog[row["product_id"]]
        leaves.setdefault(row["hash"], set()).add((product["level2"], product["label"]))
    assert max(len({level2 for level2, _ in s}) for s in leaves.values()) >= 3  # placeholders: across level 2s
    siblings = [s for s in leaves.values() if len(s) >= 2 and len({level2 for level2, _ in s}) == 1]
    assert siblings, "expected stock photos shared by two leaves of one level-2 group"


def test_demo_duplicates_are_deterministic(demo, tmp_path):
    root, _, _ = demo
    generate_demo(tmp_path, SMALL_DEMO)
    assert (tmp_path / "train.bson").read_bytes() == (root / "data" / "train.bson").read_bytes()


def test_explore_shows_the_most_reused_pictures(demo):
    from prodcat.report.explore import explore

    root, _, report = demo
    summary = explore(root / "work")
    duplicates = summary["duplicates"]
    assert duplicates["duplicate_share"] == report["duplicates"]["train"]["duplicate_share"]
    out = WorkPaths(root / "work").report("explore")
    page = (out / "index.html").read_text(encoding="utf-8")
    for entry in duplicates["most_reused"]:
        assert entry["thumbnail"] and (out / entry["thumbnail"]).is_file() and entry["thumbnail"] in page
    assert "Duplicate pictures" in page
    assert json.loads((out / "summary.json").read_text())["duplicates"]["groups"] == duplicates["groups"]
    assert pq.read_schema(dedupe.pictures_path(root / "work")).equals(dedupe.PICTURES_SCHEMA)
