"""Flip test-time augmentation (issue 14, lever 2): flip_mean against an explicit mirror through the runner, a
symmetric picture, the manifest and config, resume refusing another mode, dedupe copies, and the Predictor
applying the store's mode so that served features equal stored rows."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import bson
import numpy as np
import pytest
import torch
from PIL import Image

from prodcat.config import ExtractConfig, IngestConfig, config_from_dict
from prodcat.data.bson_index import BsonReader
from prodcat.data.catalog import catalog_source, ingest, load_catalog
from prodcat.data.images import decode_image
from prodcat.features.backbones import Preprocessor, create_backbone
from prodcat.features.extract import extract
from prodcat.features.inference import TTA_MODES, InferenceRunner
from prodcat.features.store import FeatureStore, StoreError
from prodcat.utils import read_json, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_fixtures import tiny_config  # noqa: E402

BACKBONE = "test_efficientnet"  # timm's tiny test network: random init, a few ms per batch


def _pixels(seed: int, size: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(size, size, 3), dtype=np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # lossless: a mirrored file decodes to the exact mirror
    return buffer.getvalue()


POOL = [_jpeg(_pixels(seed)) for seed in range(16)]


def _make_data(root: Path) -> Path:
    """16 train products with a picture of their own each; every 4th shares one more with its neighbour and every
    4th shows its own twice (dedupe copies rows; groups stay small enough for the grouped split); 3 test products."""
    data = root / "data"
    data.mkdir(parents=True)
    categories = [1000000001 + i for i in range(3)]
    lines = ["category_id,category_level1,category_level2,category_level3"]
    lines += [f"{c},MAISON,GROUPE {i % 2},FEUILLE {i}" for i, c in enumerate(categories)]
    (data / "category_names.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(data / "train.bson", "wb") as handle:
        for pid in range(16):
            pictures = [POOL[pid]] + ([POOL[pid - 1]] if pid % 4 == 1 else []) + ([POOL[pid]] if pid % 4 == 3 else [])
            doc = {
                "_id": pid,
                "imgs": [{"picture": bson.Binary(p)} for p in pictures],
                "category_id": categories[pid % 3],
            }
            handle.write(bson.encode(doc))
    with open(data / "test.bson", "wb") as handle:
        for pid in range(100, 103):
            handle.write(bson.encode({"_id": pid, "imgs": [{"picture": bson.Binary(POOL[pid % 6])}]}))
    return data


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "W"
    ingest(
        IngestConfig(
            data_dir=str(_make_data(tmp_path)), workdir=str(work), val_fraction=0.25, holdout_fraction=0.0, seed=0
        )
    )
    return work


def _config(workdir: Path, **overrides: object) -> ExtractConfig:
    values = dict(
        workdir=str(workdir), backbone=BACKBONE, random_init=True, batch_size=3, shard_size=5, workers=0,
        precision="float32", splits=("train", "val", "test"),
    )  # fmt: skip
    values.update(overrides)
    return ExtractConfig(**values)


@pytest.fixture(scope="module")
def engine() -> tuple[Preprocessor, InferenceRunner]:
    torch.manual_seed(0)
    backbone = create_backbone(BACKBONE, random_init=True)
    return Preprocessor(backbone.spec), InferenceRunner(backbone, precision="float32", device="cpu")


def _images(count: int, size: int) -> list[torch.Tensor]:
    return [torch.from_numpy(_pixels(100 + i, size)).permute(2, 0, 1).contiguous() for i in range(count)]


def _close(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, tol: float = 1e-4) -> bool:
    a, b = torch.as_tensor(np.asarray(a, np.float32)), torch.as_tensor(np.asarray(b, np.float32))
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max())))


def test_modes_match_config() -> None:
    for mode in TTA_MODES:
        assert ExtractConfig(tta=mode).tta == mode
    with pytest.raises(ValueError, match="tta"):
        ExtractConfig(tta="crops")


@pytest.mark.parametrize("size", [None, 33])  # at the input size, and resized (flip after resize, both ways)
def test_flip_mean_is_mean_of_picture_and_explicit_mirror(engine: tuple, size: int | None) -> None:
    preprocess, runner = engine
    side = size or preprocess.size[1]
    images = _images(4, side)
    mirrors = [image.flip(-1) for image in images]  # the explicit mirror of each decoded picture
    plain = runner(preprocess.pack(images), spatial=True, logits=True)
    mirrored = runner(preprocess.pack(mirrors), spatial=True, logits=True)
    tta = runner(preprocess.pack(images), spatial=True, logits=True, tta="flip_mean")
    tol = 1e-4 if size is None else 2e-2  # resizing a mirror is the mirror of the resize up to uint8 rounding
    assert _close(tta["pooled"], (plain["pooled"] + mirrored["pooled"]) / 2, tol)
    assert _close(tta["logits"], (plain["logits"] + mirrored["logits"]) / 2, tol)
    # The mirror's map is flipped back along its width, so positions line up.
    assert _close(tta["spatial"], (plain["spatial"] + mirrored["spatial"].flip(2)) / 2, tol)
    assert not _close(tta["pooled"], plain["pooled"], 1e-3)  # the network is not mirror-invariant: TTA changes it


def test_symmetric_picture_same_with_and_without_tta(engine: tuple) -> None:
    preprocess, runner = engine
    half = _images(2, preprocess.size[1])
    width = preprocess.size[1]
    symmetric = [torch.cat([image[..., : width // 2], image[..., : width // 2].flip(-1)], dim=-1) for image in half]
    assert all(torch.equal(image, image.flip(-1)) for image in symmetric)
    plain = runner(preprocess.pack(symmetric))["pooled"]
    tta = runner(preprocess.pack(symmetric), tta="flip_mean")["pooled"]
    assert _close(tta, plain, 1e-5)
    upside_down = runner(preprocess.pack([image.flip(-2) for image in symmetric]))["pooled"]
    assert not _close(upside_down, plain, 1e-3)  # a vertical flip would change it: the mirror is left-right


def test_runner_refuses_unknown_mode(engine: tuple) -> None:
    preprocess, runner = engine
    with pytest.raises(ValueError, match="tta"):
        runner(preprocess.pack(_images(1, 40)), tta="transpose")


def _store_pictures(store: FeatureStore, workdir: Path, rows: np.ndarray) -> list[torch.Tensor]:
    """Decoded pictures of store rows, read back from the BSON."""
    table = load_catalog(workdir, "train").to_pydict()
    where = {
        pid: (off, length)
        for pid, off, length in zip(table["product_id"], table["offset"], table["length"], strict=True)
    }
    out = []
    with BsonReader(catalog_source(workdir, "train")) as reader:
        for row in rows.tolist():
            offset, length = where[int(store.column("product_id")[row])]
            out.append(decode_image(reader.pictures(offset, length)[int(store.column("image_index")[row])]))
    return out


def test_store_rows_are_flip_means_and_manifest_records_mode(workdir: Path, engine: tuple) -> None:
    store = FeatureStore.open(extract(_config(workdir, tta="flip_mean", store_name="flip")))
    plain = FeatureStore.open(extract(_config(workdir, store_name="plain")))
    assert store.manifest["tta"] == "flip_mean" and plain.manifest["tta"] == "none"
    assert read_json(store.path / "config.json")["tta"] == "flip_mean"
    assert store.manifest["dedupe"]["copied"] > 0  # dedupe still on: repeated pictures copied, not recomputed
    rows = store.split_indices("train")
    pictures = _store_pictures(store, workdir, rows)
    preprocess, runner = engine  # the same seeded random weights as the store's backbone
    plain_ref = runner(preprocess.pack(pictures))["pooled"]
    mirror_ref = runner(preprocess.pack([p.flip(-1) for p in pictures]))["pooled"]
    stored = store.read(rows)
    assert _close(plain.read(rows), plain_ref, 2e-3)
    assert _close(stored, (plain_ref + mirror_ref) / 2, 2e-3)
    assert not _close(stored, plain_ref, 2e-2)
    # Every copy equals its owner's vector (bit for bit), as without TTA.
    for picture in {bytes(p.numpy()) for p in pictures}:
        same = [i for i, p in enumerate(pictures) if bytes(p.numpy()) == picture]
        assert all(np.array_equal(stored[i], stored[same[0]]) for i in same)


def test_resume_refuses_another_tta_mode(workdir: Path) -> None:
    path = extract(_config(workdir, store_name="s"))
    with pytest.raises(StoreError, match="--tta none"):
        extract(_config(workdir, store_name="s", tta="flip_mean"))
    flip = extract(_config(workdir, store_name="f", tta="flip_mean"))
    with pytest.raises(StoreError, match="--tta flip_mean"):
        extract(_config(workdir, store_name="f"))
    # A store from before TTA (no "tta" in its manifest) is a plain one: resuming it without TTA still works.
    manifest = read_json(path / "manifest.json")
    del manifest["tta"]
    write_json(path / "manifest.json", manifest)
    assert extract(_config(workdir, store_name="s")) == path
    with pytest.raises(StoreError, match="--tta none"):
        extract(_config(workdir, store_name="s", tta="flip_mean"))
    assert FeatureStore.open(flip).manifest["tta"] == "flip_mean"


def test_old_store_config_without_tta_loads_as_none(workdir: Path) -> None:
    path = extract(_config(workdir, store_name="old"))
    data = read_json(path / "config.json")
    data.pop("tta")
    assert config_from_dict(ExtractConfig, data).tta == "none"


@pytest.mark.parametrize("tta", TTA_MODES)
def test_predictor_applies_the_store_tta(workdir: Path, tta: str) -> None:
    from prodcat.predict.predictor import Predictor
    from prodcat.train.loop import train

    store = FeatureStore.open(extract(_config(workdir, tta=tta, store_name="s")))
    other = FeatureStore.open(extract(_config(workdir, tta=next(m for m in TTA_MODES if m != tta), store_name="o")))
    run = train(tiny_config(workdir, store="s", epochs=1, hidden_dim=8, run_name="r"))
    predictor = Predictor.load(run)  # reads the mode from the store's config.json, nothing passed by hand
    assert predictor.extract_config.tta == tta
    rows = store.split_indices("train")
    served = predictor.image_features(_store_pictures(store, workdir, rows), batch_size=4)
    assert _close(served, store.read(rows), 2e-3)
    assert not _close(served, other.read(rows), 2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flip_mean_on_cuda_matches_explicit_mirror() -> None:
    backbone = create_backbone(BACKBONE, random_init=True)
    preprocess, runner = Preprocessor(backbone.spec), InferenceRunner(backbone, precision="float32", device="cuda")
    images = _images(3, preprocess.size[1])
    plain = runner(preprocess.pack(images))["pooled"]
    mirrored = runner(preprocess.pack([image.flip(-1) for image in images]))["pooled"]
    assert _close(runner(preprocess.pack(images), tta="flip_mean")["pooled"], (plain + mirrored) / 2, 1e-3)
