"""Real photos through the exact extraction path: JPEG bytes -> decode_image -> Preprocessor -> InferenceRunner.

The packaged EfficientNet-Lite0 must still be an ImageNet classifier after the whole path (a cat is a cat), and
bfloat16 features must stay within cosine 0.999 of float32.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from prodcat.data.images import decode_image
from prodcat.features.backbones import Backbone, Preprocessor, create_backbone
from prodcat.features.inference import InferenceRunner

skimage_data = pytest.importorskip("skimage.data")
torch.set_num_threads(2)

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [jpeg_bytes(skimage_data.chelsea()), jpeg_bytes(skimage_data.coffee())]


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return create_backbone("efficientnet_lite0")


def batch_for(backbone: Backbone, photos: list[bytes]) -> torch.Tensor:
    return Preprocessor(backbone.spec)([decode_image(data) for data in photos])


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "auto"])
def test_packaged_lite0_classifies_cat_and_coffee(lite0: Backbone, photos: list[bytes], precision: str) -> None:
    runner = InferenceRunner(lite0, precision=precision, device="cpu")
    out = runner(batch_for(lite0, photos), logits=True)
    top1 = out["logits"].argmax(dim=1).tolist()
    assert top1[0] in CAT_CLASSES, f"chelsea -> {top1[0]} ({runner.mode})"
    assert top1[1] in COFFEE_CLASSES, f"coffee -> {top1[1]} ({runner.mode})"


def test_runner_float32_equals_eager_backbone_on_photos(lite0: Backbone, photos: list[bytes]) -> None:
    batch = batch_for(lite0, photos)
    out = InferenceRunner(lite0, precision="float32", device="cpu")(batch, logits=True)
    with torch.no_grad():
        assert torch.allclose(out["pooled"], lite0(batch), rtol=1e-3, atol=1e-4)
        assert torch.allclose(out["logits"], lite0.imagenet_logits(batch), rtol=1e-3, atol=1e-3)


def test_bfloat16_lite0_features_keep_cosine(lite0: Backbone, photos: list[bytes]) -> None:
    batch = batch_for(lite0, photos)
    out = InferenceRunner(lite0, precision="bfloat16", device="cpu")(batch, spatial=True)
    with torch.no_grad():
        reference = lite0.forward_features(batch)
    assert F.cosine_similarity(out["pooled"], lite0.pool(reference)).min() >= 0.999
    spatial_reference = reference.permute(0, 2, 3, 1).flatten(1)
    assert F.cosine_similarity(out["spatial"].flatten(1), spatial_reference).min() >= 0.99


def test_bfloat16_xception_features_keep_cosine(photos: list[bytes]) -> None:
    xception = create_backbone("legacy_xception", random_init=True)
    batch = batch_for(xception, photos)
    out = InferenceRunner(xception, precision="bfloat16", device="cpu")(batch)
    with torch.no_grad():
        reference = xception(batch)
    assert F.cosine_similarity(out["pooled"], reference).min() >= 0.999
