"""Index Kaggle's Cdiscount BSON files without decoding pictures, and read products back by offset.

A BSON file is a sequence of documents, each prefixed by its int32 little-endian length. Kaggle's documents are
`{_id: int32|int64, imgs: [{picture: binary}, ...], category_id: int32}` (test files lack `category_id`).

Speed: the offset chain is walked in a tight loop (one int read and one byte test per document); then the first
40 and last 32 bytes of every document are copied into compact rows and the fields of all documents with Kaggle's
layout are parsed column by column with numpy; only documents with another layout go through pymongo's full
decoder. Pictures are never touched. With numba installed, large files take one compiled pass
(`kernels.bson_scan.walk`) that walks the offsets and parses each document while its pages are hot, on two threads
(one per half of the file, the split point confirmed by the first half's chain): 1.17 GB in ~0.06 s on 2 cores,
faster than reading the file. Small files, and machines without numba, use the Python walk + numpy parse (see
benchmarks/bench_ingest.py). `picture_spans` gives the byte range of every picture (ingest hashes them, see
dedupe.py) from element headers alone (compiled: `kernels.bson_scan.spans`). Damage never stops the scan: a
document that does not decode is reported and skipped, a broken length prefix is bridged by searching for the next
document that decodes, and a frame that fails to decode is searched for the documents it may have swallowed (a
corrupted length prefix that happens to end on a NUL byte).
"""

from __future__ import annotations

import array
import dataclasses
import itertools
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bson
import numpy as np

from prodcat.data.kernels import bson_scan

__all__ = [
    "BsonDamageError",
    "BsonIndex",
    "BsonProblem",
    "BsonReader",
    "PictureSpans",
    "index_bson",
    "picture_spans",
    "read_pictures",
]

_ID_INT32 = b"\x10_id\x00"
_ID_INT64 = b"\x12_id\x00"
_MIN_DOC = 5
_MAX_IMAGES_FAST = 10  # single-digit array keys; longer arrays take the slow path
MAX_IMAGES = 32767  # image counts and picture positions are int16 (catalogs, pictures.parquet, the feature store)


_COMPILED_MIN_BYTES = 16 << 20
_PARALLEL_MIN_BYTES = 256 << 20  # below this one thread is as fast as two
_THREADS = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


@dataclasses.dataclass(frozen=True)
class BsonProblem:
    """One damaged or unusable document: file, byte offset, kind and a readable reason."""

    file: str
    offset: int
    kind: str
    reason: str
    product_id: int | None = None

    def __str__(self) -> str:
        where = f"{self.file} at byte {self.offset}"
        product = f" (product {self.product_id})" if self.product_id is not None else ""
        return f"{where}{product}: {self.kind}: {self.reason}"


@dataclasses.dataclass
class BsonIndex:
    """One row per decodable document, in file order."""

    path: str
    product_id: np.ndarray  # int64
    offset: np.ndarray  # int64, start of the document (its length prefix)
    length: np.ndarray  # int32
    num_images: np.ndarray  # int16
    category_id: np.ndarray  # int64, -1 where the document has none (test files)
    has_category: bool
    problems: list[BsonProblem]
    file_size: int

    def __len__(self) -> int:
        return len(self.product_id)


