"""Bounded fuzzing: mutated JPEG/PNG/WebP/GIF/BMP files through the decode path and the HTTP route, 0 5xx.

Deterministic (seeded) bit flips, byte runs, truncations, header edits and chunk splices of small real pictures.
Every outcome must be a decoded picture or an `ImageDecodeError` (never another exception), and over HTTP a 200 or
a 4xx naming the file (never a 5xx).
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from prodcat.config import ServeConfig
from prodcat.data.images import ImageDecodeError, decode_image, decode_image_sized
from prodcat.serve.app import create_app

FUZZ_SEED = 12
MUTANTS_PER_SEED = 60  # x 6 seed pictures = 360 files
MAX_PIXELS = 1_000_000  # header edits may declare big sizes; keep each decode small so the test stays fast


def _seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:48, 0:64]
    rgb = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8) + rng.integers(0, 20, (48, 64, 3), np.uint8)
    picture = Image.fromarray(rgb)
    rgba = Image.fromarray(np.dstack([rgb, (x * 4).astype(np.uint8)]), "RGBA")
    out = {}
    for name, image, fmt, options in (
        ("jpeg", picture, "JPEG", {"quality": 85}),
        ("progressive", picture, "JPEG", {"quality": 85, "progressive": True}),
        ("png", rgba, "PNG", {}),
        ("webp", picture, "WEBP", {"quality": 80}),
        ("gif", picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "GIF", {}),
        ("bmp", picture, "BMP", {}),
    ):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        out[name] = buffer.getvalue()
    return out


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:  # bit flips anywhere
        for _ in range(rng.randint(1, 8)):
            position = rng.randrange(len(out))
            out[position] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncation
        del out[rng.randrange(1, len(out)) :]
    elif kind == 2:  # header edits: random bytes in the first 64 (sizes, markers, chunk lengths)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(min(64, len(out)))] = rng.randrange(256)
    elif kind == 3:  # a run of 0x00 or 0xFF over the body
        start = rng.randrange(len(out))
        out[start : start + rng.randint(1, 64)] = bytes([rng.choice((0, 255))]) * rng.randint(1, 64)
    elif kind == 4:  # a chunk spliced in elsewhere (duplicated segments, out-of-order chunks)
        start, length = rng.randrange(len(out)), rng.randint(1, 200)
        piece = bytes(out[start : start + length])
        at = rng.randrange(len(out))
        out[at:at] = piece
    else:  # 16-bit fields near the start set to extremes
        position = rng.randrange(min(60, len(out) - 2))
        out[position : position + 2] = rng.choice((b"\xff\xff", b"\x00\x00", b"\x7f\xff", b"\x00\x01"))
    return bytes(out)


def _mutants() -> list[tuple[str, bytes]]:
    rng = random.Random(FUZZ_SEED)
    return [
        (f"{name}-{index}", _mutate(data, rng)) for name, data in _seeds().items() for index in range(MUTANTS_PER_SEED)
    ]


MUTANTS = _mutants()


def test_the_fuzz_corpus_is_deterministic_and_varied() -> None:
    assert len(MUTANTS) == 360 and [data for _, data in _mutants()] == [data for _, data in MUTANTS]
    assert len({data for _, data in MUTANTS}) > 300


def test_mutants_decode_or_raise_image_decode_error() -> None:
    outcomes = {"decoded": 0, "refused": 0}
    for name, data in MUTANTS:
        for reduce_to in (None, (16, 16)):
            try:
                decoded = decode_image_sized(data, max_pixels=MAX_PIXELS, reduce_to=reduce_to)
            except ImageDecodeError as error:
                assert error.reason and len(error.reason) < 200, name
                outcomes["refused"] += 1
                continue
            assert decoded.pixels.dtype.is_floating_point is False and decoded.pixels.shape[0] == 3, name
            outcomes["decoded"] += 1
    assert outcomes["decoded"] > 0 and outcomes["refused"] > 0, outcomes


@pytest.fixture
def client(make_predictor: Callable) -> Iterator[TestClient]:
    config = ServeConfig(max_pixels=MAX_PIXELS, batch_window_ms=0.0)
    with TestClient(create_app(make_predictor(input_size=(16, 16)), config)) as test_client:
        yield test_client


def test_mutants_over_http_never_give_5xx(client: TestClient, make_jpeg: Callable) -> None:
    statuses: dict[int, int] = {}
    for name, data in MUTANTS:
        response = client.post("/v1/classify", files=[("images", (f"{name}.img", data, "application/octet-stream"))])
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (name, response.text)
        if response.status_code != 200:
            error = response.json()["error"]
            assert error["code"] in {"invalid_image", "image_too_large"} and f"'{name}.img'" in error["message"], name
    assert statuses.get(200, 0) > 0 and sum(statuses.values()) == len(MUTANTS), statuses
    assert client.post("/v1/classify", files=[("images", ("ok.jpg", make_jpeg(3), "image/jpeg"))]).status_code == 200


def test_the_fuzz_targets_do_not_leak_pillow_state() -> None:
    """decode_image's answer for a clean picture is the same before and after the corpus ran."""
    clean = _seeds()["png"]
    before = decode_image(clean)
    for _, data in MUTANTS[:50]:
        try:
            decode_image(data, max_pixels=MAX_PIXELS)
        except ImageDecodeError:
            pass
    assert np.array_equal(before.numpy(), decode_image(clean).numpy())
