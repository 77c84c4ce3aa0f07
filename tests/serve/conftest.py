"""Shared fixtures for the server tests: a deterministic fake Predictor and encoded test images."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from PIL import Image
from serve_rows import ROWS  # a module of its own: tests import it, and `conftest` is ambiguous across folders

from prodcat.data.taxonomy import Taxonomy
from prodcat.predict.predictor import CategoryScore, ProductPrediction


class FakePredictor:
    """Implements the Predictor contract: an image's label is its mean red value bucketed into C classes."""

    def __init__(
        self,
        threshold: float | None = 0.5,
        delay: float = 0.0,
        fail: bool = False,
        gate: threading.Event | None = None,
        input_size: tuple[int, int] | None = None,
        ocr_words: Callable[[int], list[str]] | None = None,
    ) -> None:
        self.taxonomy = Taxonomy.from_rows(ROWS, counts={row[0]: 100 - i for i, row in enumerate(ROWS)})
        self.accept_threshold = threshold
        self.aggregation = "mean_prob"
        self.delay, self.fail, self.gate = delay, fail, gate
        self.ocr_words = ocr_words  # picture index -> words read, as a run with a text model (None: it has none)
        self.calls: list[list[int]] = []  # images per product, one list per predict_products call
        self.shapes: list[tuple[int, ...]] = []  # every image's shape, as the server handed it over
        if input_size is not None:  # the server decodes reduced towards it, as for a real backbone's input size
            self.input_size = input_size
        self._lock = threading.Lock()

    def label_of(self, image: torch.Tensor) -> int:
        return min(int(image[0].float().mean()) * self.taxonomy.num_classes // 256, self.taxonomy.num_classes - 1)

    def image_probs(self, image: torch.Tensor) -> np.ndarray:
        """Peaked on label_of(image), falling off with label distance: a deterministic distribution."""
        distance = np.abs(np.arange(self.taxonomy.num_classes) - self.label_of(image))
        weights = 1.0 / (1.0 + distance) ** 3
        return weights / weights.sum()

    def _scores(self, probs: np.ndarray, top_k: int) -> list[CategoryScore]:
        order = np.argsort(-probs, kind="stable")[:top_k]
        return [
            CategoryScore(
                int(label),
                int(self.taxonomy.category_ids[label]),
                float(probs[label]),
                *self.taxonomy.names(int(label)),
            )
            for label in order
        ]

    def predict_products(self, products: Sequence[Sequence[torch.Tensor]], top_k: int = 5) -> list[ProductPrediction]:
        with self._lock:
            self.calls.append([len(product) for product in products])
            self.shapes.extend(tuple(image.shape) for product in products for image in product)
        if self.gate is not None:
            self.gate.wait(timeout=30)
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("secret internal detail")
        predictions = []
        for product in products:
            per_image = [self.image_probs(image) for image in product]
            top = self._scores(np.mean(per_image, axis=0), top_k)
            accepted = self.accept_threshold is not None and top[0].probability >= self.accept_threshold
            words = None if self.ocr_words is None else [self.ocr_words(i) for i in range(len(product))]
            predictions.append(
                ProductPrediction(
                    top,
                    [self._scores(p, top_k) for p in per_image],
                    accepted,
                    self.accept_threshold,
                    self.aggregation,
                    ocr_words=words,
                )
            )
        return predictions

    def predict_product(self, images: Sequence[torch.Tensor], top_k: int = 5) -> ProductPrediction:
        return self.predict_products([images], top_k)[0]


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def jpeg_for_label(
    label: int, num_classes: int = len(ROWS), size: tuple[int, int] = (40, 32), seed: int = 0, fmt: str = "JPEG"
) -> bytes:
    """A photo whose mean red value makes FakePredictor answer `label`; green/blue are noise."""
    rng = np.random.default_rng(seed)
    height, width = size[1], size[0]
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    array[..., 0] = (label * 256 + 128) // num_classes
    return _encode(array, fmt)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.fixture
def make_predictor() -> Callable[..., FakePredictor]:
    return FakePredictor


@pytest.fixture
def make_jpeg() -> Callable[..., bytes]:
    return jpeg_for_label


@pytest.fixture
def make_bomb() -> Callable[..., bytes]:
    return bomb_png
