"""Pictures for the OCR tests (imported by the tests and tests/ocr/conftest.py)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def plain_photo(seed: int) -> Image.Image:
    """A smooth blob on white, like a product photo without text."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:180, :180]
    centre = rng.uniform(60, 120, 2)
    blob = np.exp(-(((yy - centre[0]) / 40) ** 2 + ((xx - centre[1]) / 50) ** 2))
    colour = rng.uniform(0, 255, 3)
    pixels = 255 - blob[..., None] * (255 - colour)
    return Image.fromarray(pixels.astype(np.uint8))
