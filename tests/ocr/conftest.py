"""OCR fixtures: a tiny ingested work dir whose pictures are rendered covers, plain photos and one garbage blob."""

from __future__ import annotations

from pathlib import Path

import pytest
from ocr_helpers import jpeg, plain_photo

from prodcat.config import IngestConfig
from prodcat.data.catalog import ingest
from prodcat.ocr.samples import render_cover


@pytest.fixture
def cover_workdir(tmp_path: Path, write_bson, write_taxonomy_csv, tiny_rows) -> tuple[Path, dict[int, tuple[str, ...]]]:
    """W with train products 1-4 (covers; product 2 also has a plain photo), 5 (a plain photo) and 6 (garbage bytes
    as its picture); returns W and the words printed on each cover product's first picture."""
    data = tmp_path / "data"
    categories = [row[0] for row in tiny_rows]
    docs, truth = [], {}
    for product in range(1, 5):
        cover = render_cover(seed=product)
        pictures = [jpeg(cover.image)] + ([jpeg(plain_photo(product))] if product == 2 else [])
        truth[product] = cover.words
        docs.append(
            {"_id": product, "category_id": categories[product % 4], "imgs": [{"picture": p} for p in pictures]}
        )
    docs.append({"_id": 5, "category_id": categories[0], "imgs": [{"picture": jpeg(plain_photo(5))}]})
    docs.append({"_id": 6, "category_id": categories[1], "imgs": [{"picture": b"\xff\xd8 not a picture at all"}]})
    write_bson(data / "train.bson", docs)
    write_taxonomy_csv(data / "category_names.csv")
    workdir = tmp_path / "work"
    ingest(IngestConfig(data_dir=str(data), workdir=str(workdir), val_fraction=0.0, seed=0))
    return workdir, truth
