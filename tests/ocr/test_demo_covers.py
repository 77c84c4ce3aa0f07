"""The demo's text-heavy leaves: covers deterministic from the seed, alike across a department, carrying the leaf's
words (Tesseract reads some of them; skips without it)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import bson
import numpy as np
import pytest
from PIL import Image

from prodcat.config import ConfigError, DemoConfig
from prodcat.data.synthetic.covers import COVER_LEAVES, TEXT_DEPARTMENTS, cover_words, find_fonts, render_cover_product
from prodcat.data.synthetic.demo import cover_leaves, generate_demo, make_taxonomy
from prodcat.ocr.samples import ground_truth_words


def _config(**overrides) -> DemoConfig:
    settings = dict(products=60, test_products=5, categories=12, seed=3, text_leaves=4)
    settings.update(overrides)
    return DemoConfig(**settings)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("covers") / "data"
    generate_demo(out, _config())
    return out


def test_text_leaves_default_and_taxonomy() -> None:
    assert DemoConfig().resolved_text_leaves() == 8 and DemoConfig(categories=10).resolved_text_leaves() == 2
    assert DemoConfig(categories=8).resolved_text_leaves() == 0  # small demos keep their old pictures
    with pytest.raises(ConfigError, match="text_leaves"):
        DemoConfig(categories=5, text_leaves=4)
    rows = make_taxonomy(60, seed=0, text_leaves=8)
    covers = cover_leaves(rows)
    assert len(rows) == 60 and len(covers) == 8
    assert {rows[k].level1 for k in covers} == set(TEXT_DEPARTMENTS)  # books, music, films, games
    others = [row for k, row in enumerate(rows) if k not in covers]
    assert not {row.level1 for row in others} & set(TEXT_DEPARTMENTS)  # only cover leaves in those departments
    assert make_taxonomy(60, seed=0) != rows and len(cover_leaves(make_taxonomy(60, seed=0))) == 0


def test_demo_with_covers_is_deterministic(demo: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_demo(again, _config())
    for name in ("category_names.csv", "train.bson", "test.bson"):
        assert (again / name).read_bytes() == (demo / name).read_bytes(), name
    first = render_cover_product(COVER_LEAVES[0], np.random.default_rng(5), 2)
    assert first == render_cover_product(COVER_LEAVES[0], np.random.default_rng(5), 2)
    assert first[0] != first[1]  # two photos of one cover differ (pose, light, noise)


def _cover_products(demo: Path) -> list[tuple[str, list[bytes]]]:
    with open(demo / "category_names.csv", encoding="utf-8") as handle:
        rows = {int(r["category_id"]): r for r in csv.DictReader(handle)}
    products = []
    for doc in bson.decode_all((demo / "train.bson").read_bytes()):
        row = rows[doc["category_id"]]
        if row["category_level1"] in TEXT_DEPARTMENTS:
            products.append((row["category_level3"], [image["picture"] for image in doc["imgs"]]))
    return products


def test_covers_carry_the_leaf_words_and_ocr_reads_them(demo: Path) -> None:
    if not find_fonts():
        pytest.skip("fonts-dejavu-core not installed (apt-get install fonts-dejavu-core)")
    from prodcat.ocr.engine import EngineUnavailable, create_engine

    by_name = {leaf.level3: leaf for leaf in COVER_LEAVES}
    words = cover_words(COVER_LEAVES[1], np.random.default_rng(2))
    assert len(set(words) & set(COVER_LEAVES[1].words)) >= 2
    products = _cover_products(demo)
    assert len({name for name, _ in products}) == 4
    try:
        engine = create_engine("tesseract")
    except EngineUnavailable as error:
        pytest.skip(str(error))
    hits = 0
    for name, pictures in products[:8]:
        read = ground_truth_words(" ".join(w.text for w in engine.read(Image.open(io.BytesIO(pictures[0])))))
        hits += bool(set(read) & set(ground_truth_words(" ".join(by_name[name].words))))
    assert hits >= 6, f"OCR found the leaf's words on only {hits} of 8 covers"
