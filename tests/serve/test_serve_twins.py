"""The HTTP answer says when a photo is byte-identical to training pictures (issue 10), with a real Predictor."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import xxhash
from fastapi.testclient import TestClient
from serve_rows import ROWS

from prodcat.config import ExtractConfig, ServeConfig
from prodcat.data.taxonomy import Taxonomy
from prodcat.paths import WorkPaths
from prodcat.predict.predictor import Predictor
from prodcat.serve.app import create_app
from prodcat.utils import write_json


def _catalog(root: Path, products: list[tuple[int, int, str, list[bytes]]]) -> None:
    paths = WorkPaths(root)
    paths.catalog.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "product_id": pa.array([p[0] for p in products], pa.int64()),
                "label": pa.array([p[1] for p in products], pa.int32()),
                "split": pa.array([p[2] for p in products]),
            }
        ),
        paths.catalog_table("train"),
    )
    pictures = [(p[0], i, data) for p in products for i, data in enumerate(p[3])]
    pq.write_table(
        pa.table(
            {
                "source": pa.array(["train"] * len(pictures)),
                "product_id": pa.array([p[0] for p in pictures], pa.int64()),
                "image_index": pa.array([p[1] for p in pictures], pa.int16()),
                "hash": pa.array([xxhash.xxh3_128_digest(p[2]) for p in pictures], pa.binary(16)),
                "offset": pa.array([0] * len(pictures), pa.int64()),
                "length": pa.array([len(p[2]) for p in pictures], pa.int32()),
            }
        ),
        paths.catalog / "pictures.parquet",
    )


@pytest.fixture
def photos(make_jpeg: Callable) -> dict[str, bytes]:
    return {"stock": make_jpeg(1, seed=1), "val": make_jpeg(2, seed=2), "new": make_jpeg(3, seed=3)}


@pytest.fixture
def client(tmp_path: Path, photos: dict[str, bytes]) -> Iterator[TestClient]:
    # Two train products hold the stock photo (leaf 4), a val product holds "val": it must never count.
    _catalog(tmp_path, [(1, 4, "train", [photos["stock"]]), (2, 4, "train", [photos["stock"]]),
                        (3, 5, "val", [photos["val"]])])  # fmt: skip
    taxonomy = Taxonomy.from_rows(ROWS, {row[0]: 10 for row in ROWS})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, len(ROWS)), torch.nn.LogSoftmax(dim=1))  # test_efficientnet: 256
    config = ExtractConfig(workdir=str(tmp_path), backbone="test_efficientnet", random_init=True, precision="float32")
    run = tmp_path / "runs" / "r"
    write_json(run / "eval" / "twins.json", {"mode": "override", "weight": None})  # as if chosen on val
    predictor = Predictor(model, taxonomy, config, {}, run)
    with TestClient(create_app(predictor, ServeConfig(batch_window_ms=1.0))) as test_client:
        yield test_client


def _classify(client: TestClient, *payloads: bytes) -> dict:
    files = [("images", (f"p{i}.jpg", data, "image/jpeg")) for i, data in enumerate(payloads)]
    response = client.post("/v1/classify", files=files)
    assert response.status_code == 200, response.text
    return response.json()


def test_training_photo_is_reported_and_used(client: TestClient, photos: dict[str, bytes]) -> None:
    body = _classify(client, photos["new"], photos["stock"])
    assert body["training_matches"] == {"pictures_matched": 1, "products": 2, "images": [1], "applied": "override"}
    assert body["top"][0]["label"] == 4  # both twins are leaf 4: override
    assert body["top"][0]["probability"] > 0.99  # unanimous twins


def test_new_photo_and_val_photo_have_no_match(client: TestClient, photos: dict[str, bytes]) -> None:
    assert _classify(client, photos["new"])["training_matches"] is None
    assert _classify(client, photos["val"])["training_matches"] is None  # val products are not training twins


def test_fake_predictor_without_twins_answers_null(make_predictor: Callable, make_jpeg: Callable) -> None:
    with TestClient(create_app(make_predictor(), ServeConfig(batch_window_ms=1.0))) as test_client:
        assert _classify(test_client, make_jpeg(2))["training_matches"] is None
