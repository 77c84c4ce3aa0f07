"""One FeatureExtractor for extraction and serving (issue 11): its features are the store's rows bit for bit, the
Predictor's are too, the store's config.json records the engine, the Predictor warns when its engine is another, and
production code (features/, predict/) never imports the synthetic demo generator."""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import bson
import numpy as np
import pytest
import torch
from PIL import Image

from prodcat.config import ExtractConfig, IngestConfig, load_config
from prodcat.data.catalog import ingest
from prodcat.data.images import decode_image
from prodcat.data.taxonomy import Taxonomy
from prodcat.features.extract import extract
from prodcat.features.extractor import FeatureExtractor, input_size
from prodcat.features.store import FeatureStore
from prodcat.paths import WorkPaths

if TYPE_CHECKING:
    from prodcat.predict.predictor import Predictor

BACKBONE = "test_efficientnet"  # timm's tiny test network: random init, a few ms per batch
SOURCE = Path(__file__).resolve().parents[2] / "src" / "prodcat"


def _picture(seed: int) -> bytes:
    """A JPEG of noise, 40 or 64 pixels a side: neither is the backbone's input size, so every picture is resized."""
    rng = np.random.default_rng(seed)
    side = 40 if seed % 2 else 64
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(side, side, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


PICTURES = {pid: [_picture(pid * 10 + k) for k in range(1 + pid % 2)] for pid in (*range(8), 100, 101)}


def _make_data(root: Path) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    categories = [1000000001 + i for i in range(2)]
    lines = ["category_id,category_level1,category_level2,category_level3"]
    lines += [f"{c},MAISON,GROUPE {i},FEUILLE {i}" for i, c in enumerate(categories)]
    (data / "category_names.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name, products in (("train", range(8)), ("test", (100, 101))):
        with open(data / f"{name}.bson", "wb") as handle:
            for pid in products:
                doc = {"_id": pid, "imgs": [{"picture": bson.Binary(p)} for p in PICTURES[pid]]}
                if name == "train":
                    doc["category_id"] = categories[pid % 2]
                handle.write(bson.encode(doc))
    return data


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("extractor")
    work = root / "W"
    ingest(IngestConfig(data_dir=str(_make_data(root)), workdir=str(work), val_fraction=0.25, seed=0))
    return work


def _config(workdir: Path, **overrides: object) -> ExtractConfig:
    # One shard and one batch hold every row, so extraction's single forward sees exactly the pictures given below.
    values = dict(
        workdir=str(workdir), backbone=BACKBONE, random_init=True, batch_size=64, shard_size=64, workers=0,
        precision="float32", splits=("train", "val", "holdout", "test"),
    )  # fmt: skip
    values.update(overrides)
    return ExtractConfig(**values)


def _store_pictures(store: FeatureStore) -> list[torch.Tensor]:
    """The decoded pictures of every store row, in row order."""
    pairs = zip(store.column("product_id").tolist(), store.column("image_index").tolist(), strict=True)
    return [decode_image(PICTURES[pid][index]) for pid, index in pairs]


STORES = {
    "pooled": {},
    "spatial_flip": dict(features="spatial", spatial_channels=8, tta="flip_mean"),
    "auto": dict(precision="auto"),  # the engine auto picks on this machine (bf16, ONNX Runtime or PyTorch)
}


@pytest.fixture(scope="module", params=list(STORES))
def made(request: pytest.FixtureRequest, workdir: Path) -> tuple[ExtractConfig, FeatureStore]:
    path = extract(_config(workdir, store_name=request.param, **STORES[request.param]))
    return load_config(ExtractConfig, path / "config.json"), FeatureStore.open(path)


@pytest.fixture(scope="module")
def pooled(workdir: Path) -> tuple[ExtractConfig, FeatureStore]:
    """The plain store (made once: `made` or this, whichever runs first; the other finds it complete)."""
    path = extract(_config(workdir, store_name="pooled"))
    return load_config(ExtractConfig, path / "config.json"), FeatureStore.open(path)


def test_extractor_features_are_the_stored_rows_bit_for_bit(made: tuple[ExtractConfig, FeatureStore]) -> None:
    config, store = made
    assert store.column("valid").all()
    extractor = FeatureExtractor.from_config(config, device="cpu")
    features = extractor(_store_pictures(store))
    assert features.dtype == np.float16 and features.shape == (len(store), *store.feature_shape)
    np.testing.assert_array_equal(features, store.read_all())
    # A packed batch is the same input as the pictures it packs.
    np.testing.assert_array_equal(extractor(extractor.pack(_store_pictures(store)[:3])), features[:3])


def test_store_config_records_the_engine(made: tuple[ExtractConfig, FeatureStore]) -> None:
    config, store = made
    extractor = FeatureExtractor.from_config(config, device="cpu")
    assert config.engine == store.manifest["mode"] == extractor.engine
    assert config.engine.startswith("cpu-")
    if config.precision == "float32":
        assert config.engine.startswith("cpu-fp32")


def _predictor(config: ExtractConfig, store: FeatureStore) -> Predictor:
    from prodcat.predict.predictor import Predictor

    taxonomy = Taxonomy.load(WorkPaths(config.workdir).taxonomy)
    model = torch.nn.Linear(int(np.prod(store.feature_shape)), taxonomy.num_classes)  # never reached here
    return Predictor(model, taxonomy, config, {}, Path(config.workdir) / "runs" / "r", store_name=store.path.name)


def test_predictor_image_features_equal_stored_rows(
    made: tuple[ExtractConfig, FeatureStore], caplog: pytest.LogCaptureFixture
) -> None:
    config, store = made
    predictor = _predictor(config, store)
    with caplog.at_level(logging.WARNING, logger="prodcat.features.extractor"):
        served = predictor.image_features(_store_pictures(store), batch_size=len(store))
    assert served.dtype == np.float32
    np.testing.assert_array_equal(served, store.read_all().astype(np.float32))
    assert "made by" not in caplog.text  # the same engine as the store's: nothing to warn about


def test_predictor_warns_when_its_engine_differs_from_the_store(
    pooled: tuple[ExtractConfig, FeatureStore], caplog: pytest.LogCaptureFixture
) -> None:
    config, store = pooled
    recorded = "cuda-bf16-autocast-channels_last-bn-folded"
    predictor = _predictor(dataclasses.replace(config, engine=recorded), store)
    with caplog.at_level(logging.WARNING, logger="prodcat.features.extractor"):
        predictor.image_features(_store_pictures(store)[:2])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert recorded in warnings[0] and "cpu-fp32" in warnings[0] and store.path.name in warnings[0]
    caplog.clear()
    predictor.image_features(_store_pictures(store)[:2])  # built once, warned once
    assert not caplog.records


def test_engine_check_skips_stores_from_before_engines_were_recorded(
    pooled: tuple[ExtractConfig, FeatureStore], caplog: pytest.LogCaptureFixture
) -> None:
    config, _ = pooled
    extractor = FeatureExtractor.from_config(config, device="cpu")
    with caplog.at_level(logging.WARNING, logger="prodcat.features.extractor"):
        assert not extractor.warn_if_engine_differs(None, "old")
        assert not extractor.warn_if_engine_differs(extractor.engine, "same")
        assert extractor.warn_if_engine_differs("cpu-onnxruntime-fp32-bn-folded", "other")
    assert len(caplog.records) == 1


def test_extractor_refuses_float_input_and_bad_settings(workdir: Path) -> None:
    config = _config(workdir)
    extractor = FeatureExtractor.from_config(config, device="cpu")
    with pytest.raises(ValueError, match="uint8"):
        extractor(torch.zeros(1, 3, *extractor.spec.image_size))
    with pytest.raises(ValueError, match="kind"):
        FeatureExtractor(extractor.runner, kind="logits")
    with pytest.raises(ValueError, match="tta"):
        FeatureExtractor(extractor.runner, tta="crops")
    assert input_size(config) == extractor.spec.image_size == extractor.preprocess.size


def test_production_code_never_imports_the_demo_generator() -> None:
    """features/ and predict/ run in production (extract, serve): the synthetic demo data must stay out of them."""
    offenders = [
        str(path.relative_to(SOURCE))
        for folder in ("features", "predict")
        for path in sorted((SOURCE / folder).rglob("*.py"))
        if any(name in path.read_text(encoding="utf-8") for name in ("data.synthetic", "data/synthetic"))
    ]
    assert not offenders, f"import the demo generator: {offenders}"
