"""`prodcat explore`: every output exists, every number matches a brute-force count, names survive into HTML."""

from __future__ import annotations

import html
import json
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prodcat.config import IngestConfig
from prodcat.data.catalog import TEST_COLUMNS, TRAIN_COLUMNS, ingest
from prodcat.data.taxonomy import Taxonomy, read_category_csv
from prodcat.paths import WorkPaths
from prodcat.report.explore import COVERAGE_SHARES, FIGURES, explore

REAL_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cdiscount"
FULL_PRODUCTS = 7_069_896
# Kaggle's train.bson: products having 1, 2, 3 and 4 images (12,371,293 images in all).
FULL_IMAGES_PER_PRODUCT = {1: 4_369_441, 2: 1_128_588, 3: 542_792, 4: 1_029_075}

TRICKY_ROWS = [
    (1000000001, "JARDIN & <PISCINE>", "ABRI", "ABRI DE JARDIN"),
    (1000000002, "JARDIN & <PISCINE>", "ABRI", "CARTE PRÉPAYÉE "),
    (1000000003, "JARDIN & <PISCINE>", "OUTIL", "GROS ŒUVRE (MURET - PILIER)"),
    (1000000004, "SPORT – ÉTÉ", "CYCLES", 'VELO ENFANT (10" - 12")'),
    (1000000005, "SPORT – ÉTÉ", "CYCLES", "CASQUE"),
    (1000000006, "SPORT – ÉTÉ", "ABRI", "ABRI DE JARDIN"),  # same level-2 and level-3 names under another level 1
    (1000000007, "LIBRAIRIE", "LIVRE", "ROMAN"),
    (1000000008, "LIBRAIRIE", "LIVRE", "BD"),
    (1000000009, "LIBRAIRIE", "PAPETERIE", "CAHIER"),
    (1000000010, "VIDE", "RIEN", "JAMAIS VENDU"),  # in the taxonomy, no product: empty at every level
]


# -- building work directories ----------------------------------------------------------------------------------
def write_workdir(
    root: Path,
    rows: list,
    category_ids: np.ndarray,
    num_images: np.ndarray,
    is_val: np.ndarray,
    test_num_images: np.ndarray | None = None,
) -> Taxonomy:
    """Taxonomy + catalogs with exactly ingest's schema, label order and metadata."""
    values, counts = np.unique(category_ids, return_counts=True)
    taxonomy = Taxonomy.from_rows(rows, dict(zip(values.tolist(), counts.tolist(), strict=True)))
    paths = WorkPaths(root)
    taxonomy.save(paths.taxonomy)
    labels = taxonomy.labels_of(category_ids)
    assert (labels >= 0).all()
    write_train_catalog(paths, taxonomy, labels.astype(np.int32), num_images, is_val)
    if test_num_images is not None:
        n = len(test_num_images)
        table = pa.table(
            {
                "product_id": pa.array(np.arange(n, dtype=np.int64)),
                "offset": pa.array(np.arange(n, dtype=np.int64) * 100),
                "length": pa.array(np.full(n, 100, dtype=np.int32)),
                "num_images": pa.array(np.asarray(test_num_images, dtype=np.int8)),
            }
        )
        assert tuple(table.column_names) == TEST_COLUMNS
        pq.write_table(table, paths.catalog_table("test"))
    return taxonomy


