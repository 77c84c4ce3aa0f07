"""Shared fixtures: BSON files written with pymongo, tiny taxonomy CSVs, the real Cdiscount files when present."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import bson
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / ".." / "shared" / "data" / "cdiscount"
CSV_HEADER = ("category_id", "category_level1", "category_level2", "category_level3")

# Tiny taxonomy with the real one's traps: a level-2 name under two level-1s, accents, a ligature, trailing spaces.
TINY_ROWS: list[tuple[int, str, str, str]] = [
    (1000000001, "AUTO - MOTO", "ACCESSOIRES", "ANTENNE "),
    (1000000002, "AUTO - MOTO", "ACCESSOIRES", "PORTE-BAGAGES"),
    (1000000003, "TELEPHONIE - GPS", "ACCESSOIRES", "COQUE TÉLÉPHONE"),
    (1000000004, "PUERICULTURE", "SANTÉ BÉBÉ", "DOPPLER FŒTAL"),
    (1000000005, "PUERICULTURE", "SANTÉ BÉBÉ", "THERMOMÈTRE  "),
    (1000000006, "ANIMALERIE", "AQUARIUM", "POMPE A AIR - DIFFUSEUR D'AIR - "),
]


def write_bson(path: Path, docs: Iterable[dict[str, Any] | bytes]) -> list[tuple[int, int]]:
    """Write documents (dicts encoded by pymongo, or raw bytes as given) back to back; returns (offset, length)."""
    frames, offset = [], 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for doc in docs:
            data = doc if isinstance(doc, bytes | bytearray) else bson.encode(doc)
            handle.write(data)
            frames.append((offset, len(data)))
            offset += len(data)
    return frames


def pictures(product_id: int, count: int, size: int = 64) -> list[bytes]:
    """Random picture bytes, different for every product and image (no need for real JPEGs to index)."""
    rng = np.random.default_rng([abs(product_id) % 2**32, count])
    return [b"\xff\xd8" + rng.integers(0, 256, size + 7 * k, dtype=np.uint8).tobytes() for k in range(count)]


def product(product_id: int, category_id: int | None = None, num_images: int = 1) -> dict[str, Any]:
    """A document laid out like Kaggle's: _id, imgs, category_id (left out for test files)."""
    doc: dict[str, Any] = {"_id": product_id, "imgs": [{"picture": p} for p in pictures(product_id, num_images)]}
    if category_id is not None:
        doc["category_id"] = category_id
    return doc


def reordered(doc: dict[str, Any]) -> bytes:
    """Encode with `_id` last (pymongo always writes a top-level `_id` first, so splice it in by hand)."""
    rest = bson.encode({key: value for key, value in doc.items() if key != "_id"})
    tail = b"\x12_id\x00" + int(doc["_id"]).to_bytes(8, "little", signed=True)
    body = rest[4:-1] + tail + b"\x00"
    return (len(body) + 4).to_bytes(4, "little") + body


def write_taxonomy_csv(
    path: Path, rows: Sequence[Sequence[Any]] = TINY_ROWS, header: Sequence[str] = CSV_HEADER
) -> Path:
    """Write a category_names.csv the way Kaggle's is written (UTF-8, comma separated, quoted when needed)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    return path


@pytest.fixture
def shared_data_dir() -> Path:
    """`<repo>/../shared/data/cdiscount` with Kaggle's real reference files; skips when absent (a fresh clone)."""
    if not (SHARED_DATA / "category_names.csv").is_file():
        pytest.skip(f"real Cdiscount reference files not found at {SHARED_DATA.resolve()}")
    return SHARED_DATA.resolve()


@pytest.fixture(name="write_bson")
def write_bson_fixture() -> Callable[[Path, Iterable[dict[str, Any] | bytes]], list[tuple[int, int]]]:
    return write_bson


@pytest.fixture(name="make_product")
def make_product_fixture() -> Callable[..., dict[str, Any]]:
    return product


@pytest.fixture(name="encode_reordered")
def encode_reordered_fixture() -> Callable[[dict[str, Any]], bytes]:
    return reordered


@pytest.fixture(name="write_taxonomy_csv")
def write_taxonomy_csv_fixture() -> Callable[..., Path]:
    return write_taxonomy_csv


@pytest.fixture
def tiny_rows() -> list[tuple[int, str, str, str]]:
    return list(TINY_ROWS)


@pytest.fixture
def tiny_data_dir(tmp_path: Path) -> Path:
    """A clean data folder: 12 train products over the tiny taxonomy (1-4 images), 3 test products, the CSV."""
    data = tmp_path / "data"
    categories = [row[0] for row in TINY_ROWS]
    write_bson(data / "train.bson", [product(100 + i, categories[i % 4], 1 + i % 4) for i in range(12)])
    write_bson(data / "test.bson", [product(900 + i, None, 1 + i) for i in range(3)])
    write_taxonomy_csv(data / "category_names.csv")
    return data
