"""index_bson against pymongo's own decoder, on clean and damaged files; BsonReader reads products back."""

from __future__ import annotations

import pickle
from pathlib import Path

import bson
import numpy as np
import pytest

from prodcat.data.bson_index import BsonDamageError, BsonReader, index_bson, read_pictures
from prodcat.data.kernels import bson_scan


def truth(path: Path) -> list[tuple[int, int, int]]:
    """(product_id, num_images, category_id or -1) per document, from pymongo's reference decoder."""
    with open(path, "rb") as handle:
        return [
            (int(d["_id"]), len(d.get("imgs", [])), int(d.get("category_id", -1)))
            for d in bson.decode_file_iter(handle)
        ]


def rows(index) -> list[tuple[int, int, int]]:
    return list(zip(index.product_id.tolist(), index.num_images.tolist(), index.category_id.tolist(), strict=True))


def kinds(index) -> list[tuple[str, int]]:
    return [(problem.kind, problem.offset) for problem in index.problems]


def clean_docs(make_product, encode_reordered) -> list:
    """Every layout the fast and slow paths must agree on."""
    return [
        make_product(1, 1000010653, 1),  # int32 _id and category_id
        make_product(bson.Int64(2), 1000010653, 2),  # int64 _id
        make_product(3, bson.Int64(1000004079), 3),  # int64 category_id
        make_product(bson.Int64(2**40), bson.Int64(2**35), 4),  # both int64, values past int32
        make_product(-5, 7, 1),  # negative ids are still ids
        encode_reordered(make_product(6, 1000004079, 2)),  # `_id` last
        {"category_id": 1000010653, "_id": 7, "imgs": make_product(7, None, 1)["imgs"]},  # category before imgs
        make_product(8, 1000010653, 10),  # the most images the fast path follows
        make_product(9, 1000010653, 11),  # two-digit array keys: slow path
        make_product(10, 1000010653, 40),
        make_product(11, 1000010653, 0),  # no images: indexed, the catalog decides
        {"_id": 12, "category_id": 1000010653},  # no imgs field at all: zero images
        {**make_product(13, 1000010653, 1), "extra": "field"},  # extra field: slow path
    ]


def test_round_trip_matches_pymongo(tmp_path, write_bson, make_product, encode_reordered):
    path = tmp_path / "train.bson"
    frames = write_bson(path, clean_docs(make_product, encode_reordered))
    index = index_bson(path)
    assert index.problems == []
    assert rows(index) == truth(path)
    assert index.offset.tolist() == [offset for offset, _ in frames]
    assert index.length.tolist() == [length for _, length in frames]
    assert index.has_category and index.file_size == path.stat().st_size
    assert index.path == str(path.resolve())
    assert (index.product_id.dtype, index.offset.dtype, index.category_id.dtype) == (np.int64,) * 3


def test_test_file_has_no_category(tmp_path, write_bson, make_product):
    path = tmp_path / "test.bson"
    write_bson(path, [make_product(i, None, 1 + i % 4) for i in range(6)])
    index = index_bson(path)
    assert not index.has_category
    assert index.category_id.tolist() == [-1] * 6
    assert rows(index) == truth(path)


def test_random_layouts_match_pymongo(tmp_path, write_bson, make_product, encode_reordered):
    rng = np.random.default_rng(0)
    docs = []
    for product_id in range(300):
        wide = bson.Int64(product_id) if rng.random() < 0.3 else product_id
        category = [None, 5, bson.Int64(2**33 + product_id)][rng.integers(3)]
        doc = make_product(wide, category, int(rng.choice([0, 1, 2, 3, 4, 10, 11, 13])))
        docs.append(encode_reordered(doc) if rng.random() < 0.1 else doc)
    path = tmp_path / "mixed.bson"
    write_bson(path, docs)
    index = index_bson(path)
    assert index.problems == []
    assert rows(index) == truth(path)