def write_train_catalog(
    paths: WorkPaths, taxonomy: Taxonomy, labels: np.ndarray, num_images: np.ndarray, is_val: np.ndarray
) -> None:
    n = len(labels)
    table = pa.table(
        {
            "product_id": pa.array(np.arange(n, dtype=np.int64)),
            "offset": pa.array(np.arange(n, dtype=np.int64) * 100),
            "length": pa.array(np.full(n, 100, dtype=np.int32)),
            "num_images": pa.array(np.asarray(num_images, dtype=np.int8)),
            "category_id": pa.array(taxonomy.category_ids[labels]),
            "label": pa.array(np.asarray(labels, dtype=np.int32)),
            "level1": pa.array(taxonomy.leaf_level1[labels]),
            "level2": pa.array(taxonomy.leaf_level2[labels]),
            "split": pa.array(np.where(is_val, "val", "train")).dictionary_encode(),
            "group": pa.array(np.arange(n, dtype=np.int64)),
        }
    ).replace_schema_metadata({b"prodcat.source": b"synthetic"})
    assert tuple(table.column_names) == TRAIN_COLUMNS
    paths.catalog.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, paths.catalog_table("train"))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 600-product catalog over TRICKY_ROWS (one category empty), a test catalog, and explore's summary."""
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(3)
    weights = np.array([40, 3, 12, 25, 1, 8, 60, 5, 2, 0], dtype=np.float64)
    ids = np.array([row[0] for row in TRICKY_ROWS])
    category_ids = rng.choice(ids, size=600, p=weights / weights.sum())
    num_images = rng.choice([1, 2, 3, 4], size=600, p=[0.6, 0.2, 0.1, 0.1])
    is_val = rng.random(600) < 0.15
    test_num_images = rng.choice([0, 1, 2, 3, 4], size=90)
    write_workdir(root, TRICKY_ROWS, category_ids, num_images, is_val, test_num_images)
    summary = explore(root, top_k=3)
    return {
        "root": root,
        "summary": summary,
        "category_ids": category_ids,
        "num_images": num_images,
        "is_val": is_val,
        "test_num_images": test_num_images,
    }


# -- brute-force references -------------------------------------------------------------------------------------
def brute_coverage(counts: list[int], share: float) -> int:
    """Fewest largest leaves holding at least `share` of the products (exact fractions)."""
    ordered = sorted((c for c in counts if c > 0), reverse=True)
    target, running = Fraction(str(share)) * sum(ordered), 0
    for n, count in enumerate(ordered, start=1):
        running += count
        if running >= target:
            return n
    raise AssertionError("unreachable")


def check_ranked(entries: list[dict], rows: list, products: Counter, images: Counter, top_k: int) -> None:
    names = {row[0]: row[1:] for row in rows}
    present = [cid for cid in names if products[cid] > 0]
    largest = sorted(present, key=lambda cid: (-products[cid], cid))[:top_k]
    assert [entry["category_id"] for entry in entries["largest"]] == largest
    smallest = sorted(present, key=lambda cid: (products[cid], cid))[:top_k]
    assert [entry["category_id"] for entry in entries["smallest"]] == smallest
    for entry in entries["largest"] + entries["smallest"]:
        cid = entry["category_id"]
        assert (entry["level1"], entry["level2"], entry["level3"]) == names[cid]
        assert entry["products"] == products[cid] and entry["images"] == images[cid]


# -- tests on the small catalog ---------------------------------------------------------------------------------
def test_every_output_exists_and_pngs_are_real_images(small: dict) -> None:
    out = WorkPaths(small["root"]).report("explore")
    for name in ("summary.json", "index.html", "config.json", *FIGURES.values()):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in FIGURES.values():
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            assert image.width >= 400 and image.height >= 300, (name, image.size)
            low, high = image.convert("L").getextrema()
            assert high - low > 100, f"{name} looks blank"
    assert json.loads((out / "summary.json").read_text(encoding="utf-8")) == json.loads(json.dumps(small["summary"]))
    assert json.loads((out / "config.json").read_text())["top_k"] == 3
    assert not list(out.glob("*.tmp")), "atomic writes left temporary files"


def test_totals_and_splits_match_brute_force(small: dict) -> None:
    summary, num_images, is_val = small["summary"], small["num_images"], small["is_val"]
    test_images = small["test_num_images"]
    assert summary["splits"]["train"] == {"products": int((~is_val).sum()), "images": int(num_images[~is_val].sum())}
    assert summary["splits"]["val"] == {"products": int(is_val.sum()), "images": int(num_images[is_val].sum())}
    assert summary["splits"]["test"] == {"products": len(test_images), "images": int(test_images.sum())}
    assert summary["products"] == 600 + len(test_images)
    assert summary["images"] == int(num_images.sum()) + int(test_images.sum())
    assert summary["labelled"] == {"products": 600, "images": int(num_images.sum())}


