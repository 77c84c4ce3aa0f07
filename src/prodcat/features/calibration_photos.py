"""The photos `--precision auto` measures bf16 against float32 on: 16 real photos, deterministic, no files of ours.

They are crops of the two sample photos scikit-learn ships with its code (`sklearn/datasets/images/china.jpg`,
`flower.jpg`, CC BY 2.0; scikit-learn is a dependency already, for the OCR text features), resized to 180x180
(Cdiscount's picture size); the JPEG bytes go through `decode_image` like a catalog picture. Production inference
must not depend on the synthetic demo generator, and real photos are what the bar is about (features within cosine
0.999 of float32 on every photo; tests/features/test_real_photos.py checks it on other photos than these).
"""

from __future__ import annotations

import functools
import importlib.resources

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = ["CALIBRATION_PHOTOS", "CALIBRATION_SIZE", "calibration_images"]

CALIBRATION_SIZE = 180
# Square crops (top, left, side) in pixels of the 640x427 photos, 8 each: product-like framings (the subject whole and
# centred), parts and close-ups, and one of the out-of-focus background (a plain backdrop).
CALIBRATION_PHOTOS = {
    "china.jpg": (
        (0, 0, 427),
        (0, 213, 427),
        (20, 80, 220),
        (180, 60, 220),
        (130, 430, 210),
        (180, 300, 160),
        (80, 90, 120),
        (0, 150, 150),
    ),
    "flower.jpg": (
        (60, 150, 320),
        (0, 100, 427),
        (150, 230, 150),
        (120, 160, 130),
        (300, 230, 127),
        (0, 440, 200),
        (80, 300, 150),
        (100, 120, 327),
    ),
}


def _photo_bytes(name: str) -> bytes:
    """A sample photo's JPEG bytes, read from the installed scikit-learn (its package is not imported)."""
    path = importlib.resources.files("sklearn") / "datasets" / "images" / name
    try:
        return path.read_bytes()
    except OSError as error:
        raise FileNotFoundError(
            f"{path}: scikit-learn's sample photo is missing (the bf16 calibration of --precision auto needs it); "
            "reinstall scikit-learn, or pass --precision float32"
        ) from error


def _crops(photo: torch.Tensor, boxes: tuple[tuple[int, int, int], ...]) -> list[torch.Tensor]:
    """The square crops `boxes` of one decoded (3, H, W) photo, each resized to CALIBRATION_SIZE square."""
    crops = []
    for top, left, side in boxes:
        crop = photo[:, top : top + side, left : left + side]
        if crop.shape[1:] != (side, side):
            raise ValueError(f"crop {(top, left, side)} leaves the {tuple(photo.shape[1:])} calibration photo")
        crops.append(TF.resize(crop, [CALIBRATION_SIZE] * 2, interpolation=InterpolationMode.BICUBIC, antialias=True))
    return crops


@functools.lru_cache(maxsize=1)
def calibration_images() -> tuple[torch.Tensor, ...]:
    """16 real photos as uint8 (3, 180, 180) tensors, decoded like catalog pictures; the same on every call."""
    from prodcat.data.images import decode_image

    photos = {name: decode_image(_photo_bytes(name)) for name in CALIBRATION_PHOTOS}
    return tuple(crop for name, boxes in CALIBRATION_PHOTOS.items() for crop in _crops(photos[name], boxes))
