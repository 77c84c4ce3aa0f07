"""Taxonomy: exact names, (level1, level2) groups, label order by frequency, persistence, CSV errors."""

from __future__ import annotations

import numpy as np
import pytest

from prodcat.data.taxonomy import Taxonomy, TaxonomyError, read_category_csv


def test_csv_keeps_names_exactly(tmp_path, write_taxonomy_csv, tiny_rows):
    path = write_taxonomy_csv(tmp_path / "category_names.csv", tiny_rows)
    assert read_category_csv(path) == tiny_rows  # accents, the Œ ligature and trailing spaces untouched


def test_csv_with_bom_crlf_quotes_and_blank_lines(tmp_path):
    path = tmp_path / "category_names.csv"
    text = (
        "\ufeffcategory_id,category_level1,category_level2,category_level3\r\n"
        '1,"A, B","X\u2028Y","multi\nline "\r\n\r\n2,A,X,Z\x85\r\n'
    )
    path.write_bytes(text.encode("utf-8"))
    assert read_category_csv(path) == [(1, "A, B", "X\u2028Y", "multi\nline "), (2, "A", "X", "Z\x85")]


def test_duplicate_level2_names_are_keyed_by_pair(tiny_rows):
    taxonomy = Taxonomy.from_rows(tiny_rows)
    assert taxonomy.level2_names.count("ACCESSOIRES") == 2  # under AUTO - MOTO and under TELEPHONIE - GPS
    auto, phone = (taxonomy.labels_of(np.array([1000000001, 1000000003]))).tolist()
    assert taxonomy.leaf_level2[auto] != taxonomy.leaf_level2[phone]
    assert taxonomy.level2_level1[taxonomy.leaf_level2[auto]] == taxonomy.leaf_level1[auto]
    assert taxonomy.level2_level1[taxonomy.leaf_level2[phone]] == taxonomy.leaf_level1[phone]
    assert (taxonomy.num_level1, taxonomy.num_level2, taxonomy.num_classes) == (4, 4, 6)
    same = taxonomy.labels_of(np.array([1000000001, 1000000002]))
    assert taxonomy.leaf_level2[same[0]] == taxonomy.leaf_level2[same[1]]


def test_names_and_describe(tiny_rows):
    taxonomy = Taxonomy.from_rows(tiny_rows)
    label = int(taxonomy.labels_of(np.array([1000000004]))[0])
    assert taxonomy.names(label) == ("PUERICULTURE", "SANTÉ BÉBÉ", "DOPPLER FŒTAL")
    described = taxonomy.describe(label)
    assert described["category_id"] == 1000000004 and described["level3"] == "DOPPLER FŒTAL"
    trailing = int(taxonomy.labels_of(np.array([1000000005]))[0])
    assert taxonomy.leaf_names[trailing] == "THERMOMÈTRE  "


def test_label_order_by_count_then_id(tiny_rows):
    counts = {1000000005: 7, 1000000002: 3, 1000000006: 3, 1000000001: 9}
    taxonomy = Taxonomy.from_rows(tiny_rows, counts)
    assert taxonomy.category_ids.tolist() == [1000000001, 1000000005, 1000000002, 1000000006, 1000000003, 1000000004]
    assert taxonomy.train_counts.tolist() == [9, 7, 3, 3, 0, 0]


def test_labels_of_unknown_ids(tiny_rows):
    taxonomy = Taxonomy.from_rows(tiny_rows, {1000000003: 5})
    labels = taxonomy.labels_of(np.array([1000000003, 42, 1000000001, -1, 2**40, 1000000006]))
    assert labels[0] == 0
    assert labels[[1, 3, 4]].tolist() == [-1, -1, -1]
    assert taxonomy.category_ids[labels[[0, 2, 5]]].tolist() == [1000000003, 1000000001, 1000000006]
    assert taxonomy.labels_of(np.array([], dtype=np.int64)).shape == (0,)
    empty = Taxonomy.from_rows([])
    assert empty.labels_of(np.array([5, 6])).tolist() == [-1, -1]


def test_save_load_round_trip(tmp_path, tiny_rows):
    taxonomy = Taxonomy.from_rows(tiny_rows, {1000000004: 4, 1000000002: 4, 1000000006: 1})
    loaded = Taxonomy.load(taxonomy.save(tmp_path / "taxonomy.parquet"))
    for field in ("category_ids", "leaf_level1", "leaf_level2", "level2_level1", "train_counts"):
        assert np.array_equal(getattr(loaded, field), getattr(taxonomy, field)), field
    for field in ("leaf_names", "level1_names", "level2_names"):
        assert getattr(loaded, field) == getattr(taxonomy, field), field


def test_from_csv(tmp_path, write_taxonomy_csv, tiny_rows):
    path = write_taxonomy_csv(tmp_path / "category_names.csv", tiny_rows)
    assert Taxonomy.from_csv(path, {1000000006: 2}).category_ids[0] == 1000000006


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"id,level1,level2,level3\n1,a,b,c\n", "header must be"),
        (b"category_id,category_level1,category_level2\n1,a,b\n", "header must be"),
        (b"", "header must be"),
        (b"category_id,category_level1,category_level2,category_level3\n1,a,b\n", ":2: expected 4 fields, got 3"),
        (b"category_id,category_level1,category_level2,category_level3\n1,a,b,c\n2,a,b,c,d\n", ":3: expected 4"),
        (b"category_id,category_level1,category_level2,category_level3\nx1,a,b,c\n", ":2: category_id 'x1' is not"),
        (b"category_id,category_level1,category_level2,category_level3\n1_000,a,b,c\n", "'1_000' is not an integer"),
        (b"category_id,category_level1,category_level2,category_level3\n1,a,b,c\n1,d,e,f\n", ":3: category_id 1 rep"),
        (b"category_id,category_level1,category_level2,category_level3\n1,a,b,c\n2,\xe9,b,c\n", "not UTF-8 at byte"),
        (b"category_id,category_level1,category_level2,category_level3\n", "no categories"),
        (b'category_id,category_level1,category_level2,category_level3\n1,"a,b,c\n', "malformed CSV"),
    ],
)
def test_malformed_csv_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "category_names.csv"
    path.write_bytes(content)
    with pytest.raises(TaxonomyError, match=message) as caught:
        read_category_csv(path)
    assert str(path) in str(caught.value)


def test_missing_csv(tmp_path):
    with pytest.raises(TaxonomyError, match="category file not found"):
        read_category_csv(tmp_path / "category_names.csv")


def test_real_category_names(shared_data_dir):
    rows = read_category_csv(shared_data_dir / "category_names.csv")
    taxonomy = Taxonomy.from_rows(rows)
    assert len(rows) == taxonomy.num_classes == 5270
    assert taxonomy.num_level1 == 49
    assert len(set(taxonomy.level2_names)) == 483 and taxonomy.num_level2 == 486
    names = {row[3] for row in rows}
    assert any("Œ" in name for name in names)
    assert any(name != name.rstrip() for name in names)  # trailing spaces survive
    assert taxonomy.labels_of(taxonomy.category_ids).tolist() == list(range(5270))