def test_categories_per_level_match_brute_force(small: dict) -> None:
    categories, ids, is_val = small["summary"]["categories"], small["category_ids"], small["is_val"]
    by_id = {row[0]: row for row in TRICKY_ROWS}
    views = {
        "level1": lambda r: r[1],
        "level2": lambda r: (r[1], r[2]),
        "level2_names": lambda r: r[2],
        "level3": lambda r: r[0],
        "level3_names": lambda r: r[3],
    }
    for view, key in views.items():
        every = {key(row) for row in TRICKY_ROWS}
        present = {key(by_id[cid]) for cid in ids.tolist()}
        in_val = {key(by_id[cid]) for cid in ids[is_val].tolist()}
        in_train = {key(by_id[cid]) for cid in ids[~is_val].tolist()}
        assert categories[view] == {
            "taxonomy": len(every),
            "present": len(present),
            "present_train": len(in_train),
            "present_val": len(in_val),
            "present_holdout": 0,
            "empty": len(every - present),
        }, view
    assert categories["level1"]["taxonomy"] == 4 and categories["level1"]["empty"] == 1


def test_largest_and_smallest_categories(small: dict) -> None:
    products = Counter(small["category_ids"].tolist())
    images: Counter = Counter()
    for cid, n in zip(small["category_ids"].tolist(), small["num_images"].tolist(), strict=True):
        images[cid] += n
    summary = small["summary"]
    assert len(summary["largest"]) == len(summary["smallest"]) == 3
    check_ranked(summary, TRICKY_ROWS, products, images, 3)
    assert all(entry["products"] > 0 for entry in summary["smallest"]), "empty categories are not 'smallest'"
    assert [entry["rank"] for entry in summary["largest"]] == [1, 2, 3]
    assert summary["largest"][0]["share"] == pytest.approx(max(products.values()) / 600)


def test_images_per_product_and_coverage(small: dict) -> None:
    summary, num_images, is_val = small["summary"], small["num_images"], small["is_val"]
    labelled = summary["images_per_product"]["labelled"]
    expected = Counter(num_images.tolist())
    assert labelled["products"] == {str(k): expected[k] for k in range(1, 5)}
    assert labelled["shares"]["1"] == pytest.approx(expected[1] / 600)
    assert labelled["mean"] == pytest.approx(num_images.mean())
    assert summary["images_per_product"]["val"]["products"]["2"] == int((num_images[is_val] == 2).sum())
    test_expected = Counter(small["test_num_images"].tolist())
    assert summary["images_per_product"]["test"]["products"] == {str(k): test_expected[k] for k in range(5)}
    counts = list(Counter(small["category_ids"].tolist()).values())
    cover = summary["coverage"]
    for share in COVERAGE_SHARES:
        assert cover["leaves_for_share"][f"{share:g}"] == brute_coverage(counts, share), share
    assert cover["top_leaves_share"]["1"] == pytest.approx(max(counts) / 600)
    assert cover["top_leaves_share"]["1000"] == pytest.approx(1.0)
    assert cover["majority_baseline_accuracy"] == pytest.approx(max(counts) / 600)
    assert cover["imbalance_ratio"] == pytest.approx(max(counts) / min(counts))
    assert 0.0 < cover["gini"] < 1.0 and cover["zipf_exponent"] > 0


def test_level1_table(small: dict) -> None:
    by_id = {row[0]: row[1] for row in TRICKY_ROWS}
    expected = Counter(by_id[cid] for cid in small["category_ids"].tolist())
    rows = small["summary"]["level1"]
    assert {row["level1"]: row["products"] for row in rows} == {
        name: expected[name] for name in {r[1] for r in TRICKY_ROWS}
    }
    assert [row["products"] for row in rows] == sorted((row["products"] for row in rows), reverse=True)
    jardin = next(row for row in rows if row["level1"] == "JARDIN & <PISCINE>")
    assert (jardin["leaves"], jardin["leaves_present"]) == (3, 3)


