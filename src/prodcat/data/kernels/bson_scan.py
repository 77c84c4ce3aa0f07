"""Compiled passes over a BSON file's bytes: frame and parse Kaggle's documents, find their pictures.

`walk` frames documents by their length prefixes and parses each one's Kaggle fields while its pages are hot;
`parse_all` parses documents already framed; `spans` (per document: `span_one`) finds the byte range of every
picture from element headers alone. Each reads a uint8 view of the file and writes into arrays the caller owns;
`data/bson_index.py` decides when to use them and handles everything they flag. Every name is None without numba.

Module-level functions (not closures), so numba's on-disk cache holds them across processes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FIELD_NAMES", "SPAN_KEYS", "parse_all", "span_one", "spans", "walk"]

# The element names `parse` compares: `_id`, the `imgs` array header, `category_id`.
FIELD_NAMES = tuple(np.frombuffer(name, dtype=np.uint8) for name in (b"_id\x00", b"\x04imgs\x00", b"category_id\x00"))
# The names `span_one` compares: the `imgs` array header and each element's `picture` key.
SPAN_KEYS = (np.frombuffer(b"\x04imgs\x00", dtype=np.uint8), np.frombuffer(b"picture\x00", dtype=np.uint8))

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; bson_index falls back to Python and numpy
    numba = None

if numba is not None:
    _jit = numba.njit(cache=True, nogil=True)

    @_jit
    def _le(view: np.ndarray, at: int, width: int) -> int:
        """Little-endian signed int of `width` (4 or 8) bytes at `at`."""
        value = 0
        for k in range(width):
            value |= np.int64(view[at + k]) << (8 * k)
        if width == 4 and value >= 2**31:
            value -= 2**32
        return value

    @_jit
    def _le32(view: np.ndarray, at: int) -> int:
        """Little-endian int32 at `at`, unrolled (the span walk reads several per picture)."""
        value = np.int64(view[at]) | np.int64(view[at + 1]) << 8 | np.int64(view[at + 2]) << 16
        value |= np.int64(view[at + 3]) << 24
        return value - (1 << 32) if value >= 1 << 31 else value

    @_jit
    def _same(view: np.ndarray, at: int, expected: np.ndarray) -> bool:
        for k in range(expected.shape[0]):
            if view[at + k] != expected[k]:
                return False
        return True

    @_jit
    def _parse(view: np.ndarray, start: int, end: int, names: tuple, row: int, out: tuple) -> None:
        """out[*][row] = Kaggle fields of the document at [start, end), or ok[row] False for the full decoder.

        The same decisions as bson_index's numpy `_fast_chunk` (a test holds them equal): Kaggle's layout only,
        at most 10 images, anything else flagged.
        """
        ok, product_id, num_images, category_id = out
        ok[row] = False
        size = view.shape[0]
        if start + 40 > size or end < 32:  # the numpy version's head/tail windows
            return
        kind = view[start + 4]
        if (kind != 0x10 and kind != 0x12) or not _same(view, start + 5, names[0]):
            return
        width = 8 if kind == 0x12 else 4
        if not _same(view, start + 9 + width, names[1]):
            return
        array_end = start + 15 + width + _le(view, start + 15 + width, 4)
        if array_end < start + 20 + width or array_end > end - 1:
            return
        at, count, good = start + 19 + width, 0, False
        for _ in range(11):
            if at == array_end - 1:
                good = True
                break
            if at + 8 > size:
                break
            picture = _le(view, at + 3, 4)
            after = at + 3 + picture
            if view[at] != 0x03 or view[at + 2] != 0 or picture < 5 or after >= array_end:
                break
            at, count = after, count + 1
        if not good:
            return
        category = -1
        if array_end - end == -1 and view[end - 2] == 0:
            pass
        elif (
            array_end - end == -18
            and view[end - 18] == 0x10
            and view[end - 19] == 0
            and _same(view, end - 17, names[2])
        ):
            category = _le(view, end - 5, 4)
        elif (
            array_end - end == -22
            and view[end - 22] == 0x12
            and view[end - 23] == 0
            and _same(view, end - 21, names[2])
        ):
            category = _le(view, end - 9, 8)
        else:
            return
        ok[row] = True
        product_id[row] = _le(view, start + 9, width)
        num_images[row] = count
        category_id[row] = category

    @_jit
    def walk(view: np.ndarray, pos: int, stop: int, starts: np.ndarray, names: tuple, out: tuple) -> tuple[int, int]:
        """Frame documents from `pos` (up to `stop` or len(starts) of them), parsing each: (count, where it ended).

        Framing and parsing in one pass: both are page/TLB bound (~0.26 us per document each in separate passes).
        """
        size, count = view.shape[0], 0
        while count < starts.shape[0] and pos < stop and pos + 4 <= size:
            length = _le(view, pos, 4)
            if length < 5 or pos + length > size or view[pos + length - 1] != 0:
                break
            starts[count] = pos
            _parse(view, pos, pos + length, names, count, out)
            count += 1
            pos += length
        return count, pos

    @_jit
    def parse_all(view: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, names: tuple, out: tuple) -> None:
        """`_parse` for every framed document."""
        for row in range(offsets.shape[0]):
            _parse(view, offsets[row], offsets[row] + lengths[row], names, row, out)

    @_jit
    def span_one(view, start, end, count, row, out_offset, out_length, keys) -> bool:
        """Byte ranges of the `count` pictures of one document in Kaggle's layout (`imgs` of `{picture: binary}`),
        written from output row `row`; False when its element headers and lengths do not add up.

        Reads only element headers: the pictures' own bytes stay untouched.
        """
        imgs, picture = keys
        at = start + 4 + 5 + (8 if view[start + 4] == 0x12 else 4)  # past `_id` (int32 or int64)
        if at + 10 > end or not _same(view, at, imgs):
            return False
        array_end = at + 6 + _le32(view, at + 6) - 1  # the array's final NUL
        at, found = at + 10, 0
        while at < array_end and found < count and view[at] == 0x03:
            at += 1
            while at < array_end and view[at] != 0:  # the element's key: "0", "1", ...
                at += 1
            head = at + 5  # `{picture: binary}`: length, 0x05, "picture\0", length, subtype, bytes, NUL
            if head + 14 > array_end:
                return False
            inner, binary, subtype = _le32(view, at + 1), _le32(view, head + 9), view[head + 13]
            if view[head] != 0x05 or inner != binary + 19 or not _same(view, head + 1, picture):
                return False
            if (subtype != 0 and subtype != 0x80) or head + 14 + binary >= array_end:
                return False
            if view[head + 14 + binary] != 0:  # the element's own final NUL (structure, not picture bytes)
                return False
            out_offset[row + found], out_length[row + found] = head + 14, binary
            at, found = at + 1 + inner, found + 1
        return found == count and at == array_end and array_end < end

    @_jit
    def spans(view, offsets, lengths, counts, first, out_offset, out_length, ok, keys) -> None:
        """`span_one` for every document; ok[doc] False where it does not hold (for the Python walker)."""
        for doc in range(offsets.shape[0]):
            end = offsets[doc] + lengths[doc]
            ok[doc] = end <= view.shape[0] and span_one(
                view, offsets[doc], end, counts[doc], first[doc], out_offset, out_length, keys
            )

else:  # pragma: no cover
    walk = parse_all = span_one = spans = None
