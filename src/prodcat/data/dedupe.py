"""Byte-identical pictures: content hashes at ingest, duplicate groups of products, and their statistics.

Cdiscount reuses pictures: only 7.77 M of the 12.37 M train pictures are unique by content (stock photos of one
product listed by several sellers, placeholders). Ingest hashes every picture's bytes as stored in the BSON, never
decoding it (XXH3-128, compiled in kernels/: ~6 GB/s of CPU per core; one pass per document finds and hashes its
pictures), and writes one row per picture to `W/catalog/pictures.parquet`: `source` ("train" | "test"),
`product_id`, `image_index`, `hash` (16 bytes, the canonical XXH3-128 digest), `offset` (absolute byte offset of the
picture in its BSON file) and `length`. Rows follow the catalogs: train.parquet's product order, then
test.parquet's, image_index ascending. `load_pictures` reads it back.

Products sharing any picture, transitively, form one duplicate group (union-find over hashes); the group id is the
smallest train-catalog row among its products. The split keeps each group on one side, so no picture is seen in
training and again in validation or holdout.
"""

from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from prodcat.data.bson_index import BsonIndex, PictureSpans, finish_spans, picture_spans, span_inputs
from prodcat.data.kernels import bson_scan, xxh3
from prodcat.data.kernels.pictures import spans_and_hashes
from prodcat.data.kernels.union import union
from prodcat.data.kernels.xxh3 import LONG_MIN, compiled_hasher
from prodcat.paths import WorkPaths

__all__ = [
    "PICTURES_SCHEMA",
    "digest",
    "hash_ranges",
    "hash_pictures",
    "duplicate_groups",
    "duplicate_stats",
    "hash_keys",
    "hashes_of",
    "load_pictures",
    "pictures_path",
    "select_pictures",
]

PICTURES_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("product_id", pa.int64()),
        ("image_index", pa.int16()),
        ("hash", pa.binary(16)),
        ("offset", pa.int64()),
        ("length", pa.int32()),
    ]
)
_PARALLEL_MIN_BYTES = 64 << 20  # below this one thread hashes as fast as two
_THREADS = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
_SIZE_BINS = (2, 3, 5, 10, 100, 1000)  # group-size histogram edges: 2, 3-4, 5-9, 10-99, 100-999, >= 1000


def digest(data: bytes | memoryview) -> bytes:
    """The 16-byte content hash of one picture (canonical XXH3-128: high half first, big-endian)."""
    return xxhash.xxh3_128_digest(data)


def pictures_path(workdir: str | Path) -> Path:
    return WorkPaths(workdir).catalog / "pictures.parquet"


