"""The numba kernels of data/kernels/ against their Python references (the walk and parse: test_bson_index.py)."""

from __future__ import annotations

import bson
import numpy as np
import pytest
import xxhash

from prodcat.data import bson_index
from prodcat.data.kernels import bson_scan, pictures, union, xxh3


def _documents(seed: int) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    """(buffer, offsets, lengths, image counts) of documents in Kaggle's layout and others, a few damaged."""
    rng = np.random.default_rng(seed)
    docs, counts = [], []
    for i in range(120):
        images = [{"picture": bson.Binary(rng.bytes(int(rng.integers(0, 600))))} for _ in range(i % 5)]
        doc: dict = {"_id": bson.Int64(i) if i % 3 == 0 else i, "imgs": images, "category_id": 1000 + i}
        if i % 11 == 0:
            doc = {"category_id": 7, "imgs": images, "_id": i}  # another field order: flagged for Python
        if i % 13 == 0 and images:
            images[0] = {"note": "x", "picture": images[0]["picture"]}  # another element layout
        encoded = bytearray(bson.encode(doc))
        if i % 17 == 0 and len(encoded) > 40:
            encoded[30] ^= 0xFF  # damage inside a well-framed document
        docs.append(bytes(encoded))
        counts.append(len(images))
    lengths = np.array([len(doc) for doc in docs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return b"".join(docs), offsets, lengths, np.array(counts, dtype=np.int64)


def _compiled_spans(buffer: bytes, offsets, lengths, counts) -> tuple[np.ndarray, ...]:
    offsets, lengths, counts, first = bson_index.span_inputs(offsets, lengths, counts)
    out_offset, out_length = np.full(first[-1], -1, dtype=np.int64), np.zeros(first[-1], dtype=np.int64)
    ok = np.zeros(len(offsets), dtype=bool)
    view = np.frombuffer(buffer, dtype=np.uint8)
    bson_scan.spans(view, offsets, lengths, counts, first, out_offset, out_length, ok, bson_scan.SPAN_KEYS)
    return first, out_offset, out_length, ok


@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_spans_equal_the_python_walker(seed: int) -> None:
    """Every document the kernel accepts gets the spans the Python walker finds; it flags exactly the other layouts."""
    if bson_scan.spans is None:
        pytest.skip("numba not installed: only the Python walker exists")
    buffer, offsets, lengths, counts = _documents(seed)
    first, out_offset, out_length, ok = _compiled_spans(buffer, offsets, lengths, counts)
    assert 0 < ok.sum() < len(ok)  # both kinds of document are present
    for doc in np.flatnonzero(ok):
        rows = slice(first[doc], first[doc + 1])
        found = list(zip(out_offset[rows].tolist(), out_length[rows].tolist()))
        assert found == bson_index._spans_python(buffer, int(offsets[doc]), int(lengths[doc])), doc
    number = np.arange(len(ok))
    other_layout = (number % 11 == 0) | ((number % 13 == 0) & (counts > 0))
    assert np.all(~ok[other_layout]) and np.all(ok[~other_layout & (number % 17 != 0)])  # only damage may go either way


def test_fused_spans_and_hashes_equal_spans_then_xxhash() -> None:
    """The fused pass writes the spans `bson_scan.spans` writes and XXH3-128 of every long picture among them."""
    if pictures.spans_and_hashes is None:
        pytest.skip("numba not installed")
    buffer, offsets, lengths, counts = _documents(2)
    first, out_offset, out_length, ok = _compiled_spans(buffer, offsets, lengths, counts)
    fused_offset, fused_length = np.full(first[-1], -1, dtype=np.int64), np.zeros(first[-1], dtype=np.int64)
    fused_ok, halves = np.zeros(len(offsets), dtype=bool), np.zeros((first[-1], 2), dtype=np.uint64)
    view = np.frombuffer(buffer, dtype=np.uint8)
    pictures.spans_and_hashes(
        view, offsets, lengths, counts, first[:-1], fused_offset, fused_length, fused_ok,
        bson_scan.SPAN_KEYS, xxh3.KEYS, xxh3.INIT, halves,
    )  # fmt: skip
    assert np.array_equal(fused_ok, ok)
    assert np.array_equal(fused_offset, out_offset) and np.array_equal(fused_length, out_length)
    hashed = np.repeat(ok, counts) & (out_length >= xxh3.LONG_MIN)
    assert hashed.sum() > 10
    for row in np.flatnonzero(hashed):
        piece = buffer[out_offset[row] : out_offset[row] + out_length[row]]
        assert halves[row].astype(">u8").tobytes() == xxhash.xxh3_128_digest(piece)
    assert not halves[~hashed].any()  # short pictures and flagged documents are left to xxhash


def test_compiled_union_equals_the_python_loop() -> None:
    rng = np.random.default_rng(0)
    products, pictures_count = 300, 900
    product_row = rng.integers(0, products, pictures_count)
    keys = rng.integers(0, 400, pictures_count)

    def run(kernel) -> np.ndarray:
        first = np.full(int(keys.max()) + 1, -1, dtype=np.int64)
        return kernel(np.arange(products, dtype=np.int64), product_row, keys, first)

    expected = run(union.union_python)
    assert len(np.unique(expected)) < products  # some products were joined
    assert np.all(expected <= np.arange(products)) and np.all(expected[expected] == expected)  # roots, smallest rows
    assert np.array_equal(run(union.union), expected)
