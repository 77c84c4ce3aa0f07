"""Extraction end to end on a tiny BSON: store contents, masked bad images, kill -9 and resume, torchrun ranks."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import bson
import numpy as np
import pytest
from PIL import Image

from prodcat.config import ExtractConfig, IngestConfig
from prodcat.data.catalog import ingest
from prodcat.features.extract import extract, plan_rows
from prodcat.features.store import FeatureStore

BACKBONE = "test_efficientnet"  # timm's tiny test network: random init, a few ms per batch


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _make_data(root: Path, products: int = 14) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    categories = [(1000000001 + i, "MAISON", f"GROUPE {i % 2}", f"FEUILLE {i}") for i in range(3)]
    lines = ["category_id,category_level1,category_level2,category_level3"]
    lines += [f"{c},{a},{b},{d}" for c, a, b, d in categories]
    (data / "category_names.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(data / "train.bson", "wb") as handle:
        for pid in range(products):
            pictures = [_jpeg(pid * 10 + k) for k in range(1 + pid % 3)]
            if pid == 5:
                pictures[0] = pictures[0][:200]  # truncated JPEG: must be masked, not fatal
            handle.write(
                bson.encode(
                    {
                        "_id": pid,
                        "imgs": [{"picture": bson.Binary(p)} for p in pictures],
                        "category_id": categories[pid % 3][0],
                    }
                )
            )
    with open(data / "test.bson", "wb") as handle:
        for pid in range(100, 104):
            handle.write(bson.encode({"_id": pid, "imgs": [{"picture": bson.Binary(_jpeg(pid))}]}))
    return data


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    data = _make_data(tmp_path)
    work = tmp_path / "W"
    ingest(IngestConfig(data_dir=str(data), workdir=str(work), val_fraction=0.3, seed=0))
    return work


def _config(workdir: Path, **overrides: object) -> ExtractConfig:
    values = dict(
        workdir=str(workdir),
        backbone=BACKBONE,
        random_init=True,
        batch_size=3,
        shard_size=5,
        workers=0,
        precision="float32",
    )
    values.update(overrides)
    return ExtractConfig(**values)


def _store_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((path / "shards").glob("*.npy"))}


def test_extract_writes_complete_store_with_masked_bad_image(workdir: Path) -> None:
    path = extract(_config(workdir))
    store = FeatureStore.open(path)
    plan = plan_rows(workdir, ("train", "val", "holdout", "test"))
    assert len(store) == plan.rows.num_rows == sum(1 + p % 3 for p in range(14)) + 4
    assert store.feature_shape == (256,)
    assert "random" in store.manifest["weights_id"]
    # Forced float32: no calibration ran, and the manifest says so beside the mode.
    assert store.manifest["mode"].startswith("cpu-fp32") and store.manifest["bf16_calibration_cosine"] is None
    valid = store.column("valid")
    bad = np.flatnonzero(~valid)
    assert len(bad) == 1
    assert store.column("product_id")[bad[0]] == 5 and store.column("image_index")[bad[0]] == 0
    errors = __import__("json").loads((path / "errors.json").read_text())
    assert len(errors) == 1 and errors[0]["product_id"] == 5 and errors[0]["image_index"] == 0
    assert errors[0]["reason"]
    features = store.read(np.flatnonzero(valid))
    assert np.isfinite(features).all() and np.abs(features).sum() > 0
    assert set(store.column("split")) == {"train", "val", "holdout", "test"}
    assert (store.column("label")[store.column("split") == "test"] == -1).all()
    assert (path / "config.json").is_file()


def test_spatial_features_keep_requested_channels(workdir: Path) -> None:
    store = FeatureStore.open(extract(_config(workdir, features="spatial", spatial_channels=16, splits=("val",))))
    assert len(store.feature_shape) == 3 and store.feature_shape[-1] == 16


def test_rerun_is_a_no_op_and_mismatch_is_refused(workdir: Path) -> None:
    path = extract(_config(workdir))
    before = _store_bytes(path)
    extract(_config(workdir))
    assert _store_bytes(path) == before
    with pytest.raises(Exception, match="different store"):
        extract(_config(workdir, shard_size=7))


def _cli(workdir: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "prodcat",
        "extract",
        "--workdir",
        str(workdir),
        "--backbone",
        BACKBONE,
        "--random-init",
        "--batch-size",
        "2",
        "--shard-size",
        "4",
        "--workers",
        "0",
        "--precision",
        "float32",
        *extra,
    ]


def test_kill_and_resume_equals_uninterrupted_run(workdir: Path, tmp_path: Path) -> None:
    # The reference runs in a subprocess too, so both see the same thread count (it changes float sums).
    subprocess.run([sys.executable, *_cli(workdir, "--name", "reference")], check=True, capture_output=True)
    reference = workdir / "features" / "reference"
    env = dict(os.environ, PRODCAT_SLOW_SHARDS="0.5")  # each shard waits, so the kill lands mid-run
    process = subprocess.Popen(
        [sys.executable, *_cli(workdir, "--name", "resumed")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    shards = workdir / "features" / "resumed" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("*.json"))) < 1 and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(list(shards.glob("*.json")))
    assert 1 <= done_before < FeatureStore(reference).num_shards, "kill should land mid-run"
    assert not FeatureStore(shards.parent).manifest.get("complete")
    subprocess.run([sys.executable, *_cli(workdir, "--name", "resumed")], check=True, capture_output=True)
    assert _store_bytes(shards.parent) == _store_bytes(reference)
    resumed, full = FeatureStore.open(shards.parent), FeatureStore.open(reference)
    assert resumed.rows.equals(full.rows)


def test_two_torchrun_ranks_match_single_process(workdir: Path) -> None:
    reference = FeatureStore.open(extract(_config(workdir, batch_size=2, shard_size=4, store_name="single")))
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(29500 + os.getpid() % 1000),
    ]
    result = subprocess.run(
        [*torchrun, *_cli(workdir, "--name", "ranks", "--distributed")], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = FeatureStore.open(workdir / "features" / "ranks")
    assert ranks.rows.equals(reference.rows)
    # Ranks run with fewer threads, which may reorder float sums; float16 storage absorbs nearly all of it.
    np.testing.assert_allclose(ranks.read_all(), reference.read_all(), rtol=2e-3, atol=2e-3)
