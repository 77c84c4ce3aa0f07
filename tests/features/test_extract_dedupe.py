"""Extraction with dedupe (issue 10): one forward per distinct picture, copies share the vector, same store as
without dedupe, kill -9 and resume, partial shards of a distributed run, and the old path when the table is absent."""

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
import torch
from PIL import Image

from picture_table import write_picture_table
from prodcat.config import ExtractConfig, IngestConfig
from prodcat.data.catalog import ingest
from prodcat.features import extract as extract_module
from prodcat.features.extract import extract, plan_rows
from prodcat.features.store import FeatureStore, StoreError

BACKBONE = "test_efficientnet"


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


POOL = [_jpeg(seed) for seed in range(7)] + [_jpeg(99)[:150]]  # the last one is truncated: masked, never fatal


def _make_data(root: Path) -> Path:
    """18 train products drawing 1-3 pictures from a pool of 8 (so most rows repeat), 4 test products sharing some."""
    data = root / "data"
    data.mkdir(parents=True)
    categories = [1000000001 + i for i in range(3)]
    lines = ["category_id,category_level1,category_level2,category_level3"]
    lines += [f"{c},MAISON,GROUPE {i % 2},FEUILLE {i}" for i, c in enumerate(categories)]
    (data / "category_names.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(data / "train.bson", "wb") as handle:
        for pid in range(18):
            pictures = [POOL[(pid * 3 + k) % len(POOL)] for k in range(1 + pid % 3)]
            doc = {
                "_id": pid,
                "imgs": [{"picture": bson.Binary(p)} for p in pictures],
                "category_id": categories[pid % 3],
            }
            handle.write(bson.encode(doc))
    with open(data / "test.bson", "wb") as handle:
        for pid in range(100, 104):
            picture = POOL[pid % 4] if pid < 103 else _jpeg(pid)
            handle.write(bson.encode({"_id": pid, "imgs": [{"picture": bson.Binary(picture)}]}))
    return data


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "W"
    ingest(IngestConfig(data_dir=str(_make_data(tmp_path)), workdir=str(work), val_fraction=0.3, seed=0))
    write_picture_table(work)
    return work


def _config(workdir: Path, **overrides: object) -> ExtractConfig:
    values = dict(
        workdir=str(workdir), backbone=BACKBONE, random_init=True, batch_size=3, shard_size=5, workers=0,
        precision="float32",
    )  # fmt: skip
    values.update(overrides)
    return ExtractConfig(**values)


def _row_pictures(workdir: Path, store: FeatureStore) -> list[bytes]:
    """The picture bytes of every store row, read back from the BSON files."""
    plan = plan_rows(workdir, tuple(store.manifest["splits"]), dedupe=False)
    out = []
    for row in range(plan.rows.num_rows):
        data = Path(plan.sources[int(plan.source[row])]).read_bytes()
        offset, length = int(plan.offset[row]), int(plan.length[row])
        out.append(bytes(bson.decode(data[offset : offset + length])["imgs"][int(plan.image_index[row])]["picture"]))
    return out


def test_copies_share_vectors_and_each_distinct_picture_is_run_once(workdir: Path, monkeypatch) -> None:
    fed: list[int] = []
    from prodcat.features.inference import InferenceRunner

    original = InferenceRunner.__call__

    def counting(self: InferenceRunner, batch: torch.Tensor, **kwargs: object) -> dict[str, torch.Tensor]:
        if batch.dtype == torch.uint8:  # the pipeline's packed batches (not the float shape probe)
            fed.append(int(batch.shape[0]))
        return original(self, batch, **kwargs)

    monkeypatch.setattr(InferenceRunner, "__call__", counting)
    store = FeatureStore.open(extract(_config(workdir)))
    pictures = _row_pictures(workdir, store)
    distinct = len(set(pictures))
    assert len(store) == len(pictures) > distinct + 10  # duplicate-rich
    # The backbone saw every distinct decodable picture once and no copy (the truncated one fails to decode, once).
    assert sum(fed) == distinct - 1
    dedupe = store.manifest["dedupe"]
    assert dedupe["enabled"] and dedupe["computed"] == distinct and dedupe["copied"] == len(store) - distinct
    features, valid = store.read_all(), store.column("valid")
    by_picture: dict[bytes, list[int]] = {}
    for row, picture in enumerate(pictures):
        by_picture.setdefault(picture, []).append(row)
    for rows in by_picture.values():
        assert len(set(valid[rows])) == 1  # a bad picture is masked in every row holding it
        np.testing.assert_array_equal(features[rows], np.repeat(features[rows[:1]], len(rows), axis=0))
    assert (~valid).sum() == len(by_picture[POOL[-1]]) >= 2
    assert np.abs(features[valid]).sum() > 0


def test_dedupe_store_equals_store_without_dedupe(workdir: Path) -> None:
    with_dedupe = FeatureStore.open(extract(_config(workdir, store_name="on")))
    without = FeatureStore.open(extract(_config(workdir, store_name="off", dedupe=False)))
    assert without.manifest["dedupe"]["enabled"] is False and without.manifest["dedupe"]["copied"] == 0
    assert with_dedupe.rows.equals(without.rows)
    np.testing.assert_array_equal(with_dedupe.read_all(), without.read_all())


def test_missing_picture_table_extracts_as_before(workdir: Path, caplog) -> None:
    (workdir / "catalog" / "pictures.parquet").unlink()
    with caplog.at_level("INFO", logger="prodcat.extract"):
        store = FeatureStore.open(extract(_config(workdir)))
    assert store.manifest["dedupe"]["enabled"] is False
    assert "pictures.parquet not found" in store.manifest["dedupe"]["reason"]
    assert sum("dedupe off" in record.getMessage() for record in caplog.records) == 1
    with pytest.raises(StoreError, match="dedupe off"):  # finishing it with dedupe on would mix the two
        write_picture_table(workdir)
        extract(_config(workdir))


def test_stale_picture_table_is_refused(workdir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = workdir / "catalog" / "pictures.parquet"
    table = pq.read_table(path)
    table = table.set_column(table.column_names.index("offset"), "offset", pa.compute.add(table["offset"], 1))
    pq.write_table(table, path)
    with pytest.raises(StoreError, match="does not match .*pictures.parquet"):
        extract(_config(workdir))


def test_partial_shards_of_other_ranks_are_completed(workdir: Path) -> None:
    """Two ranks, simulated in one process: rank 1's shards run first, so their copies wait for rank 0's shards."""
    from prodcat.distributed import DistInfo
    from prodcat.features.extractor import FeatureExtractor

    reference = FeatureStore.open(extract(_config(workdir, store_name="reference")))
    config = _config(workdir, store_name="ranks")
    extractor = FeatureExtractor.from_config(config)
    plan = plan_rows(workdir, config.splits)
    path = workdir / "features" / "ranks"
    info = DistInfo()
    store = extract_module._open_store(path, plan, extractor, config, info)
    shards = store.missing_shards()
    odd, even = shards[1::2], shards[0::2]
    extract_module._run_shards(store, odd, plan, extractor, config, info)
    assert any(store.is_partial(shard) for shard in odd)
    extract_module._run_shards(store, even, plan, extractor, config, info)
    extract_module._complete_partial(store, odd, plan.owner)
    assert not store.missing_shards() and not list((path / "shards").glob("*.part.json"))
    store.finalize()
    ranks = FeatureStore.open(path)
    assert ranks.rows.equals(reference.rows)
    np.testing.assert_array_equal(ranks.read_all(), reference.read_all())


def _cli(workdir: Path, name: str) -> list[str]:
    return [
        sys.executable, "-m", "prodcat", "extract", "--workdir", str(workdir), "--backbone", BACKBONE,
        "--random-init", "--batch-size", "2", "--shard-size", "4", "--workers", "0", "--precision", "float32",
        "--name", name,
    ]  # fmt: skip


def _store_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((path / "shards").glob("*.npy"))}


def test_kill_and_resume_with_dedupe_equals_uninterrupted_run(workdir: Path) -> None:
    subprocess.run(_cli(workdir, "reference"), check=True, capture_output=True)
    reference = workdir / "features" / "reference"
    env = dict(os.environ, PRODCAT_SLOW_SHARDS="0.5")
    process = subprocess.Popen(_cli(workdir, "resumed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shards = workdir / "features" / "resumed" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("*.json"))) < 1 and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(list(shards.glob("*.json")))
    assert 1 <= done_before < FeatureStore(reference).num_shards, "kill should land mid-run"
    subprocess.run(_cli(workdir, "resumed"), check=True, capture_output=True)
    assert _store_bytes(shards.parent) == _store_bytes(reference)
    assert FeatureStore.open(shards.parent).rows.equals(FeatureStore.open(reference).rows)
    assert FeatureStore.open(reference).manifest["dedupe"]["copied"] > 0


def test_two_torchrun_ranks_with_dedupe_match_single_process(workdir: Path) -> None:
    reference = FeatureStore.open(extract(_config(workdir, batch_size=2, shard_size=4, store_name="single")))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(29600 + os.getpid() % 1000)]  # fmt: skip
    result = subprocess.run([*torchrun, *_cli(workdir, "ranks")[1:], "--distributed"], capture_output=True, text=True,
                            timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = FeatureStore.open(workdir / "features" / "ranks")
    assert ranks.rows.equals(reference.rows) and ranks.manifest["dedupe"] == reference.manifest["dedupe"]
    assert not list((ranks.path / "shards").glob("*.part.json"))
    # Ranks run with fewer threads, which may reorder float sums; float16 storage absorbs nearly all of it.
    np.testing.assert_allclose(ranks.read_all(), reference.read_all(), rtol=2e-3, atol=2e-3)