class BsonDamageError(ValueError):
    """Raised in strict mode for the first damaged document (by offset), or when reading a damaged one back."""

    def __init__(self, problem: BsonProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem


class _Damage(Exception):
    """A document that decodes but lacks Kaggle's fields."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


_INT32 = struct.Struct("<i")


def _walk_offsets(
    buf: mmap.mmap | bytes, size: int, path: str, problems: list[BsonProblem]
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray] | None]:
    """(offsets, lengths, fields parsed by the compiled walk or None) of the framed documents, in file order.

    On damage, record it and resynchronise on the next decodable document.
    """
    offsets = array.array("q")  # numpy takes it over without a copy
    ends: list[tuple[int, int]] = []  # (documents so far, end of the last one) where a chain breaks
    pos = 0
    parsed: list = []
    while True:
        before = len(offsets)
        pos = _chain(buf, pos, offsets, parsed)
        if len(offsets) > before:
            ends.append((len(offsets), pos))
        if pos >= size:
            break
        if size - pos < 4:
            problems.append(BsonProblem(path, pos, "trailing_bytes", f"{size - pos} bytes after the last document"))
            break
        pos = _skip_damage(buf, size, pos, path, problems)
    starts = np.frombuffer(offsets, dtype=np.int64) if len(offsets) else np.zeros(0, dtype=np.int64)
    # A document ends where the next begins, except at the chain breaks.
    stops = np.empty_like(starts)
    stops[:-1] = starts[1:]
    for count, end in ends:
        stops[count - 1] = end
    return starts, stops - starts, _parsed_fields(parsed, len(starts))


def _parsed_fields(parsed: list, count: int) -> dict[str, np.ndarray] | None:
    """Fields the compiled walk read on the way, when they cover every framed document (else None)."""
    if not parsed or any(part is None for part in parsed) or sum(len(p["ok"]) for p in parsed) != count:
        return None
    return {key: np.concatenate([part[key] for part in parsed]) for key in parsed[0]}


def _chain(buf: mmap.mmap | bytes, pos: int, offsets: array.array, parsed: list | None = None) -> int:
    """Append the documents framed by consecutive length prefixes from `pos`; return where the chain breaks.

    Large files take the compiled walk when numba is installed (the same rules; it also parses each document's
    fields into `parsed`); otherwise, and for small files where compiling would cost more than it saves, the
    Python loop below, which marks `parsed` as incomplete.
    """
    if bson_scan.walk is not None and len(buf) - pos >= _COMPILED_MIN_BYTES:
        return _chain_fast(buf, pos, offsets, parsed)
    before = len(offsets)
    pos = _chain_python(buf, pos, offsets)
    if parsed is not None and len(offsets) > before:
        parsed.append(None)
    return pos


def _chain_fast(buf: mmap.mmap | bytes, pos: int, offsets: array.array, parsed: list | None = None) -> int:
    """The compiled walk; on large files two threads take one half each (numba releases the GIL).

    The second half starts at a candidate document found by pattern; it is kept only if the first half's chain
    lands exactly on it, so a false candidate costs time, never correctness.
    """
    view = np.frombuffer(buf, dtype=np.uint8)
    try:
        size = len(view)
        candidate = _split_candidate(buf, pos, size) if _THREADS > 1 and size - pos >= _PARALLEL_MIN_BYTES else None
        if candidate is None:
            first = _walk_range(view, pos, size)
            second = None
        else:
            with ThreadPoolExecutor(2) as pool:
                head, tail = (
                    pool.submit(_walk_range, view, pos, candidate),
                    pool.submit(_walk_range, view, candidate, size),
                )
                first, second = head.result(), tail.result()
        chunks, end = first
        if second is not None and end == candidate:  # the first half's chain confirms the split point
            chunks, end = chunks + second[0], second[1]
        elif second is not None and end > candidate:  # false candidate: the chain ran past it; go on alone
            rest, end = _walk_range(view, end, size)
            chunks = chunks + rest
        for starts, fields in chunks:
            offsets.frombytes(starts.tobytes())
            if parsed is not None:
                parsed.append(fields)
        return int(end)
    finally:
        del view  # release the buffer export so the mmap can close


def _walk_range(view: np.ndarray, pos: int, stop: int) -> tuple[list, int]:
    """Compiled walk from `pos` until the chain breaks or reaches `stop`: ([(starts, fields), ...], end)."""
    chunks = []
    # Small buffers reused across rounds: fresh large arrays would page-fault on every call (tens of ms per GB).
    starts, fields = np.empty(1 << 16, dtype=np.int64), _fast_fields_none(1 << 16)
    while True:
        count, pos = bson_scan.walk(view, pos, stop, starts, bson_scan.FIELD_NAMES, _field_tuple(fields))
        chunks.append((starts[:count].copy(), {key: value[:count].copy() for key, value in fields.items()}))
        if count < len(starts):
            return chunks, pos


def _split_candidate(buf: mmap.mmap | bytes, pos: int, size: int) -> int | None:
    """A plausible document start near the middle of [pos, size): an `_id` first field with a sane frame."""
    middle = pos + (size - pos) // 2
    for pattern in (_ID_INT32, _ID_INT64):
        hit = buf.find(pattern, middle, min(size, middle + (64 << 20)))
        if hit >= 4:
            (length,) = _INT32.unpack_from(buf, hit - 4)
            if _MIN_DOC <= length <= size - (hit - 4) and buf[hit - 4 + length - 1] == 0:
                return hit - 4
    return None


def _field_tuple(fields: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    return fields["ok"], fields["product_id"], fields["num_images"], fields["category_id"]


def _chain_python(buf: mmap.mmap | bytes, pos: int, offsets: array.array) -> int:
    """The walk in plain Python: one int read and one byte test per document. The buffer's own bounds checks end it
    (struct.error: fewer than 4 bytes left; IndexError: a frame runs past the end), so the loop tests nothing else.
    """
    add, unpack = offsets.append, _INT32.unpack_from
    try:
        while True:
            (length,) = unpack(buf, pos)
            if length < 5 or buf[pos + length - 1]:  # 5 = _MIN_DOC, inlined: this line runs once per document
                return pos
            add(pos)
            pos += length
    except (struct.error, IndexError):
        return pos


def _skip_damage(buf: mmap.mmap | bytes, size: int, pos: int, path: str, problems: list[BsonProblem]) -> int:
    """Report the unframed bytes at `pos`; return the offset of the next document that decodes, or `size`."""
    (length,) = _INT32.unpack_from(buf, pos)
    resume = _resync(buf, size, pos + 1)
    if resume < size:
        why = "runs past the end of the file" if pos + length > size else "does not frame a BSON document"
        kind, reason = "bad_length", f"length prefix {length} {why}; skipped {resume - pos} bytes to the next document"
    elif length >= _MIN_DOC and pos + length > size and _starts_like_kaggle(buf[pos + 4 : pos + 9]):
        kind, reason = (
            "truncated",
            f"length prefix {length} runs past the end of the file: {size - pos} bytes "
            "left and no decodable document in them",
        )
    else:
        kind, reason = "trailing_bytes", f"{size - pos} bytes up to the end of the file hold no BSON document"
    problems.append(BsonProblem(path, pos, kind, reason))
    return resume


def _starts_like_kaggle(head: bytes) -> bool:
    """Whether bytes after a length prefix begin the `_id` element every Kaggle document starts with."""
    return _ID_INT32.startswith(head) or _ID_INT64.startswith(head)


def _resync(buf: mmap.mmap | bytes, size: int, start: int) -> int:
    """Offset of the next document at or after `start` that decodes or runs past the end, or `size`.

    Documents are found by their `_id` first field, Kaggle's layout.
    """
    unpack = _INT32.unpack_from
    hits = {marker: buf.find(marker, start) for marker in (_ID_INT32, _ID_INT64)}
    while True:
        found = [(hit, marker) for marker, hit in hits.items() if hit >= 0]
        if not found:
            return size
        hit, marker = min(found)
        candidate = hit - 4
        if candidate >= start:
            (length,) = unpack(buf, candidate)
            if length > size - candidate:
                return candidate  # a document cut short by the end of the file: the walk reports it as truncated
            if _MIN_DOC <= length and buf[candidate + length - 1] == 0:
                try:
                    bson.decode(buf[candidate : candidate + length])
                    return candidate
                except Exception:  # noqa: BLE001 - any decode failure means "not a document start"
                    pass
        # Only the marker just rejected is searched again, so a run of false hits stays linear.
        hits[marker] = buf.find(marker, hit + 1)


def _key(text: bytes) -> int:
    return int.from_bytes(text, "little", signed=True)


_ID32_KEY, _ID64_KEY, _MASK5 = _key(b"\x10_id\x00"), _key(b"\x12_id\x00"), (1 << 40) - 1
_IMGS_KEY, _MASK6 = _key(b"\x04imgs\x00"), (1 << 48) - 1
_CATEGORY_KEY, _ID_NAME_KEY = _key(b"category"), _key(b"_id\x00")  # "category_id\0" read as 8 + 4 bytes
_HEAD, _TAIL = 40, 32  # bytes copied from the start and the end of each document
_CHUNK = 1 << 18  # documents parsed at a time: bounds the copies to ~40 MB however large the file


def _fast_fields(buf: mmap.mmap, size: int, offsets: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
    """Read _id, image count and category_id of every document laid out like Kaggle's; flag the others.

    Kaggle's layout: `_id` (int32|int64), `imgs` (array of up to 10 embedded documents), optional `category_id`
    (int32|int64), nothing else. Scattered reads over a large file miss the TLB on nearly every access, so the
    first and last bytes of the documents are copied once into compact rows and parsed column by column; only
    the headers of second and later pictures are read from the file itself.
    """
    fields = _fast_fields_none(len(offsets))
    if bson_scan.parse_all is not None and size >= _COMPILED_MIN_BYTES:
        return _fast_fields_compiled(buf, offsets, lengths, fields)
    file_ints = np.ndarray((size - 7,), dtype="<i8", buffer=buf, strides=(1,))  # int64 at any byte offset
    for first in range(0, len(offsets), _CHUNK):
        part = slice(first, first + _CHUNK)
        _fast_chunk(buf, size, file_ints, offsets[part], lengths[part], {k: v[part] for k, v in fields.items()})
    return fields


def _fast_fields_compiled(
    buf: mmap.mmap | bytes, offsets: np.ndarray, lengths: np.ndarray, fields: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    view = np.frombuffer(buf, dtype=np.uint8)
    try:
        bson_scan.parse_all(view, offsets, lengths.astype(np.int64), bson_scan.FIELD_NAMES, _field_tuple(fields))
    finally:
        del view  # release the buffer export so the mmap can close
    return fields


def _fast_chunk(
    buf: mmap.mmap,
    size: int,
    file_ints: np.ndarray,
    offsets: np.ndarray,
    lengths: np.ndarray,
    fields: dict[str, np.ndarray],
) -> None:
    """`_fast_fields` for one chunk; writes into `fields` (views of the full arrays)."""
    ends = offsets + lengths
    heads, tails, ok = _windows(buf, size, offsets, ends)
    key = _column(heads, 4, "<i8") & _MASK5
    wide = key == _ID64_KEY

    def after_id(at: int, dtype: str) -> np.ndarray:  # a head field that sits after the 4- or 8-byte _id
        return np.where(wide, _column(heads, at + 4, dtype), _column(heads, at, dtype))

    width = np.where(wide, 8, 4)
    array_end = offsets + 15 + width + after_id(19, "<i4")  # one past the `imgs` array's final NUL
    ok &= (wide | (key == _ID32_KEY)) & ((after_id(13, "<i8") & _MASK6) == _IMGS_KEY)
    ok &= (array_end >= offsets + 20 + width) & (array_end <= ends - 1)
    num_images, images_ok = _count_images(file_ints, offsets + 19 + width, after_id(23, "<i8"), array_end)
    category_id, tail_ok = _tail(tails, array_end - ends)
    ok &= images_ok & tail_ok
    fields["ok"][:] = ok
    fields["product_id"][ok] = np.where(wide, _column(heads, 9, "<i8"), _column(heads, 9, "<i4"))[ok]
    fields["num_images"][ok] = num_images[ok]
    fields["category_id"][ok] = category_id[ok]


def _windows(buf: mmap.mmap, size: int, offsets: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, ...]:
    """(heads, tails, both present): the first 40 and last 32 bytes of each document as compact uint8 rows.

    Documents touch, so one 72-byte copy across each boundary holds a tail and the next head; only the first
    document, those after a gap and the last one need copies of their own.
    """
    n, span = len(offsets), _TAIL + _HEAD
    joined = np.zeros((n, span), dtype=np.uint8)
    inside = (ends >= _TAIL) & (ends + _HEAD <= size)
    joined[inside] = _gather(buf, size, ends[inside] - _TAIL, span)
    tails, heads = joined[:, :_TAIL].copy(), np.zeros((n, _HEAD), dtype=np.uint8)
    heads[1:] = joined[:-1, _TAIL:]
    has_head, has_tail = np.zeros(n, dtype=bool), inside
    has_head[1:] = inside[:-1] & (offsets[1:] == ends[:-1])
    rows = np.flatnonzero(~has_head & (offsets + _HEAD <= size))
    heads[rows], has_head[rows] = _gather(buf, size, offsets[rows], _HEAD), True
    rows = np.flatnonzero(~has_tail & (ends >= _TAIL))
    tails[rows], has_tail[rows] = _gather(buf, size, ends[rows] - _TAIL, _TAIL), True
    return heads, tails, has_head & has_tail


def _gather(buf: mmap.mmap, size: int, starts: np.ndarray, width: int) -> np.ndarray:
    """`width` bytes from each start, as (len(starts), width) uint8 rows."""
    if not len(starts):
        return np.zeros((0, width), dtype=np.uint8)
    # One void item per window: numpy copies each with one memcpy (a 2-D uint8 view copies byte by byte).
    items = np.ndarray((size - width + 1,), dtype=f"V{width}", buffer=buf, strides=(1,))[starts]
    return items.view(np.uint8).reshape(len(starts), width)


def _column(rows: np.ndarray, at: int, dtype: str) -> np.ndarray:
    """The field `at` bytes into every row of a C-contiguous (n, width) uint8 array, as a strided view."""
    return np.ndarray((rows.shape[0],), dtype=dtype, buffer=rows, offset=at, strides=(rows.shape[1],))


def _count_images(
    file_ints: np.ndarray, first: np.ndarray, first_value: np.ndarray, array_end: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Follow each `imgs` array from its first element: (image count, laid out as expected).

    An element is read as 8 bytes: type, one-character key ("0" ... "9"), the key's NUL, the embedded length.
    """
    count, ok = np.zeros(len(first), dtype=np.int64), np.ones(len(first), dtype=bool)
    live, at, value = np.arange(len(first)), first, first_value
    for step in range(_MAX_IMAGES_FAST + 1):
        done = at == array_end[live] - 1  # the array's final NUL (checked with the tail)
        live, at = live[~done], at[~done]
        if not len(live):
            return count, ok
        # Later elements are read from the file; positions come from the data, so clip (masks drop bad reads).
        value = value[~done] if step == 0 else file_ints[np.clip(at, 0, len(file_ints) - 1)]
        size = (value >> 24).astype(np.int32).astype(np.int64)
        after = at + 3 + size
        image = ((value & 0xFF) == 0x03) & (((value >> 16) & 0xFF) == 0) & (size >= 5) & (after < array_end[live])
        ok[live[~image]] = False
        live, at = live[image], after[image]
        count[live] += 1
    ok[live] = False  # more images than the fast path follows: decoded in full
    return count, ok


def _tail(tails: np.ndarray, array_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What follows `imgs` in the last 32 bytes: (category_id or -1, laid out as expected).

    `array_end` is relative to the document's end: -1 when the document ends with the array, -18 (-22) when an
    int32 (int64) `category_id` follows it; the byte before `array_end` is the array's own final NUL.
    """

    def byte(at: int) -> np.ndarray:
        return _column(tails, at, "u1")

    def category(at: int, kind: int) -> np.ndarray:  # `at`: column of the element's type byte
        named = (_column(tails, at + 1, "<i8") == _CATEGORY_KEY) & (_column(tails, at + 9, "<i4") == _ID_NAME_KEY)
        return (array_end == at - _TAIL) & (byte(at) == kind) & named & (byte(at - 1) == 0)

    narrow, wide = category(_TAIL - 18, 0x10), category(_TAIL - 22, 0x12)
    bare = (array_end == -1) & (byte(_TAIL - 2) == 0)
    category_id = np.where(narrow, _column(tails, _TAIL - 5, "<i4"), -1)
    category_id = np.where(wide, _column(tails, _TAIL - 9, "<i8"), category_id)
    return category_id, bare | narrow | wide


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _slow_fields(
    buf: mmap.mmap | bytes, offset: int, length: int, keep_damaged: bool = False
) -> tuple[int, int, int | None, str | None]:
    """Full decode of one document: (product_id, num_images, category_id or None, what was set aside or None).

    With `keep_damaged`, an `imgs` or `category_id` of the wrong type is set aside (0 images, no category) and
    named instead of rejecting the product: only an unreadable `_id` costs a test file its row.
    """
    document = bson.decode(buf[offset : offset + length])
    if "_id" not in document:
        raise _Damage("missing_field", "document has no _id")
    product_id = document["_id"]
    if not _is_int(product_id):
        raise _Damage("bad_field", f"_id is {type(product_id).__name__}, expected an integer")
    notes = []
    # A missing `imgs` is a product without pictures (the catalog decides what to do with those), not damage.
    images = document.get("imgs", [])
    if not isinstance(images, list):
        notes.append(f"imgs is {type(images).__name__}, expected an array")
        images = []
    category = document.get("category_id")
    if category is not None and not _is_int(category):
        notes.append(f"category_id is {type(category).__name__}, expected an integer")
        category = None
    if notes and not keep_damaged:
        raise _Damage("bad_field", f"product {product_id}: {'; '.join(notes)}")
    note = f"{'; '.join(notes)} (product kept without it)" if notes else None
    return int(product_id), len(images), None if category is None else int(category), note


def _readable_id(buf: mmap.mmap | bytes, offset: int, length: int) -> int | None:
    """The `_id` of a document that does not decode, when it is the first element and intact (Kaggle's layout)."""
    kind = buf[offset + 4] if length > 4 else 0
    width = 8 if kind == 0x12 else 4 if kind == 0x10 else 0
    if not width or length < 9 + width + 1 or bytes(buf[offset + 5 : offset + 9]) != b"_id\x00":
        return None
    return int.from_bytes(buf[offset + 9 : offset + 9 + width], "little", signed=True)


def index_bson(path: str | Path, strict: bool = False, keep_damaged: bool = False) -> BsonIndex:
    """Index every document of a Kaggle BSON file. Damaged documents are skipped and listed in `problems`.

    `strict` raises `BsonDamageError` for the first problem by offset (after the whole scan) instead.
    `keep_damaged` (test files: a submission needs a row for every product) keeps a row for every document whose
    `_id` is readable: one that does not decode gets 0 images, a wrong-typed `imgs` or `category_id` is set aside;
    each is still listed in `problems`, with its product id.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: BSON file not found")
    size = path.stat().st_size
    problems: list[BsonProblem] = []
    if size == 0:
        return _empty_index(path, problems)
    name = str(path)
    with open(path, "rb") as handle:
        buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            fields = _index_mapped(buf, size, name, problems, keep_damaged)
        finally:
            try:
                buf.close()
            except BufferError:  # an exception's traceback still holds a view; the map goes when it does
                pass
    problems = _drop_artifacts(problems, fields["offset"], fields["length"])
    if strict and problems:
        raise BsonDamageError(problems[0])
    category_id = fields["category_id"]
    return BsonIndex(
        path=name,
        product_id=fields["product_id"],
        offset=fields["offset"],
        length=fields["length"].astype(np.int32),
        num_images=_capped_images(fields, name, problems),
        category_id=category_id,
        has_category=bool(np.any(category_id >= 0)),
        problems=problems,
        file_size=size,
    )


def _capped_images(fields: dict[str, np.ndarray], path: str, problems: list[BsonProblem]) -> np.ndarray:
    """Image counts as int16; a product with more than `MAX_IMAGES` keeps its first ones and is reported."""
    counts = fields["num_images"]
    for row in np.flatnonzero(counts > MAX_IMAGES):
        reason = f"{int(counts[row])} pictures; the first {MAX_IMAGES} are kept"
        offset, product_id = int(fields["offset"][row]), int(fields["product_id"][row])
        problems.append(BsonProblem(path, offset, "too_many_images", reason, product_id))
    problems.sort(key=lambda p: p.offset)
    return np.minimum(counts, MAX_IMAGES).astype(np.int16)


def _index_mapped(
    buf: mmap.mmap, size: int, path: str, problems: list[BsonProblem], keep_damaged: bool = False
) -> dict[str, np.ndarray]:
    offsets, lengths, parsed = _walk_offsets(buf, size, path, problems)
    if parsed is not None:
        fields = parsed
    elif size >= _HEAD + _TAIL:
        fields = _fast_fields(buf, size, offsets, lengths)
    else:  # too small for the windows; whatever is there goes through the full decoder
        fields = _fast_fields_none(len(offsets))
    fields["offset"], fields["length"] = offsets, lengths
    return _slow_pass(buf, size, path, fields, problems, keep_damaged)


def _fast_fields_none(n: int) -> dict[str, np.ndarray]:
    """Fields of `n` documents that the fast path has not read (all flagged for the full decoder)."""
    return {
        "ok": np.zeros(n, dtype=bool),
        "product_id": np.zeros(n, dtype=np.int64),
        "num_images": np.zeros(n, dtype=np.int64),
        "category_id": np.full(n, -1, dtype=np.int64),
    }


def _slow_pass(
    buf: mmap.mmap,
    size: int,
    path: str,
    fields: dict[str, np.ndarray],
    problems: list[BsonProblem],
    keep_damaged: bool = False,
) -> dict[str, np.ndarray]:
    """Decode in full what the fast path could not read; look inside frames that fail for swallowed documents.

    Returns the kept rows, sorted by offset.
    """
    offsets, keep = fields["offset"], fields["ok"].copy()
    hidden: dict[int, tuple[int, int, int, int] | None] = {}  # offset -> fields of a recovered document, or None

    def known(pos: int) -> bool:
        at = int(np.searchsorted(offsets, pos))
        return (at < len(offsets) and int(offsets[at]) == pos) or pos in hidden

    work = [(int(offsets[row]), int(fields["length"][row]), int(row)) for row in np.flatnonzero(~keep)]
    while work:
        offset, length, row = work.pop()
        try:
            product_id, num_images, category, note = _slow_fields(buf, offset, length, keep_damaged)
        except Exception as error:  # noqa: BLE001 - pymongo raises several types for corrupt input
            frames = _rescan(buf, size, offset + 1, known, path, problems)
            hidden.update((frame_offset, None) for frame_offset, _ in frames)
            work += [(frame_offset, frame_length, -1) for frame_offset, frame_length in frames]
            problem = _failure(path, offset, length, error, len(frames))
            product_id = _readable_id(buf, offset, length) if keep_damaged else None
            if product_id is None:
                problems.append(problem)
                continue
            # The product keeps its row, without pictures, up to the first document it swallowed.
            length = min([length] + [frame_offset - offset for frame_offset, _ in frames])
            reason = f"{problem.reason} (product kept with no pictures: its _id is readable)"
            problems.append(dataclasses.replace(problem, reason=reason, product_id=product_id))
            num_images, category, note = 0, None, None
        if note is not None:
            problems.append(BsonProblem(path, offset, "bad_field", note, product_id))
        category = -1 if category is None else category
        if row >= 0:
            keep[row] = True
            fields["product_id"][row], fields["category_id"][row] = product_id, category
            fields["num_images"][row], fields["length"][row] = num_images, length
        else:
            hidden[offset] = (length, product_id, num_images, category)
    columns = ("offset", "length", "product_id", "num_images", "category_id")
    every = bool(keep.all())  # the usual case: no copies
    result = {column: fields[column] if every else fields[column][keep] for column in columns}
    recovered = [(offset, *values) for offset, values in hidden.items() if values is not None]
    if recovered:
        extra = np.array(recovered, dtype=np.int64)
        result = {column: np.concatenate([result[column], extra[:, i]]) for i, column in enumerate(columns)}
        order = np.argsort(result["offset"], kind="stable")
        result = {column: values[order] for column, values in result.items()}
    return result


def _rescan(
    buf: mmap.mmap, size: int, start: int, known: Callable[[int], bool], path: str, problems: list[BsonProblem]
) -> list[tuple[int, int]]:
    """Walk again from the first decodable document after `start` until the walk rejoins the known chain.

    A corrupted length prefix that happens to end on a NUL byte frames several documents as one; the frame fails
    to decode, and this finds the documents it swallowed.
    """
    frames: list[tuple[int, int]] = []
    pos = _resync(buf, size, start)
    while pos <= size - 4 and not known(pos):
        (length,) = _INT32.unpack_from(buf, pos)
        if length >= _MIN_DOC and pos + length <= size and buf[pos + length - 1] == 0:
            frames.append((pos, length))
            pos += length
        else:
            pos = _skip_damage(buf, size, pos, path, problems)
    return frames


def _failure(path: str, offset: int, length: int, error: Exception, hidden: int) -> BsonProblem:
    if hidden:
        return BsonProblem(
            path,
            offset,
            "bad_length",
            f"length prefix {length} swallows the documents after it ({hidden} recovered by resynchronising)",
        )
    if isinstance(error, _Damage):
        return BsonProblem(path, offset, error.kind, error.reason)
    return BsonProblem(path, offset, "decode_error", f"{type(error).__name__}: {error}")


def _drop_artifacts(problems: list[BsonProblem], offsets: np.ndarray, lengths: np.ndarray) -> list[BsonProblem]:
    """Sort by offset, dropping repeats and reports from strictly inside a kept document (an out-of-step walk)."""
    kept: dict[tuple[int, str], BsonProblem] = {}  # a rescan may meet damage the walk reported already
    for problem in sorted(problems, key=lambda p: p.offset):
        at = int(np.searchsorted(offsets, problem.offset, side="right")) - 1
        if not (at >= 0 and offsets[at] < problem.offset < offsets[at] + lengths[at]):
            kept.setdefault((problem.offset, problem.kind), problem)
    return list(kept.values())


def _empty_index(path: Path, problems: list[BsonProblem]) -> BsonIndex:
    empty = np.zeros(0, dtype=np.int64)
    return BsonIndex(
        str(path.resolve()), empty, empty, empty.astype(np.int32), empty.astype(np.int16), empty, False, problems, 0
    )


class BsonReader:
    """O(1) random access to products of one BSON file by (offset, length) from the catalog."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handle = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._map = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_READ) if self.path.stat().st_size else None

    def document(self, offset: int, length: int) -> dict:
        """The decoded document; `BsonDamageError` (a ValueError) names file and offset when it does not decode."""
        if self._map is None or offset < 0 or length < _MIN_DOC or offset + length > len(self._map):
            raise ValueError(f"{self.path}: no document at byte {offset} (+{length})")
        try:
            return bson.decode(self._map[offset : offset + length])
        except Exception as error:  # noqa: BLE001 - pymongo raises several types for corrupt input
            problem = BsonProblem(str(self.path), offset, "decode_error", f"{type(error).__name__}: {error}")
            raise BsonDamageError(problem) from error

    def pictures(self, offset: int, length: int) -> list[bytes]:
        """The raw picture bytes of one product, in stored order.

        Read picture by picture: one that is not binary (a `str`, a number, a missing field) comes back as b""
        (so indices stay aligned and decoding reports it "empty") and is logged with file, offset and index; the
        product's other pictures are kept.
        """
        images = self.document(offset, length).get("imgs") or []
        if not isinstance(images, list):
            _warn_picture(self.path, offset, None, f"imgs is {type(images).__name__}, expected an array")
            return []
        return [self._picture(image, offset, index) for index, image in enumerate(images)]

    def _picture(self, image: object, offset: int, index: int) -> bytes:
        picture = image.get("picture") if isinstance(image, dict) else None
        if isinstance(picture, bytes | bytearray | memoryview):
            return bytes(picture)
        found = type(image).__name__ if not isinstance(image, dict) else f"picture {type(picture).__name__}"
        _warn_picture(self.path, offset, index, f"{found}, expected binary picture bytes; skipped")
        return b""

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._handle.close()

    def __enter__(self) -> BsonReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Readers are handed to DataLoader workers: reopen the map in each process instead of pickling it.
    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


def _warn_picture(path: Path, offset: int, index: int | None, message: str) -> None:
    from prodcat.utils import get_logger

    where = f"picture {index}" if index is not None else "pictures"
    get_logger("prodcat.data").warning("%s: product at byte %d, %s: %s", path, offset, where, message)


# -- where the pictures are ---------------------------------------------------------------------------------------
_BINARY, _DOCUMENT, _ARRAY = 0x05, 0x03, 0x04
_FIXED_SIZES = {0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16, 0x7F: 0, 0xFF: 0}


@dataclasses.dataclass
class PictureSpans:
    """Every picture of the indexed documents, document by document in stored order."""

    document: np.ndarray  # int64 row of the document in the offsets given
    image_index: np.ndarray  # int16 position in its `imgs` array
    offset: np.ndarray  # int64 absolute byte offset of the picture's bytes in the file
    length: np.ndarray  # int32
    # (document row, reason) of each document whose structure does not parse (damage: its spans are a best guess)
    damaged: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.document)


def picture_spans(buf: mmap.mmap | bytes, offsets: np.ndarray, lengths: np.ndarray, counts: np.ndarray) -> PictureSpans:
    """Byte range of every `imgs[i].picture` of the documents at `offsets` (with `counts` images each, as indexed).

    A document's rows follow its own `imgs` array (the compiled walk for Kaggle's layout, `_spans_python` for any
    other); an element without a binary `picture` gets offset -1, length 0.
    """
    offsets, lengths, counts, first = span_inputs(offsets, lengths, counts)
    out_offset, out_length = np.full(first[-1], -1, dtype=np.int64), np.zeros(first[-1], dtype=np.int64)
    ok = np.zeros(len(offsets), dtype=bool)
    if bson_scan.spans is not None and len(offsets):
        view = np.frombuffer(buf, dtype=np.uint8)
        try:
            bson_scan.spans(view, offsets, lengths, counts, first, out_offset, out_length, ok, bson_scan.SPAN_KEYS)
        finally:
            del view
    return finish_spans(buf, offsets, lengths, counts, first, out_offset, out_length, ok)


def span_inputs(offsets: np.ndarray, lengths: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, ...]:
    """int64 offsets, lengths, counts and each document's first output row (plus the total at the end)."""
    offsets, lengths = np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    counts = np.maximum(np.asarray(counts, dtype=np.int64), 0)
    return offsets, lengths, counts, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def finish_spans(
    buf: mmap.mmap | bytes,
    offsets: np.ndarray,
    lengths: np.ndarray,
    counts: np.ndarray,
    first: np.ndarray,
    out_offset: np.ndarray,
    out_length: np.ndarray,
    ok: np.ndarray,
) -> PictureSpans:
    """The spans the compiled walk found, with the documents it flagged (`ok` False) walked again in Python."""
    document = np.repeat(np.arange(len(offsets), dtype=np.int64), counts)
    image_index = np.arange(first[-1], dtype=np.int64) - first[:-1][document]
    spans = PictureSpans(document, image_index.astype(np.int16), out_offset, out_length.astype(np.int32))
    flagged = np.flatnonzero(~ok)
    return _respan(buf, offsets, lengths, spans, ok, flagged) if len(flagged) else spans


def _respan(
    buf: mmap.mmap | bytes,
    offsets: np.ndarray,
    lengths: np.ndarray,
    spans: PictureSpans,
    ok: np.ndarray,
    rows: np.ndarray,
) -> PictureSpans:
    """Replace the rows of the flagged documents with what the Python walker finds (their counts may differ).

    Flagged documents are few in Kaggle's files (other layouts, and damage inside `imgs`), so each is also checked
    by pymongo's decoder: one that does not decode is listed in `damaged`.
    """
    found = [_spans_python(buf, int(offsets[row]), int(lengths[row]))[:MAX_IMAGES] for row in rows]
    damaged = [(int(row), why) for row in rows if (why := _structure_error(buf, int(offsets[row]), int(lengths[row])))]
    keep = ok[spans.document]
    extra = np.array([(row, i, at, size) for row, items in zip(rows, found) for i, (at, size) in enumerate(items)])
    extra = extra.reshape(-1, 4).astype(np.int64)
    document = np.concatenate([spans.document[keep], extra[:, 0]])
    order = np.argsort(document, kind="stable")  # each document's rows stay in image order
    return PictureSpans(
        document=document[order],
        image_index=np.concatenate([spans.image_index[keep], extra[:, 1].astype(np.int16)])[order],
        offset=np.concatenate([spans.offset[keep], extra[:, 2]])[order],
        length=np.concatenate([spans.length[keep], extra[:, 3].astype(np.int32)])[order],
        damaged=damaged,
    )


def _structure_error(buf: mmap.mmap | bytes, offset: int, length: int) -> str | None:
    """Why the document's element types and lengths do not parse (pymongo's decoder, pictures not decoded), or None.

    The message names the first `imgs` element the Python walker cannot follow, when it finds one.
    """
    try:
        bson.decode(buf[offset : offset + length])
        return None
    except Exception as error:  # noqa: BLE001 - pymongo raises several types for corrupt input
        where = _first_bad_image(buf, offset, length)
        return f"{where}does not parse: {type(error).__name__}: {error}"


def _first_bad_image(buf: mmap.mmap | bytes, offset: int, length: int) -> str:
    """'imgs[i] at byte N ' for the first `imgs` element whose header or length is wrong, else ''."""
    try:
        for kind, name, value, _ in _elements(buf, offset + 4, offset + length - 1):
            if name == b"imgs" and kind in (_ARRAY, _DOCUMENT):
                at, end = value + 4, _end(buf, value)
                for index in itertools.count():
                    if at >= end:
                        return ""
                    start = at
                    try:
                        image_kind, _, image_at, at = next(_elements(buf, at, end))
                        if image_kind != _DOCUMENT or at > end or buf[at - 1] != 0:
                            return f"imgs[{index}] at byte {start} "
                        list(_elements(buf, image_at + 4, at - 1))
                    except (ValueError, IndexError, struct.error, StopIteration):
                        return f"imgs[{index}] at byte {start} "
    except (ValueError, IndexError, struct.error):
        pass
    return ""


def _spans_python(buf: mmap.mmap | bytes, offset: int, length: int) -> list[tuple[int, int]]:
    """(absolute offset, length) of each `imgs` element's binary `picture`, any BSON layout; [] if unreadable."""
    try:
        for kind, name, value, _ in _elements(buf, offset + 4, offset + length - 1):
            if name == b"imgs" and kind in (_ARRAY, _DOCUMENT):
                images = _elements(buf, value + 4, _end(buf, value))
                return [_picture_in(buf, image_kind, image_at) for image_kind, _, image_at, _ in images]
    except (ValueError, IndexError, struct.error):
        pass
    return []


def _picture_in(buf: mmap.mmap | bytes, kind: int, at: int) -> tuple[int, int]:
    if kind == _DOCUMENT:
        for field_kind, name, value, _ in _elements(buf, at + 4, _end(buf, at)):
            if name == b"picture" and field_kind == _BINARY:
                (size,) = _INT32.unpack_from(buf, value)
                skip = 4 if buf[value + 4] == 0x02 else 0  # the old binary subtype nests a second length
                return value + 5 + skip, size - skip
    return -1, 0


def _end(buf: mmap.mmap | bytes, at: int) -> int:
    (size,) = _INT32.unpack_from(buf, at)
    return at + size - 1


def _elements(buf: mmap.mmap | bytes, at: int, end: int) -> Iterator[tuple[int, bytes, int, int]]:
    """(type, name, value offset, next element offset) of each element from `at` to the document's final NUL."""
    while at < end:
        kind, name_end = buf[at], buf.find(b"\x00", at + 1, end)
        if name_end < 0:
            raise ValueError(f"element name at byte {at} has no NUL")
        value = name_end + 1
        if kind in _FIXED_SIZES:
            size = _FIXED_SIZES[kind]
        elif kind in (0x02, 0x0D, 0x0E):  # strings: int32 length then the bytes
            size = 4 + _INT32.unpack_from(buf, value)[0]
        elif kind in (_DOCUMENT, _ARRAY, 0x0F):
            size = _INT32.unpack_from(buf, value)[0]
        elif kind == _BINARY:
            size = 5 + _INT32.unpack_from(buf, value)[0]
        else:
            raise ValueError(f"BSON type {kind:#x} not walked")
        yield kind, bytes(buf[at + 1 : name_end]), value, value + size
        at = value + size


def read_pictures(path: str | Path, offset: int, length: int) -> list[bytes]:
    with BsonReader(path) as reader:
        return reader.pictures(offset, length)
