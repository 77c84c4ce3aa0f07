"""Index Kaggle's Cdiscount BSON files without decoding pictures, and read products back by offset.

A BSON file is a sequence of documents, each prefixed by its int32 little-endian length. Kaggle's documents are
`{_id: int32|int64, imgs: [{picture: binary}, ...], category_id: int32}` (test files lack `category_id`).

Speed: the offset chain is walked in a tight loop (one int read per document), then the fields of all documents
with Kaggle's layout are read at once with numpy from the memory-mapped file; only documents with another layout
go through pymongo's full decoder. Pictures are never touched, so ingest costs a few page reads per product.
Damage never stops the scan: a document that does not decode is reported and skipped, and a broken length prefix
is bridged by searching for the next document that decodes.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from pathlib import Path

import bson
import numpy as np

__all__ = ["BsonIndex", "BsonProblem", "BsonReader", "index_bson", "read_pictures"]

_ID_INT32 = b"\x10_id\x00"
_ID_INT64 = b"\x12_id\x00"
_IMGS = b"\x04imgs\x00"
_CATEGORY = b"category_id\x00"
_MIN_DOC = 5
_MAX_IMAGES_FAST = 10  # single-digit array keys; longer arrays take the slow path


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
    num_images: np.ndarray  # int8
    category_id: np.ndarray  # int64, -1 where the document has none (test files)
    has_category: bool
    problems: list[BsonProblem]
    file_size: int

    def __len__(self) -> int:
        return len(self.product_id)


class _Damage(Exception):
    def __init__(self, offset: int, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.offset, self.kind, self.reason = offset, kind, reason


def _walk_offsets(buf: mmap.mmap | bytes, size: int, path: str, strict: bool,
                  problems: list[BsonProblem]) -> tuple[list[int], list[int]]:
    """Follow the length prefixes; on damage record it and resynchronise on the next decodable document."""
    offsets: list[int] = []
    lengths: list[int] = []
    unpack = struct.Struct("<i").unpack_from
    pos = 0
    while pos < size:
        if size - pos < 4:
            _report(problems, strict, BsonProblem(path, pos, "trailing_bytes",
                                                  f"{size - pos} bytes left after the last document"))
            break
        (length,) = unpack(buf, pos)
        end = pos + length
        if length >= _MIN_DOC and end <= size and buf[end - 1] == 0:
            offsets.append(pos)
            lengths.append(length)
            pos = end
            continue
        if length >= _MIN_DOC and end > size:
            kind, reason = "truncated", f"length prefix {length} runs past the end of the file ({size} bytes)"
        else:
            kind, reason = "bad_length", f"length prefix {length} does not frame a BSON document"
        _report(problems, strict, BsonProblem(path, pos, kind, reason))
        pos = _resync(buf, size, pos + 1)
    return offsets, lengths


def _resync(buf: mmap.mmap | bytes, size: int, start: int) -> int:
    """Offset of the next document that decodes (searching for an `_id` first field), or `size`."""
    unpack = struct.Struct("<i").unpack_from
    pos = start
    while True:
        hits = [h for h in (buf.find(_ID_INT32, pos), buf.find(_ID_INT64, pos)) if h >= 0]
        if not hits:
            return size
        hit = min(hits)
        candidate = hit - 4
        if candidate >= start:
            (length,) = unpack(buf, candidate)
            if _MIN_DOC <= length <= size - candidate and buf[candidate + length - 1] == 0:
                try:
                    bson.decode(bytes(buf[candidate:candidate + length]))
                    return candidate
                except Exception:  # noqa: BLE001 - any decode failure means "not a document start"
                    pass
        pos = hit + 1


def _report(problems: list[BsonProblem], strict: bool, problem: BsonProblem) -> None:
    if strict:
        raise BsonDamageError(problem)
    problems.append(problem)


class BsonDamageError(ValueError):
    """Raised in strict mode at the first damaged document."""

    def __init__(self, problem: BsonProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def _fast_fields(view: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
    """Read _id, image count and category_id of every document laid out like Kaggle's; flag the others."""
    n = len(offsets)
    ok = np.ones(n, dtype=bool)
    # First element must be `_id`, int32 or int64.
    type_id = view[offsets + 4]
    ok &= (type_id == 0x10) | (type_id == 0x12)
    for k, byte in enumerate(b"_id\x00"):
        ok &= view[np.minimum(offsets + 5 + k, len(view) - 1)] == byte
    id_width = np.where(type_id == 0x12, 8, 4)
    product_id = _read_ints(view, offsets + 9, id_width, ok)
    imgs_at = offsets + 9 + id_width
    ok &= imgs_at + 10 <= offsets + lengths
    for k, byte in enumerate(_IMGS):
        ok &= view[np.minimum(imgs_at + k, len(view) - 1)] == byte
    array_at = imgs_at + len(_IMGS)
    array_len = _read_ints(view, array_at, np.full(n, 4), ok)
    array_end = array_at + array_len  # one past the array's terminating NUL
    ok &= (array_len >= 5) & (array_end <= offsets + lengths)
    num_images = np.zeros(n, dtype=np.int64)
    cursor = array_at + 4
    active = ok.copy()
    for _ in range(_MAX_IMAGES_FAST + 1):
        element = view[np.minimum(cursor, len(view) - 1)]
        done = active & (element == 0) & (cursor == array_end - 1)
        active &= ~done
        # Array elements must be embedded documents with one-digit keys ("0\0" ... "9\0").
        good = active & (element == 0x03) & (view[np.minimum(cursor + 2, len(view) - 1)] == 0)
        ok &= ~(active & ~good)
        active &= good
        if not active.any():
            break
        doc_len = _read_ints(view, cursor + 3, np.full(n, 4), active)
        cursor = np.where(active, cursor + 3 + doc_len, cursor)
        num_images += active
        ok &= ~(active & ((doc_len < 5) | (cursor > array_end - 1)))
        active &= ok
    ok &= ~active  # more images than the fast path follows: decode those in full
    # After the array: either the document's terminator, or category_id then the terminator.
    doc_end = offsets + lengths - 1
    tail_type = view[np.minimum(array_end, len(view) - 1)]
    no_category = ok & (array_end == doc_end)
    with_category = ok & ~no_category & ((tail_type == 0x10) | (tail_type == 0x12))
    for k, byte in enumerate(_CATEGORY):
        with_category &= view[np.minimum(array_end + 1 + k, len(view) - 1)] == byte
    cat_width = np.where(tail_type == 0x12, 8, 4)
    with_category &= array_end + 1 + len(_CATEGORY) + cat_width == doc_end
    category_id = np.where(with_category, _read_ints(view, array_end + 1 + len(_CATEGORY), cat_width,
                                                     with_category), -1)
    ok &= no_category | with_category
    return {"ok": ok, "product_id": product_id, "num_images": num_images, "category_id": category_id,
            "has_category": with_category}