def test_pictures_read_back_by_offset(tmp_path, write_bson, make_product, encode_reordered):
    path = tmp_path / "train.bson"
    docs = clean_docs(make_product, encode_reordered)
    write_bson(path, docs)
    index = index_bson(path)
    with open(path, "rb") as handle:
        expected = [[image["picture"] for image in doc.get("imgs", [])] for doc in bson.decode_file_iter(handle)]
    with BsonReader(path) as reader:
        got = [reader.pictures(int(o), int(n)) for o, n in zip(index.offset, index.length, strict=True)]
        clone = pickle.loads(pickle.dumps(reader))  # what a DataLoader worker receives: a reopened map
        assert clone.pictures(int(index.offset[3]), int(index.length[3])) == expected[3]
        clone.close()
    assert got == expected
    assert read_pictures(path, int(index.offset[1]), int(index.length[1])) == expected[1]


def test_reader_names_file_and_offset(tmp_path, write_bson, make_product):
    path = tmp_path / "train.bson"
    frames = write_bson(path, [make_product(1, 5, 1), make_product(2, 5, 1)])
    data = bytearray(path.read_bytes())
    data[frames[1][0] + 4] = 0xEE  # unknown element type: framed, but does not decode
    path.write_bytes(bytes(data))
    with BsonReader(path) as reader:
        with pytest.raises(BsonDamageError, match=f"{path}.* at byte {frames[1][0]}"):
            reader.pictures(*frames[1])
        with pytest.raises(ValueError, match="no document at byte"):
            reader.pictures(len(data) - 2, 10)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.bson"
    path.write_bytes(b"")
    index = index_bson(path)
    assert len(index) == 0 and index.problems == [] and not index.has_category


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.bson"):
        index_bson(tmp_path / "nothere.bson")


# -- damage -------------------------------------------------------------------------------------------------------
def damaged(tmp_path: Path, write_bson, make_product, count: int = 6) -> tuple[Path, list[tuple[int, int]], bytearray]:
    path = tmp_path / "train.bson"
    frames = write_bson(path, [make_product(10 + i, 1000 + i, 1 + i % 4) for i in range(count)])
    return path, frames, bytearray(path.read_bytes())