def hash_ranges(buf: mmap.mmap | bytes, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(n, 16) uint8 digests of buf[start : start + length] for every range; ranges with start < 0 hash b""."""
    starts, lengths = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    halves = np.zeros((len(starts), 2), dtype=np.uint64)
    hasher = compiled_hasher()
    long = lengths >= LONG_MIN if hasher is not None else np.zeros(len(starts), dtype=bool)
    if long.any():
        _hash_compiled(hasher, buf, starts, lengths, halves)
    _hash_python(buf, starts, lengths, np.flatnonzero(~long), halves)  # short pictures (every one without numba)
    return _digests(halves)


def _digests(halves: np.ndarray) -> np.ndarray:
    """(n, 2) uint64 (high, low) -> (n, 16) uint8 canonical digests."""
    return halves.astype(">u8").view(np.uint8).reshape(len(halves), 16)


def _hash_python(buf: mmap.mmap | bytes, starts: np.ndarray, lengths: np.ndarray, rows: np.ndarray, out: np.ndarray):
    """`xxhash` for the given rows: out[row] = (high, low); a start < 0 hashes b""."""
    view = memoryview(buf)
    try:
        for row in rows.tolist():
            start, size = int(starts[row]), int(lengths[row])
            piece = view[start : start + size] if start >= 0 else b""
            out[row] = np.frombuffer(digest(piece), dtype=">u8")
    finally:
        view.release()


def _halves(lengths: np.ndarray) -> list[tuple[int, int]]:
    """Row ranges for the threads: two where half the bytes are done (large inputs), else one."""
    total = int(lengths.sum())
    if _THREADS < 2 or total < _PARALLEL_MIN_BYTES:
        return [(0, len(lengths))]
    middle = int(np.searchsorted(np.cumsum(lengths), total // 2))
    return [(0, middle), (middle, len(lengths))]


def _on_threads(task, parts: list[tuple[int, int]]) -> None:
    """task(a, b) for each row range, on a thread each (the compiled kernels run without the GIL)."""
    if len(parts) == 1:
        task(*parts[0])
        return
    with ThreadPoolExecutor(len(parts)) as pool:
        for future in [pool.submit(task, a, b) for a, b in parts]:
            future.result()


def _hash_compiled(hasher, buf: mmap.mmap | bytes, starts: np.ndarray, lengths: np.ndarray, out: np.ndarray) -> None:
    """The compiled hasher over all ranges, on two threads for large inputs."""
    view = np.frombuffer(buf, dtype=np.uint8)
    try:
        _on_threads(lambda a, b, view=view: hasher(view, starts[a:b], lengths[a:b], out[a:b]), _halves(lengths))
    finally:
        del view  # release the buffer export so the mmap can close


def _locate_and_hash(
    buf: mmap.mmap | bytes, offsets: np.ndarray, lengths: np.ndarray, counts: np.ndarray
) -> tuple[PictureSpans, np.ndarray]:
    """`picture_spans` and `hash_ranges` in one compiled pass (two threads on large files), Python for the rest."""
    if spans_and_hashes is None:
        spans = picture_spans(buf, offsets, lengths, counts)
        return spans, hash_ranges(buf, spans.offset, spans.length)
    offsets, lengths, counts, first = span_inputs(offsets, lengths, counts)
    out_offset, out_length = np.full(first[-1], -1, dtype=np.int64), np.zeros(first[-1], dtype=np.int64)
    ok, halves = np.zeros(len(offsets), dtype=bool), np.zeros((first[-1], 2), dtype=np.uint64)
    view = np.frombuffer(buf, dtype=np.uint8)
    try:
        _on_threads(
            lambda a, b, view=view: spans_and_hashes(
                view, offsets[a:b], lengths[a:b], counts[a:b], first[a:b], out_offset, out_length, ok[a:b],
                bson_scan.SPAN_KEYS, xxh3.KEYS, xxh3.INIT, halves,
            ),
            _halves(lengths),
        )  # fmt: skip
    finally:
        del view
    spans = finish_spans(buf, offsets, lengths, counts, first, out_offset, out_length, ok)
    # Rows of documents the kernel read keep its hashes; short pictures and re-walked documents go through xxhash.
    final = np.zeros((len(spans), 2), dtype=np.uint64)
    done = ok[spans.document] & (spans.length >= LONG_MIN)
    final[done] = halves[first[spans.document[done]] + spans.image_index[done]]
    _hash_python(buf, spans.offset, spans.length, np.flatnonzero(~done), final)
    return spans, _digests(final)


def hash_pictures(index: BsonIndex, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Locate and hash every picture of the indexed documents (`rows` of the index, default all), in that order.

    Returns columns `document` (position in `rows`), `image_index`, `offset`, `length`, `hash` ((n, 16) uint8),
    and `damaged`: (position in `rows`, reason) of each document whose structure does not parse.
    """
    rows = np.arange(len(index)) if rows is None else np.asarray(rows)
    offsets, lengths = index.offset[rows], index.length[rows]
    if not len(rows) or index.file_size == 0:
        return _empty_pictures()
    with open(index.path, "rb") as handle:
        buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            spans, hashes = _locate_and_hash(buf, offsets, lengths, index.num_images[rows])
        finally:
            try:
                buf.close()
            except BufferError:  # an exception's traceback still holds a view; the map goes when it does
                pass
    return {
        "document": spans.document,
        "image_index": spans.image_index,
        "offset": spans.offset,
        "length": spans.length,
        "hash": hashes,
        "damaged": spans.damaged,
    }


def _empty_pictures() -> dict[str, np.ndarray]:
    empty = np.zeros(0, dtype=np.int64)
    return {
        "document": empty,
        "image_index": empty.astype(np.int16),
        "offset": empty,
        "length": empty.astype(np.int32),
        "hash": np.zeros((0, 16), dtype=np.uint8),
        "damaged": [],
    }


def select_pictures(pictures: dict, keep: np.ndarray) -> dict:
    """The pictures of the documents where `keep` (one bool per hashed document) is True, renumbered."""
    keep = np.asarray(keep, dtype=bool)
    rows = keep[pictures["document"]]
    position = np.cumsum(keep) - 1
    picked = {key: value[rows] for key, value in pictures.items() if key != "damaged"}
    picked["document"] = position[picked["document"]].astype(np.int64)
    picked["damaged"] = [(int(position[doc]), why) for doc, why in pictures["damaged"] if keep[doc]]
    return picked


def pictures_table(source: str, product_id: np.ndarray, pictures: dict[str, np.ndarray]) -> pa.Table:
    """The `PICTURES_SCHEMA` rows of one catalog; `product_id` is indexed by the pictures' `document`."""
    count = len(pictures["document"])
    hashes = np.ascontiguousarray(pictures["hash"]).reshape(-1)
    hash_array = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), count, [None, pa.py_buffer(hashes)])
    return pa.table(
        [
            pa.repeat(pa.scalar(source, pa.string()), count),
            pa.array(np.asarray(product_id, dtype=np.int64)[pictures["document"]]),
            pa.array(pictures["image_index"].astype(np.int16)),
            hash_array,
            pa.array(pictures["offset"].astype(np.int64)),
            pa.array(pictures["length"].astype(np.int32)),
        ],
        schema=PICTURES_SCHEMA,
    )