def _read_ints(view: np.ndarray, at: np.ndarray, width: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Little-endian signed ints of width 4 or 8 at each position (0 where mask is False)."""
    result = np.zeros(len(at), dtype=np.int64)
    limit = len(view) - 1
    for nbytes, dtype in ((4, "<i4"), (8, "<i8")):
        rows = np.flatnonzero(mask & (width == nbytes) & (at + nbytes - 1 <= limit))
        if len(rows):
            gather = at[rows, None] + np.arange(nbytes)
            result[rows] = view[gather].copy().view(dtype).reshape(-1)
    return result


def _slow_fields(buf: mmap.mmap | bytes, offset: int, length: int) -> tuple[int, int, int | None]:
    """Full decode of one document: (product_id, num_images, category_id or None)."""
    document = bson.decode(bytes(buf[offset:offset + length]))
    if "_id" not in document:
        raise _Damage(offset, "missing_field", "document has no _id")
    product_id = int(document["_id"])
    images = document.get("imgs")
    if not isinstance(images, list):
        raise _Damage(offset, "missing_field", f"product {product_id}: `imgs` missing or not a list")
    category = document.get("category_id")
    return product_id, len(images), None if category is None else int(category)


def index_bson(path: str | Path, strict: bool = False) -> BsonIndex:
    """Index every document of a Kaggle BSON file. Damaged documents are skipped and listed in `problems`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: BSON file not found")
    size = path.stat().st_size
    problems: list[BsonProblem] = []
    if size == 0:
        return _empty_index(path, problems)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        offsets_list, lengths_list = _walk_offsets(buf, size, str(path), strict, problems)
        offsets = np.asarray(offsets_list, dtype=np.int64)
        lengths = np.asarray(lengths_list, dtype=np.int64)
        view = np.frombuffer(buf, dtype=np.uint8)
        try:
            fields = _fast_fields(view, offsets, lengths)
            keep = fields["ok"].copy()
            for row in np.flatnonzero(~fields["ok"]):
                keep[row] = _decode_slow(buf, int(offsets[row]), int(lengths[row]), fields, row, str(path),
                                         strict, problems)
        finally:
            del view  # release the buffer export before the mmap closes
    problems.sort(key=lambda p: p.offset)
    has_category = bool(np.any(fields["category_id"][keep] >= 0)) if keep.any() else False
    return BsonIndex(path=str(path.resolve()), product_id=fields["product_id"][keep], offset=offsets[keep],
                     length=lengths[keep].astype(np.int32), num_images=fields["num_images"][keep].astype(np.int8),
                     category_id=fields["category_id"][keep], has_category=has_category, problems=problems,
                     file_size=size)


def _decode_slow(buf: mmap.mmap, offset: int, length: int, fields: dict[str, np.ndarray], row: int, path: str,
                 strict: bool, problems: list[BsonProblem]) -> bool:
    try:
        product_id, num_images, category = _slow_fields(buf, offset, length)
    except _Damage as damage:
        _report(problems, strict, BsonProblem(path, damage.offset, damage.kind, damage.reason))
        return False
    except Exception as error:  # noqa: BLE001 - pymongo raises several types for corrupt input
        _report(problems, strict, BsonProblem(path, offset, "decode_error", f"{type(error).__name__}: {error}"))
        return False
    fields["product_id"][row] = product_id
    fields["num_images"][row] = min(num_images, 127)
    fields["category_id"][row] = -1 if category is None else category
    return True


def _empty_index(path: Path, problems: list[BsonProblem]) -> BsonIndex:
    empty = np.zeros(0, dtype=np.int64)
    return BsonIndex(str(path.resolve()), empty, empty, empty.astype(np.int32), empty.astype(np.int8), empty,
                     False, problems, 0)


class BsonReader:
    """O(1) random access to products of one BSON file by (offset, length) from the catalog."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handle = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._map = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_READ) if self.path.stat().st_size else None

    def document(self, offset: int, length: int) -> dict:
        if self._map is None or offset < 0 or offset + length > len(self._map):
            raise ValueError(f"{self.path}: no document at byte {offset} (+{length})")
        return bson.decode(self._map[offset:offset + length])

    def pictures(self, offset: int, length: int) -> list[bytes]:
        """The raw picture bytes of one product, in stored order."""
        images = self.document(offset, length).get("imgs") or []
        return [bytes(image.get("picture", b"")) if isinstance(image, dict) else b"" for image in images]

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


def read_pictures(path: str | Path, offset: int, length: int) -> list[bytes]:
    with BsonReader(path) as reader:
        return reader.pictures(offset, length)