def test_truncated_last_document(tmp_path, write_bson, make_product):
    path, frames, data = damaged(tmp_path, write_bson, make_product)
    offset, length = frames[-1]
    path.write_bytes(bytes(data[: offset + length // 2]))
    index = index_bson(path)
    assert index.product_id.tolist() == [10, 11, 12, 13, 14]
    assert kinds(index) == [("truncated", offset)]
    assert str(path) in str(index.problems[0]) and f"at byte {offset}" in str(index.problems[0])


def test_length_past_end_in_the_middle_resyncs(tmp_path, write_bson, make_product):
    path, frames, data = damaged(tmp_path, write_bson, make_product)
    offset = frames[2][0]
    data[offset : offset + 4] = (2**30).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    index = index_bson(path)
    assert index.product_id.tolist() == [10, 11, 13, 14, 15]
    assert kinds(index) == [("bad_length", offset)]
    assert "runs past the end of the file" in index.problems[0].reason
    assert index.offset.tolist() == [frames[i][0] for i in (0, 1, 3, 4, 5)]


@pytest.mark.parametrize("bad_length", [0, -7, 3, 1])
def test_nonsense_length_resyncs(tmp_path, write_bson, make_product, bad_length):
    path, frames, data = damaged(tmp_path, write_bson, make_product)
    offset = frames[1][0]
    data[offset : offset + 4] = bad_length.to_bytes(4, "little", signed=True)
    path.write_bytes(bytes(data))
    index = index_bson(path)
    assert index.product_id.tolist() == [10, 12, 13, 14, 15]
    assert kinds(index) == [("bad_length", offset)]


def test_garbage_inside_a_framed_document(tmp_path, write_bson, make_product):
    path, frames, data = damaged(tmp_path, write_bson, make_product)
    offset = frames[3][0]
    data[offset + 4] = 0xEE  # the `_id` element gets an unknown type byte
    path.write_bytes(bytes(data))
    index = index_bson(path)
    assert index.product_id.tolist() == [10, 11, 12, 14, 15]
    assert kinds(index) == [("decode_error", offset)]


def test_broken_array_inside_a_framed_document(tmp_path, write_bson, make_product):
    path, frames, data = damaged(tmp_path, write_bson, make_product)
    offset = frames[2][0]
    array_at = offset + 4 + 8 + 6  # length, `_id` element, `imgs` element header
    data[array_at : array_at + 4] = (10**6).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    index = index_bson(path)
    assert index.product_id.tolist() == [10, 11, 13, 14, 15]
    assert kinds(index) == [("decode_error", offset)]


def test_length_that_swallows_the_next_document_is_recovered(tmp_path, write_bson, make_product):
    path, frames, data = damaged(tmp_path, write_bson, make_product)
    offset = frames[1][0]
    swallowed_end = frames[2][0] + frames[2][1]  # the frame now ends on document 2's terminating NUL
    data[offset : offset + 4] = (swallowed_end - offset).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    index = index_bson(path)
    assert index.product_id.tolist() == [10, 12, 13, 14, 15]
    assert kinds(index) == [("bad_length", offset)]
    assert "1 recovered" in index.problems[0].reason


def test_length_that_ends_inside_a_later_document(tmp_path, write_bson):
    # Document 3's picture holds a NUL then 0xFF bytes: a corrupt length ending on that NUL makes the walk read
    # a negative length next, in the middle of document 3. Everything but document 1 must still be found.
    docs = [
        {"_id": i, "imgs": [{"picture": b"\x01" * 40 + b"\x00" + b"\xff" * 40}], "category_id": 5} for i in range(6)
    ]
    path = tmp_path / "train.bson"
    frames = write_bson(path, docs)
    data = bytearray(path.read_bytes())
    nul = data.index(b"\x00" + b"\xff" * 40, frames[3][0])
    offset = frames[1][0]
    data[offset : offset + 4] = (nul + 1 - offset).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    index = index_bson(path)
    assert index.product_id.tolist() == [0, 2, 3, 4, 5]
    assert kinds(index) == [("bad_length", offset)]  # the out-of-step read inside document 3 is not reported


@pytest.mark.parametrize("tail", [b"\x00", b"\x01\x02\x03", b"\x00" * 9, b"garbage that is no document"])
def test_trailing_bytes(tmp_path, write_bson, make_product, tail):
    path, _, data = damaged(tmp_path, write_bson, make_product)
    path.write_bytes(bytes(data) + tail)
    index = index_bson(path)
    assert len(index) == 6
    assert kinds(index) == [("trailing_bytes", len(data))]
    assert f"{len(tail)} bytes" in index.problems[0].reason


def test_fields_that_are_not_kaggle_ones(tmp_path, write_bson, make_product):
    docs = [
        make_product(1, 5, 1),
        {"imgs": [], "category_id": 5},
        {"_id": "abc", "imgs": []},
        {"_id": 4, "imgs": "no list"},
        {"_id": 5, "imgs": [], "category_id": "x"},
        make_product(6, 5, 2),
    ]
    frames = write_bson(tmp_path / "train.bson", docs)
    index = index_bson(tmp_path / "train.bson")
    assert index.product_id.tolist() == [1, 6]
    assert kinds(index) == [("missing_field", frames[1][0])] + [("bad_field", frames[i][0]) for i in (2, 3, 4)]


def test_several_problems_are_all_reported_in_order(tmp_path, write_bson, make_product):
    path, frames, data = damaged(tmp_path, write_bson, make_product, count=8)
    data[frames[1][0] + 4] = 0xEE
    data[frames[4][0] : frames[4][0] + 4] = (2**30).to_bytes(4, "little")
    path.write_bytes(bytes(data + b"\x07\x07"))
    index = index_bson(path)
    assert index.product_id.tolist() == [10, 12, 13, 15, 16, 17]
    assert kinds(index) == [("decode_error", frames[1][0]), ("bad_length", frames[4][0]), ("trailing_bytes", len(data))]


def test_strict_raises_first_problem_by_offset(tmp_path, write_bson, make_product):
    path, frames, data = damaged(tmp_path, write_bson, make_product)
    data[frames[2][0] + 4] = 0xEE  # found by the decoder, after the walk has seen the truncation below
    path.write_bytes(bytes(data[:-3]))
    with pytest.raises(BsonDamageError, match=f"at byte {frames[2][0]}: decode_error") as caught:
        index_bson(path, strict=True)
    assert caught.value.problem.file == str(path)


def test_any_single_corrupt_byte_loses_at_most_that_document(tmp_path, write_bson, make_product):
    path, frames, clean = damaged(tmp_path, write_bson, make_product, count=8)
    starts = [offset for offset, _ in frames]
    rng = np.random.default_rng(1)
    # Structure bytes (length prefixes, element headers, the last byte) are where damage hurts; hit them often.
    positions = [o + k for o in starts for k in (0, 1, 2, 3, 4, 5, 12, 17, 18, 19)] + [s + n - 1 for s, n in frames]
    positions += rng.integers(0, len(clean), 60).tolist()
    for position in positions:
        for value in (0x00, 0xFF, int(rng.integers(256))):
            data = bytearray(clean)
            data[position] ^= value or 0x80
            path.write_bytes(bytes(data))
            index = index_bson(path)
            hit = max(i for i, start in enumerate(starts) if start <= position)
            found = dict(zip(index.offset.tolist(), index.product_id.tolist(), strict=True))
            for i, start in enumerate(starts):
                if i != hit:
                    assert found.get(start) == 10 + i, (position, value, index.problems)


def test_fast_path_reads_kaggle_layouts_without_decoding(
    tmp_path, write_bson, make_product, encode_reordered, monkeypatch
):
    import prodcat.data.bson_index as bson_index

    decoded = []
    full_decode = bson_index._slow_fields
    monkeypatch.setattr(bson_index, "_slow_fields", lambda buf, o, *a: decoded.append(o) or full_decode(buf, o, *a))
    kaggle = [make_product(i, c, k) for i, (c, k) in enumerate([(5, 1), (bson.Int64(6), 4), (None, 0), (7, 10)])]
    kaggle.append(make_product(bson.Int64(99), None, 3))
    other = [make_product(50, 5, 11), encode_reordered(make_product(51, 5, 1)), {**make_product(52, 5, 1), "x": 1}]
    frames = write_bson(tmp_path / "train.bson", kaggle + other)
    index = index_bson(tmp_path / "train.bson")
    assert len(index) == 8 and index.problems == []
    assert sorted(decoded) == [offset for offset, _ in frames[len(kaggle) :]]  # only the other layouts


@pytest.mark.parametrize("damage", ["none", "bad_length", "truncated", "negative", "trailing"])
def test_compiled_walk_equals_python_walk(damage: str) -> None:
    """Large files take the numba walk; it must frame exactly the documents the Python loop frames."""
    import array

    from prodcat.data import bson_index

    if bson_scan.walk is None:
        pytest.skip("numba not installed: only the Python walk exists")
    rng = np.random.default_rng(0)
    docs = [
        bson.encode(
            {"_id": i, "imgs": [{"picture": bson.Binary(rng.bytes(int(rng.integers(0, 300))))}], "category_id": 7}
        )
        for i in range(500)
    ]
    data = bytearray(b"".join(docs))
    if damage == "bad_length":
        at = sum(map(len, docs[:100]))
        data[at : at + 4] = (3).to_bytes(4, "little")
    elif damage == "truncated":
        data = data[:-7]
    elif damage == "negative":
        at = sum(map(len, docs[:10]))
        data[at : at + 4] = (-20).to_bytes(4, "little", signed=True)
    elif damage == "trailing":
        data += b"\x01\x02"
    buffer = bytes(data)
    python_offsets, fast_offsets = array.array("q"), array.array("q")
    assert bson_index._chain_python(buffer, 0, python_offsets) == bson_index._chain_fast(buffer, 0, fast_offsets)
    assert list(python_offsets) == list(fast_offsets)
    assert (
        len(python_offsets)
        == {"none": 500, "bad_length": 100, "truncated": 499, "negative": 10, "trailing": 500}[damage]
    )


def _mixed_layout_buffer(seed: int) -> bytes:
    """Documents in every layout the indexer distinguishes, plus a few corrupted inside their frame."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(400):
        pictures = [{"picture": bson.Binary(rng.bytes(int(rng.integers(0, 120))))} for _ in range(i % 13)]
        product_id = bson.Int64(i) if i % 3 == 0 else i
        doc: dict = {"_id": product_id, "imgs": pictures}
        if i % 5:
            doc["category_id"] = bson.Int64(10**10 + i) if i % 7 == 0 else 1000 + i
        if i % 11 == 0:
            doc = {"imgs": pictures, "_id": product_id}  # another field order
        encoded = bytearray(bson.encode(doc))
        if i % 17 == 0 and len(encoded) > 30:
            encoded[20] ^= 0xFF  # damage inside a well-framed document
        docs.append(bytes(encoded))
    return b"".join(docs)


@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_parse_equals_numpy_parse(seed: int) -> None:
    """The compiled field parse (alone and fused with the walk) decides exactly like the numpy one."""
    import array

    from prodcat.data import bson_index

    if bson_scan.walk is None:
        pytest.skip("numba not installed: only the numpy parse exists")
    buffer = _mixed_layout_buffer(seed)
    offsets, parsed = array.array("q"), []
    assert bson_index._chain_fast(buffer, 0, offsets, parsed) == len(buffer)
    starts = np.frombuffer(offsets, dtype=np.int64)
    lengths = np.diff(np.r_[starts, len(buffer)])
    reference = bson_index._fast_fields_none(len(starts))
    for first in range(0, len(starts), 64):
        part = slice(first, first + 64)
        file_ints = np.ndarray((len(buffer) - 7,), dtype="<i8", buffer=buffer, strides=(1,))
        bson_index._fast_chunk(
            buffer, len(buffer), file_ints, starts[part], lengths[part], {k: v[part] for k, v in reference.items()}
        )
    compiled = bson_index._fast_fields_compiled(buffer, starts, lengths, bson_index._fast_fields_none(len(starts)))
    fused = bson_index._parsed_fields(parsed, len(starts))
    assert 0 < reference["ok"].sum() < len(starts)  # both kinds of document are present
    for fields in (compiled, fused):
        assert np.array_equal(fields["ok"], reference["ok"])
        for key in ("product_id", "num_images", "category_id"):
            assert np.array_equal(fields[key][reference["ok"]], reference[key][reference["ok"]])


@pytest.mark.parametrize("case", ["clean", "damage_first_half", "damage_second_half", "false_candidates"])
def test_two_thread_walk_equals_one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """Large files are walked by two threads from a guessed split point; the index must not depend on it."""
    from prodcat.data import bson_index

    if bson_scan.walk is None:
        pytest.skip("numba not installed: only the Python walk exists")
    rng = np.random.default_rng(3)
    fake = (16).to_bytes(4, "little") + b"\x10_id\x00" + bytes(20)  # looks like a document start
    docs = []
    for i in range(600):
        picture = rng.bytes(int(rng.integers(50, 400))) + (fake if case == "false_candidates" else b"")
        docs.append(
            bytearray(bson.encode({"_id": i, "imgs": [{"picture": bson.Binary(picture)}], "category_id": 1000 + i % 9}))
        )
    at = {"damage_first_half": 150, "damage_second_half": 450}.get(case)
    if at is not None:
        docs[at][:4] = (3).to_bytes(4, "little")
    path = tmp_path / "train.bson"
    path.write_bytes(b"".join(bytes(doc) for doc in docs))
    monkeypatch.setattr(bson_index, "_COMPILED_MIN_BYTES", 1 << 60)
    reference = index_bson(path)
    monkeypatch.setattr(bson_index, "_COMPILED_MIN_BYTES", 0)
    monkeypatch.setattr(bson_index, "_PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(bson_index, "_THREADS", 2)
    index = index_bson(path)
    for name in ("product_id", "offset", "length", "num_images", "category_id"):
        assert np.array_equal(getattr(index, name), getattr(reference, name)), name
    assert [(p.kind, p.offset) for p in index.problems] == [(p.kind, p.offset) for p in reference.problems]
    assert len(index) == (599 if at is not None else 600)