def test_html_has_numbers_and_escaped_utf8_names(small: dict) -> None:
    page = (WorkPaths(small["root"]).report("explore") / "index.html").read_text(encoding="utf-8")
    summary = small["summary"]
    assert '<meta charset="utf-8">' in page
    for number in (summary["products"], summary["images"], summary["splits"]["train"]["products"]):
        assert f"{number:,}" in page
    assert "JARDIN &amp; &lt;PISCINE&gt;" in page and "<PISCINE>" not in page
    for entry in summary["largest"] + summary["smallest"]:
        assert html.escape(entry["level3"]) in page
    assert "SPORT – ÉTÉ" in page and "PRÉPAYÉE" in page  # raw UTF-8, not entities or mojibake
    for name in FIGURES.values():
        assert f'src="{name}"' in page


def test_rerun_is_deterministic(small: dict, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(small["root"], tmp_path / "work")  # the fixture's own outputs stay untouched
    again = explore(tmp_path / "work", top_k=3)
    for key in ("products", "images", "categories", "largest", "smallest", "coverage", "level1"):
        assert again[key] == small["summary"][key], key


# -- through ingest ---------------------------------------------------------------------------------------------
def write_bson_data(data_dir: Path, rows: list, train: list[tuple[int, int, int]], test: list[tuple[int, int]]) -> None:
    import bson

    data_dir.mkdir(parents=True, exist_ok=True)
    lines = ["category_id,category_level1,category_level2,category_level3"]
    lines += [",".join([str(r[0])] + ['"' + n.replace('"', '""') + '"' for n in r[1:]]) for r in rows]
    (data_dir / "category_names.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    picture = b"\xff\xd8\xff\xe0not-decoded-by-ingest\xff\xd9"
    with open(data_dir / "train.bson", "wb") as handle:
        for product_id, category_id, images in train:
            handle.write(
                bson.encode({"_id": product_id, "imgs": [{"picture": picture}] * images, "category_id": category_id})
            )
    with open(data_dir / "test.bson", "wb") as handle:
        for product_id, images in test:
            handle.write(bson.encode({"_id": product_id, "imgs": [{"picture": picture}] * images}))


def test_runs_on_an_ingested_bson(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = [row[0] for row in TRICKY_ROWS[:9]]
    train = [(i, int(rng.choice(ids)), int(rng.integers(1, 5))) for i in range(120)]
    test = [(1000 + i, int(rng.integers(1, 5))) for i in range(15)]
    write_bson_data(tmp_path / "data", TRICKY_ROWS, train, test)
    report = ingest(IngestConfig(data_dir=str(tmp_path / "data"), workdir=str(tmp_path / "work"), val_fraction=0.2))
    summary = explore(tmp_path / "work")
    assert summary["products"] == 135 and summary["images"] == sum(t[2] for t in train) + sum(t[1] for t in test)
    assert summary["splits"]["val"]["products"] == report["files"]["train"]["val_products"]
    assert summary["splits"]["test"] == {"products": 15, "images": sum(t[1] for t in test)}
    products, images = Counter(t[1] for t in train), Counter()
    for _, cid, n in train:
        images[cid] += n
    check_ranked(summary, TRICKY_ROWS, products, images, 5)
    assert summary["categories"]["level3"]["present"] == len(products)
    # Every product shows the same picture: one group of all 120, kept in train whole, the picture on top.
    duplicates, pictures = summary["duplicates"], sum(t[2] for t in train)
    assert duplicates["distinct_pictures"] == 1 and duplicates["duplicate_share"] == pytest.approx(1 - 1 / pictures)
    assert duplicates["groups"] == 1 and duplicates["largest_group"] == 120
    assert duplicates["group_sizes"]["100-999"] == 1
    assert duplicates["most_reused"][0]["copies"] == pictures and duplicates["most_reused"][0]["products"] == 120
    assert duplicates["most_reused"][0]["thumbnail"] is None  # not a real JPEG: listed, not drawn
    assert duplicates["test_pictures_seen_in_train"] == duplicates["test_pictures"] == sum(t[1] for t in test)
    assert summary["splits"]["train"]["products"] == 120
    assert report["duplicates"]["train"]["duplicate_share"] == duplicates["duplicate_share"]


def test_holdout_is_a_split_of_its_own(tmp_path: Path) -> None:
    ids = np.array([row[0] for row in TRICKY_ROWS[:3]] * 4)
    taxonomy = write_workdir(tmp_path, TRICKY_ROWS, ids, np.full(12, 2), np.zeros(12, dtype=bool))
    table = pq.read_table(WorkPaths(tmp_path).catalog_table("train"))
    splits = ["train"] * 6 + ["val"] * 2 + ["holdout"] * 4
    table = table.set_column(8, "split", pa.array(splits).dictionary_encode())
    pq.write_table(table, WorkPaths(tmp_path).catalog_table("train"))
    summary = explore(tmp_path)
    assert {name: part["products"] for name, part in summary["splits"].items()} == {"train": 6, "val": 2, "holdout": 4}
    assert summary["splits"]["holdout"]["images"] == 8 and summary["labelled"]["products"] == 12
    assert summary["categories"]["level3"]["present_holdout"] == len(set(ids[8:].tolist()))
    assert taxonomy.num_classes == len(TRICKY_ROWS) and summary["duplicates"] is None  # no pictures.parquet here
    assert "re-run ingest" in (WorkPaths(tmp_path).report("explore") / "index.html").read_text(encoding="utf-8")


def real_data(*names: str) -> Path:
    missing = [name for name in names if not (REAL_DATA / name).is_file()]
    if missing:
        pytest.skip(f"real Cdiscount files absent: {', '.join(missing)} not in {REAL_DATA.resolve()}")
    return REAL_DATA


def test_real_train_example(tmp_path: Path) -> None:
    import bson

    source = real_data("train_example.bson", "category_names.csv")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # Links, not copies: the real files stay in ../shared.
    (data_dir / "train.bson").symlink_to((source / "train_example.bson").resolve())
    (data_dir / "category_names.csv").symlink_to((source / "category_names.csv").resolve())
    ingest(IngestConfig(data_dir=str(data_dir), workdir=str(tmp_path / "work")))
    summary = explore(tmp_path / "work")
    documents = bson.decode_all((source / "train_example.bson").read_bytes())
    products = Counter(doc["category_id"] for doc in documents)
    images: Counter = Counter()
    for doc in documents:
        images[doc["category_id"]] += len(doc["imgs"])
    assert summary["products"] == len(documents) == 82
    assert summary["images"] == sum(images.values()) == 110
    assert summary["categories"]["level3"] == {
        **summary["categories"]["level3"],
        "present": len(products),
        "taxonomy": 5270,
        "empty": 5270 - len(products),
    }
    check_ranked(summary, read_category_csv(source / "category_names.csv"), products, images, 5)
    per_product = Counter(len(doc["imgs"]) for doc in documents)
    assert summary["images_per_product"]["labelled"]["products"] == {str(k): per_product[k] for k in range(1, 5)}


def test_real_category_names_in_html(tmp_path: Path) -> None:
    source = real_data("category_names.csv")
    rows = read_category_csv(source / "category_names.csv")
    tricky = [row for row in rows if '"' in row[3] or "Œ" in row[3] or row[3] != row[3].strip()][:4]
    assert tricky, "expected quotes, ligatures or trailing spaces in the real names"
    plain = [row for row in rows if row not in tricky][:6]
    ids = np.repeat([row[0] for row in tricky + plain], [50, 40, 30, 20, 9, 8, 7, 6, 5, 4][: len(tricky + plain)])
    write_workdir(tmp_path, rows, ids, np.ones(len(ids), dtype=np.int8), np.zeros(len(ids), dtype=bool))
    summary = explore(tmp_path, top_k=4)
    assert summary["categories"]["level1"]["taxonomy"] == 49
    assert summary["categories"]["level2"]["taxonomy"] == 486
    assert summary["categories"]["level2_names"]["taxonomy"] == 483
    assert summary["categories"]["level3"]["taxonomy"] == 5270
    assert summary["categories"]["level3_names"]["taxonomy"] == 5263
    assert [entry["category_id"] for entry in summary["largest"]] == [row[0] for row in tricky[:4]]
    assert [entry["level3"] for entry in summary["largest"]] == [row[3] for row in tricky[:4]]  # spaces kept
    page = (tmp_path / "reports" / "explore" / "index.html").read_text(encoding="utf-8")
    for row in tricky:
        assert html.escape(row[3].strip()) in page
    quoted = next((row[3] for row in tricky if '"' in row[3]), None)
    if quoted is not None:
        assert quoted not in page


# -- errors -----------------------------------------------------------------------------------------------------
def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="taxonomy"):
        explore(tmp_path)
    with pytest.raises(ValueError, match="top_k"):
        explore(tmp_path, top_k=0)
    taxonomy = write_workdir(
        tmp_path, TRICKY_ROWS, np.array([1000000001, 1000000004]), np.array([1, 2]), np.array([False, True])
    )
    paths = WorkPaths(tmp_path)
    write_train_catalog(paths, taxonomy, np.array([0, 1]), np.array([1, 1]), np.array([False, False]))
    table = pq.read_table(paths.catalog_table("train"))
    table = table.set_column(5, "label", pa.array(np.array([0, 99], dtype=np.int32)))
    pq.write_table(table, paths.catalog_table("train"))
    with pytest.raises(ValueError, match=r"train\.parquet: row 1: field 'label' is 99"):
        explore(tmp_path)
    write_train_catalog(paths, taxonomy, np.array([0, 1]), np.array([1, -1]), np.array([False, False]))
    with pytest.raises(ValueError, match="field 'num_images'"):
        explore(tmp_path)
    paths.catalog_table("train").unlink()
    with pytest.raises(FileNotFoundError, match="no catalog"):
        explore(tmp_path)


def test_unknown_split_value(tmp_path: Path) -> None:
    taxonomy = write_workdir(tmp_path, TRICKY_ROWS, np.array([1000000001]), np.array([1]), np.array([False]))
    table = pq.read_table(WorkPaths(tmp_path).catalog_table("train"))
    table = table.set_column(8, "split", pa.array(["validation"]).dictionary_encode())
    pq.write_table(table, WorkPaths(tmp_path).catalog_table("train"))
    assert taxonomy.num_classes == len(TRICKY_ROWS)
    with pytest.raises(ValueError, match="'split'.*validation"):
        explore(tmp_path)


# -- full scale ---------------------------------------------------------------------------------------------------
def synthetic_taxonomy_rows(leaves: int = 5270, level1: int = 49, level2: int = 486) -> list:
    """Cdiscount-sized taxonomy: each level-2 group under one level-1, leaves spread over the groups."""
    return [
        (
            1_000_000_000 + i,
            f"NIVEAU-1 N°{(i % level2) % level1:02d} É",
            f"NIVEAU-2 {i % level2:03d}",
            f"FEUILLE {i:04d}",
        )
        for i in range(leaves)
    ]


def test_full_scale_catalog(tmp_path: Path) -> None:
    """7,069,896 products (no images): explore counts them exactly; vectorised, so this takes seconds."""
    rows = synthetic_taxonomy_rows()
    ranks = np.arange(1, len(rows) + 1, dtype=np.float64)
    raw = 1.0 / ranks**1.1
    counts = np.floor(raw / raw.sum() * (FULL_PRODUCTS - len(rows))).astype(np.int64) + 1
    counts[0] += FULL_PRODUCTS - counts.sum()
    # Shuffle which category gets which count, so label order (by count) differs from the CSV order.
    category_ids = np.random.default_rng(0).permutation(np.array([row[0] for row in rows]))
    taxonomy = Taxonomy.from_rows(rows, dict(zip(category_ids.tolist(), counts.tolist(), strict=True)))
    labels = np.repeat(np.arange(taxonomy.num_classes, dtype=np.int32), taxonomy.train_counts)
    num_images = np.repeat(
        np.array(list(FULL_IMAGES_PER_PRODUCT), dtype=np.int8), list(FULL_IMAGES_PER_PRODUCT.values())
    )
    is_val = np.zeros(FULL_PRODUCTS, dtype=bool)
    is_val[::20] = True
    paths = WorkPaths(tmp_path)
    taxonomy.save(paths.taxonomy)
    write_train_catalog(paths, taxonomy, labels, num_images, is_val)
    del labels, num_images
    summary = explore(tmp_path)
    assert summary["products"] == FULL_PRODUCTS and summary["images"] == 12_371_293
    assert summary["splits"]["val"]["products"] == len(range(0, FULL_PRODUCTS, 20))
    assert summary["images_per_product"]["labelled"]["products"] == {
        str(k): v for k, v in FULL_IMAGES_PER_PRODUCT.items()
    }
    assert summary["categories"]["level1"] == {
        "taxonomy": 49,
        "present": 49,
        "present_train": 49,
        "present_val": 49,
        "present_holdout": 0,
        "empty": 0,
    }
    assert summary["categories"]["level2"]["present"] == 486
    assert summary["categories"]["level3"]["present"] == 5270
    by_id = dict(zip(category_ids.tolist(), counts.tolist(), strict=True))
    expected_largest = sorted(by_id, key=lambda cid: (-by_id[cid], cid))[:5]
    expected_smallest = sorted(by_id, key=lambda cid: (by_id[cid], cid))[:5]
    assert [entry["category_id"] for entry in summary["largest"]] == expected_largest
    assert [entry["category_id"] for entry in summary["smallest"]] == expected_smallest
    assert summary["largest"][0]["products"] == int(counts.max())
    assert summary["coverage"]["leaves_for_share"]["0.5"] == brute_coverage(counts.tolist(), 0.5)


def test_cli_explore(small: dict, tmp_path: Path) -> None:
    import shutil

    from typer.testing import CliRunner

    from prodcat.cli import app

    workdir = tmp_path / "work"  # a copy, so the shared fixture's outputs stay as the other tests expect
    shutil.copytree(small["root"], workdir)
    result = CliRunner().invoke(app, ["explore", "--workdir", str(workdir), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert f"{small['summary']['products']} products" in result.output
    summary = json.loads((WorkPaths(workdir).report("explore") / "summary.json").read_text(encoding="utf-8"))
    assert summary["top_k"] == 2 and len(summary["largest"]) == 2


def test_empty_train_catalog(tmp_path: Path) -> None:
    """A taxonomy with no labelled product still gives a complete (all-zero) report instead of a crash."""
    taxonomy = Taxonomy.from_rows(TRICKY_ROWS, {})
    paths = WorkPaths(tmp_path)
    taxonomy.save(paths.taxonomy)
    empty = np.zeros(0, dtype=np.int32)
    write_train_catalog(paths, taxonomy, empty, empty, empty.astype(bool))
    summary = explore(tmp_path)
    assert summary["products"] == summary["images"] == 0
    assert summary["largest"] == summary["smallest"] == []
    assert summary["categories"]["level3"] == {
        "taxonomy": 10,
        "present": 0,
        "present_train": 0,
        "present_val": 0,
        "present_holdout": 0,
        "empty": 10,
    }
    for name in FIGURES.values():
        assert (paths.report("explore") / name).is_file()