def load_pictures(workdir: str | Path, source: str | None = None) -> pa.Table:
    """`W/catalog/pictures.parquet`, all rows or those of one source ("train" or "test")."""
    path = pictures_path(workdir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no picture table; run `prodcat ingest DATA_DIR --workdir {workdir}` again")
    if source is not None and source not in ("train", "test"):
        raise ValueError(f"source must be 'train', 'test' or None, got {source!r}")
    filters = None if source is None else [("source", "=", source)]
    return pq.read_table(path, filters=filters, schema=PICTURES_SCHEMA)


def hashes_of(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The (n, 16) uint8 digests of a `hash` column, without going through Python bytes objects."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [np.frombuffer(c.buffers()[1], dtype=np.uint8)[16 * c.offset : 16 * (c.offset + len(c))] for c in chunks]
    return np.concatenate(parts).reshape(-1, 16) if parts else np.zeros((0, 16), dtype=np.uint8)


# -- groups -------------------------------------------------------------------------------------------------------
def hash_keys(hashes: np.ndarray) -> np.ndarray:
    """Dense id per distinct hash ((n, 16) uint8 digests): equal ids exactly for equal digests."""
    halves = np.ascontiguousarray(hashes).view(">u8").reshape(-1, 2).astype(np.uint64)
    if not len(halves):
        return np.zeros(0, dtype=np.int64)
    # Sorting on the high half alone is ~10x faster than a two-key lexsort; the low half is then checked, and the
    # exact sort runs only if two different digests share a high half (odds ~1e-6 for 12 M pictures).
    order = np.argsort(halves[:, 0])
    ordered = halves[order]
    same_high = ordered[1:, 0] == ordered[:-1, 0]
    if np.any(same_high & (ordered[1:, 1] != ordered[:-1, 1])):
        order = np.lexsort((halves[:, 1], halves[:, 0]))
        ordered = halves[order]
        same_high = ordered[1:, 0] == ordered[:-1, 0]
    new = np.r_[True, ~(same_high & (ordered[1:, 1] == ordered[:-1, 1]))]
    keys = np.empty(len(halves), dtype=np.int64)
    keys[order] = np.cumsum(new) - 1
    return keys


def duplicate_groups(product_row: np.ndarray, keys: np.ndarray, num_products: int) -> np.ndarray:
    """Group id of each of `num_products` products: the smallest row among products sharing a picture, transitively.

    `product_row[i]` is the product of picture i and `keys[i]` its dense hash id (`hash_keys`). Union-find in one
    pass, no sort: each picture joins its product to the first product seen with its hash; a set's root is always
    its smallest row.
    """
    product_row, keys = np.asarray(product_row, dtype=np.int64), np.asarray(keys, dtype=np.int64)
    first = np.full(int(keys.max(initial=-1)) + 1, -1, dtype=np.int64)
    return union(np.arange(num_products, dtype=np.int64), product_row, keys, first)


# -- statistics -------------------------------------------------------------------------------------------------
def duplicate_stats(
    keys: np.ndarray,
    product_row: np.ndarray,
    groups: np.ndarray,
    category_id: np.ndarray | None = None,
    top_k: int = 10,
) -> dict:
    """JSON-ready duplicate numbers of one catalog's pictures (train: with groups and categories).

    `duplicate_share` is the share of pictures that are not the first copy of their content,
    1 - distinct / pictures (Cdiscount train: 1 - 7.77 M / 12.37 M = 0.372).
    """
    pictures, distinct = len(keys), int(keys.max(initial=-1)) + 1
    copies = np.bincount(keys, minlength=distinct)
    sizes = np.bincount(np.unique(groups, return_inverse=True)[1]) if len(groups) else np.zeros(0, dtype=np.int64)
    shared = sizes[sizes >= 2]
    edges = list(_SIZE_BINS) + [np.iinfo(np.int64).max]
    histogram = {
        (f"{low}" if high == low + 1 else f">= {low}" if high > 10**12 else f"{low}-{high - 1}"): int(
            np.count_nonzero((shared >= low) & (shared < high))
        )
        for low, high in zip(edges[:-1], edges[1:])
    }
    return {
        "pictures": pictures,
        "distinct_pictures": distinct,
        "duplicate_share": float(1 - distinct / pictures) if pictures else 0.0,
        "pictures_in_shared_content": int(copies[copies >= 2].sum()),
        "products": int(len(groups)),
        "groups": int(len(shared)),
        "products_in_groups": int(shared.sum()),
        "largest_group": int(shared.max(initial=0)),
        "group_sizes": histogram,
        "most_reused": _most_reused(keys, product_row, copies, category_id, top_k),
    }


def _most_reused(
    keys: np.ndarray, product_row: np.ndarray, copies: np.ndarray, category_id: np.ndarray | None, top_k: int
) -> list[dict]:
    """The `top_k` pictures with the most copies: copies, products, categories and a picture row to show."""
    top = np.argsort(-copies, kind="stable")[:top_k]
    top = top[copies[top] >= 2]
    result = []
    for key in top.tolist():
        rows = np.flatnonzero(keys == key)
        products = np.unique(product_row[rows])
        entry = {"copies": int(copies[key]), "products": int(len(products)), "picture_row": int(rows[0])}
        if category_id is not None:
            entry["categories"] = int(len(np.unique(category_id[products])))
        result.append(entry)
    return result
