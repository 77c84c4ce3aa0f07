"""Which pictures to OCR: a cheap text-presence test, and a hook for smarter selectors.

OCR costs far more than the backbone per picture, so `--select text_likely` reads only pictures that look like they
carry printed text. The test is a tiny connected-component heuristic on the picture at 180x180 (Cdiscount's size):
pixels clearly darker (or lighter) than their 21x21 neighbourhood form components; letter-shaped ones (5-34 px
high, not too wide, partly filled) count when at least two others of similar height sit beside them on the same
line, as letters in a word do. Photos of objects have blobs, rarely rows of similar blobs. ~5 ms per picture.
Recall on covers and the share of ordinary photos it lets through are measured by benchmarks/bench_ocr.py.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

__all__ = ["text_score", "text_likely", "register_selector", "create_selector", "list_selectors", "TEXT_THRESHOLD"]

# Letters in lines needed. Chosen on rendered covers (seeds 0-39, lowest score 6) against a handful of skimage photos
# (most score 0-1); bench_ocr.py reports recall on other seeds.
TEXT_THRESHOLD = 6
_SIZE = 180
_CONTRAST = 25.0  # grey levels from the local mean that make a pixel ink
_WINDOW = 21  # local mean window: wider than a letter's stroke, narrower than a title line


def _grey(image: Image.Image) -> np.ndarray:
    image = image.convert("L")
    if image.size != (_SIZE, _SIZE):
        image = image.resize((_SIZE, _SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _letter_boxes(ink: np.ndarray) -> np.ndarray:
    """(n, 4) top, bottom, left, right of the letter-shaped components of a boolean ink mask."""
    from scipy import ndimage

    labels, count = ndimage.label(ink, structure=np.ones((3, 3)))
    if count == 0:
        return np.zeros((0, 4), dtype=np.int64)
    slices = ndimage.find_objects(labels)
    boxes = np.array([(s[0].start, s[0].stop, s[1].start, s[1].stop) for s in slices], dtype=np.int64)
    height, width = boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]
    fill = np.bincount(labels.ravel(), minlength=count + 1)[1:] / (height * width)
    letter = (height >= 5) & (height <= 34) & (width <= 40) & (2 * height >= width) & (height <= 10 * width)
    return boxes[letter & (fill > 0.12) & (fill < 0.95)]


def _letters_in_lines(boxes: np.ndarray) -> int:
    """Components with 2+ neighbours of similar height, centred on the same line, less than a height apart."""
    if len(boxes) < 3:
        return 0
    top, bottom, left, right = (boxes[:, k].astype(np.float64) for k in range(4))
    height, centre = bottom - top, (top + bottom) / 2
    smaller = np.minimum(height[:, None], height[None])
    similar = np.maximum(height[:, None], height[None]) <= 1.6 * smaller
    aligned = np.abs(centre[:, None] - centre[None]) <= 0.35 * smaller
    gap = np.maximum(left[None] - right[:, None], left[:, None] - right[None])
    neighbours = similar & aligned & (gap <= 0.8 * smaller)
    np.fill_diagonal(neighbours, False)
    return int((neighbours.sum(axis=1) >= 2).sum())


def text_score(image: Image.Image) -> int:
    """Letters standing in lines, dark-on-light plus light-on-dark: 0-1 on most photos, 6-40 on covers."""
    from scipy import ndimage

    grey = _grey(image)
    local = ndimage.uniform_filter(grey, _WINDOW)
    return sum(_letters_in_lines(_letter_boxes(ink)) for ink in (grey < local - _CONTRAST, grey > local + _CONTRAST))


def text_likely(image: Image.Image, threshold: float = TEXT_THRESHOLD) -> bool:
    return text_score(image) >= threshold


# Selectors decide, per picture, whether to OCR it; `context` holds product_id, image_index, split and the
# text_score. `all` and `text_likely` look at the picture alone. The hook for later: a selector that looks up the
# picture head's top-k departments for context["product_id"] (OCR only when a text-heavy department is likely)
# registers here under its own name and becomes a `--select` choice.
Selector = Callable[[Image.Image, dict], bool]
_SELECTORS: dict[str, Selector] = {}


def register_selector(name: str) -> Callable[[Selector], Selector]:
    def add(selector: Selector) -> Selector:
        if name in _SELECTORS:
            raise ValueError(f"selector {name!r} is already registered")
        _SELECTORS[name] = selector
        return selector

    return add


def list_selectors() -> list[str]:
    return sorted(_SELECTORS)


def create_selector(name: str) -> Selector:
    if name not in _SELECTORS:
        raise ValueError(f"unknown selector {name!r}; known: {', '.join(list_selectors())}")
    return _SELECTORS[name]


@register_selector("all")
def _select_all(image: Image.Image, context: dict) -> bool:
    return True


@register_selector("text_likely")
def _select_text_likely(image: Image.Image, context: dict) -> bool:
    return text_likely(image)
