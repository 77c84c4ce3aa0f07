"""Demo data generator: Kaggle's file formats exactly, realistic taxonomy and long tail, determinism."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections import Counter
from pathlib import Path

import bson
import numpy as np
import pytest
from PIL import Image

from prodcat.config import ConfigError, DemoConfig
from prodcat.data.synthetic.demo import (
    category_counts,
    generate_demo,
    make_looks,
    make_taxonomy,
    render_product,
    taxonomy_shape,
)

FILES = ("category_names.csv", "train.bson", "test.bson", "sample_submission.csv")
TINY = DemoConfig(products=40, test_products=10, categories=8, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, generate_demo(out, TINY)


def raw_documents(path: Path) -> list[bytes]:
    data = path.read_bytes()
    documents, offset = [], 0
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 4], "little")
        documents.append(data[offset : offset + length])
        offset += length
    return documents


def read_csv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle))


def test_writes_kaggle_files_and_summary(tiny):
    out, summary = tiny
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # no temp files left behind
    assert summary["train_products"] == 40 and summary["test_products"] == 10 and summary["categories"] == 8
    assert summary["level1"] >= 2 and summary["level1"] <= summary["level2"] <= 8
    assert summary["train_images"] >= 40 and summary["test_images"] >= 10


def test_train_bson_field_order_and_types(tiny):
    out, summary = tiny
    raws = raw_documents(out / "train.bson")
    docs = list(bson.decode_file_iter(open(out / "train.bson", "rb")))
    assert len(docs) == len(raws) == 40
    assert sum(len(doc["imgs"]) for doc in docs) == summary["train_images"]
    for raw, doc in zip(raws, docs):
        assert list(doc) == ["_id", "imgs", "category_id"]
        assert raw[4:9] == b"\x10_id\x00"  # first element, int32
        assert b"\x10category_id\x00" in raw  # int32, not int64 (type 0x12)
        assert type(doc["_id"]) is int and type(doc["category_id"]) is int  # pymongo decodes int64 as Int64
        assert 1 <= len(doc["imgs"]) <= 4
        assert raw.count(b"\x05picture\x00") == len(doc["imgs"])  # binary elements
        for image in doc["imgs"]:
            assert list(image) == ["picture"] and type(image["picture"]) is bytes  # binary subtype 0
    ids = [doc["_id"] for doc in docs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_pictures_are_180px_rgb_jpegs(tiny):
    out, _ = tiny
    for doc in bson.decode_file_iter(open(out / "train.bson", "rb")):
        for image in doc["imgs"]:
            picture = Image.open(io.BytesIO(image["picture"]))
            assert (picture.format, picture.mode, picture.size) == ("JPEG", "RGB", (180, 180))


def test_test_bson_has_no_labels_and_its_own_ids(tiny):
    out, summary = tiny
    train_ids = {doc["_id"] for doc in bson.decode_file_iter(open(out / "train.bson", "rb"))}
    docs = list(bson.decode_file_iter(open(out / "test.bson", "rb")))
    assert len(docs) == 10 and sum(len(doc["imgs"]) for doc in docs) == summary["test_images"]
    for doc in docs:
        assert list(doc) == ["_id", "imgs"] and type(doc["_id"]) is int
    assert not train_ids & {doc["_id"] for doc in docs}


def test_category_csv_matches_train(tiny):
    out, _ = tiny
    rows = read_csv(out / "category_names.csv")
    assert rows[0] == ["category_id", "category_level1", "category_level2", "category_level3"]
    ids = [int(row[0]) for row in rows[1:]]
    assert len(ids) == 8 == len(set(ids))
    assert all(1_000_000_000 <= i < 2**31 for i in ids)  # 10 digits, still int32
    train = Counter(doc["category_id"] for doc in bson.decode_file_iter(open(out / "train.bson", "rb")))
    assert set(train) == set(ids)  # every leaf has train products, and no unknown ids
    assert (out / "category_names.csv").read_bytes().decode("utf-8")  # UTF-8


def test_sample_submission_lists_test_ids_with_the_top_category(tiny):
    out, _ = tiny
    rows = read_csv(out / "sample_submission.csv")
    test_ids = [doc["_id"] for doc in bson.decode_file_iter(open(out / "test.bson", "rb"))]
    train = Counter(doc["category_id"] for doc in bson.decode_file_iter(open(out / "train.bson", "rb")))
    assert rows[0] == ["_id", "category_id"]
    assert [int(row[0]) for row in rows[1:]] == test_ids
    assert {int(row[1]) for row in rows[1:]} == {train.most_common(1)[0][0]}


def test_views_of_one_product_differ(tiny):
    out, _ = tiny
    multi = [doc for doc in bson.decode_file_iter(open(out / "train.bson", "rb")) if len(doc["imgs"]) >= 2]
    assert multi, "expected some products with several pictures"
    for doc in multi:
        arrays = [np.asarray(Image.open(io.BytesIO(image["picture"])), dtype=np.int16) for image in doc["imgs"]]
        assert all(np.abs(arrays[0] - other).mean() > 3 for other in arrays[1:])


def test_every_shape_family_renders_small_and_large():
    look = make_looks(make_taxonomy(4, seed=0), seed=0)[0]
    for template in range(14):
        for size in (32, 96):
            rng = np.random.default_rng(template)
            (jpeg,) = render_product(dataclasses.replace(look, template=template), rng, 1, size=size, quality=80)
            picture = Image.open(io.BytesIO(jpeg))
            assert picture.size == (size, size) and np.asarray(picture).std() > 1  # not a blank picture


def test_same_config_gives_identical_bytes_and_other_seed_differs(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    generate_demo(again, TINY)
    for name in FILES:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    other = tmp_path / "other"
    generate_demo(other, DemoConfig(products=40, test_products=10, categories=8, seed=4))
    assert (other / "train.bson").read_bytes() != (out / "train.bson").read_bytes()
    assert (other / "category_names.csv").read_bytes() != (out / "category_names.csv").read_bytes()


def test_pool_mode_reuses_pictures(tmp_path):
    config = DemoConfig(products=60, test_products=5, categories=4, seed=1, unique_images_per_leaf=4)
    summary = generate_demo(tmp_path, config)
    per_leaf: dict[int, set[bytes]] = {}
    for doc in bson.decode_file_iter(open(tmp_path / "train.bson", "rb")):
        per_leaf.setdefault(doc["category_id"], set()).update(image["picture"] for image in doc["imgs"])
    assert len(per_leaf) == 4 and all(len(pictures) <= 4 for pictures in per_leaf.values())
    assert summary["unique_pictures"] <= 16 and summary["train_images"] > 16


def test_long_tail_shape():
    counts = category_counts(60, 3000, seed=0)
    assert counts.sum() == 3000 and counts.min() >= 1
    assert counts.max() >= 10 * np.median(counts)  # a few huge leaves
    assert (counts >= 2).mean() >= 0.7  # with the defaults most leaves get >= 2
    full = category_counts(5270, 100_000, seed=0)
    assert full.sum() == 100_000 and full.min() >= 1 and full.max() >= 50 * np.median(full)
    flat = category_counts(50, 1000, seed=0, tail_power=0.0)
    assert flat.max() - flat.min() <= 1
    assert category_counts(8, 8).tolist() == [1] * 8


def test_taxonomy_shape_scales_like_the_real_one():
    level1, level2 = taxonomy_shape(5270)
    assert 45 <= level1 <= 53 and 440 <= level2 <= 530
    level1, level2 = taxonomy_shape(60)
    assert 5 <= level1 <= 8 and 15 <= level2 <= 25
    assert taxonomy_shape(2) == (2, 2)


@pytest.mark.parametrize("categories", [2, 60, 600])
def test_taxonomy_rows(categories):
    rows = make_taxonomy(categories, seed=0)
    assert len(rows) == categories and rows == sorted(rows, key=lambda r: (r.level1, r.level2, r.level3))
    assert len({row.category_id for row in rows}) == categories
    assert len({row.level1 for row in rows}) >= 2
    leaves = Counter((row.level1, row.level2, row.level3.strip()) for row in rows)
    assert max(leaves.values()) == 1  # leaf names unique within their level-2, even stripped
    assert all(name == name.upper() for row in rows for name in row[1:])
    assert make_taxonomy(categories, seed=0) == rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_level2_names_recur_under_several_level1(seed):
    rows = make_taxonomy(600, seed=seed)
    parents: dict[str, set[str]] = {}
    for row in rows:
        parents.setdefault(row.level2, set()).add(row.level1)
    assert any(len(level1s) >= 2 for level1s in parents.values())


def test_full_size_taxonomy_has_french_accents():
    rows = make_taxonomy(5270, seed=0)
    text = "".join(name for row in rows for name in row[1:])
    assert any(ch in text for ch in "ÉÈŒ")
    assert 40 <= len({row.level1 for row in rows}) <= 60


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"products": 5, "categories": 10}, "every leaf"),
        ({"categories": 1}, "categories"),
        ({"seed": -1}, "seed"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
        ({"image_size": 16}, "image_size"),
        ({"unique_images_per_leaf": 2}, "unique_images_per_leaf"),
        ({"tail_power": -1.0}, "tail_power"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DemoConfig(**kwargs)
