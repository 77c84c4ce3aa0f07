"""Test helper: write W/catalog/pictures.parquet the way ingest does (issue 10), from the catalogs' BSON files.

Stand-in until ingest writes it: one row per picture (source, product_id, image_index, xxh3_128 hash, absolute
offset and length of the picture bytes), in catalog order.
"""

from __future__ import annotations

from pathlib import Path

import bson
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from prodcat.data.catalog import catalog_source, load_catalog
from prodcat.paths import WorkPaths


def picture_rows(workdir: Path, name: str) -> list[dict]:
    """Rows of one catalog: the picture bytes are found inside each document, in stored order."""
    rows = []
    data = Path(catalog_source(workdir, name)).read_bytes()
    table = load_catalog(workdir, name)
    for product_id, offset, length in zip(
        table["product_id"].to_pylist(), table["offset"].to_pylist(), table["length"].to_pylist(), strict=True
    ):
        document = bson.decode(data[offset : offset + length])
        cursor = offset
        for index, image in enumerate(document.get("imgs") or []):
            picture = bytes(image["picture"])
            found = data.index(picture, cursor, offset + length)
            cursor = found + len(picture)
            rows.append(
                {
                    "source": name,
                    "product_id": int(product_id),
                    "image_index": index,
                    "hash": xxhash.xxh3_128_digest(picture),
                    "offset": found,
                    "length": len(picture),
                }
            )
    return rows


def write_picture_table(workdir: Path) -> Path:
    rows = picture_rows(workdir, "train")
    if WorkPaths(workdir).catalog_table("test").is_file():
        rows += picture_rows(workdir, "test")
    schema = pa.schema(
        [
            ("source", pa.string()),
            ("product_id", pa.int64()),
            ("image_index", pa.int16()),
            ("hash", pa.binary(16)),
            ("offset", pa.int64()),
            ("length", pa.int32()),
        ]
    )
    path = WorkPaths(workdir).catalog / "pictures.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path
