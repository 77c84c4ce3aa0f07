"""The scale rehearsal's building blocks at tiny sizes: 5,270-leaf generator, stage records, synthetic full store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from prodcat.config import DemoConfig
from prodcat.data.catalog import TEST_COLUMNS, TRAIN_COLUMNS
from prodcat.data.synthetic.demo import (
    CATEGORY_HEADER,
    category_counts,
    counts_from_images,
    generate_demo,
    make_taxonomy,
    read_taxonomy_rows,
)
from prodcat.features.store import FeatureStore
from prodcat.rehearsal.drivers import ARMS, RehearsalPlan, check_disk, run_rehearsal_full
from prodcat.rehearsal.records import run_stage
from prodcat.rehearsal.synthetic import REAL, STORE_NAME, FullPlan, picture_counts

RECORD_FIELDS = {"name", "seconds", "peak_rss_mb", "disk_growth_mb", "written_mb", "items", "unit", "throughput"}


def test_synthetic_taxonomy_has_the_real_shape_and_long_tail() -> None:
    rows = make_taxonomy(5270, seed=0)
    assert len(rows) == 5270 and len({r.category_id for r in rows}) == 5270
    assert len({r.level1 for r in rows}) == 49
    assert 470 <= len({(r.level1, r.level2) for r in rows}) <= 500
    counts = category_counts(5270, 5270 * 3, seed=0)
    assert counts.sum() == 5270 * 3 and counts.min() >= 1
    assert counts.max() >= 30 * np.median(counts)  # the long tail: the largest leaf dwarfs the median one


def test_real_taxonomy_and_counts_set_the_leaves(shared_data_dir: Path) -> None:
    if not (shared_data_dir / "images_per_category.json").is_file():
        pytest.skip(f"no images_per_category.json in {shared_data_dir}")
    rows = read_taxonomy_rows(shared_data_dir / "category_names.csv")
    assert len(rows) == 5270 and len({r.level1 for r in rows}) == 49
    images = {int(k): v for k, v in json.loads((shared_data_dir / "images_per_category.json").read_text()).items()}
    counts = counts_from_images(shared_data_dir / "images_per_category.json", rows, 20_000)
    assert counts.sum() == 20_000 and counts.min() >= 1
    weights = np.array([images[r.category_id] for r in rows])
    largest = int(np.argmax(weights))
    assert counts[largest] == counts.max() and counts[largest] >= 0.9 * weights[largest] / weights.sum() * 20_000
    assert np.median(counts) <= 2  # the real tail at ~4 products per leaf: half the leaves hold one or two


def _write_sources(tmp_path: Path, leaves: int) -> tuple[Path, Path, dict[int, int]]:
    rows = make_taxonomy(leaves, seed=3)
    csv_path, json_path = tmp_path / "names.csv", tmp_path / "images.json"
    csv_path.write_text(",".join(CATEGORY_HEADER) + "\n" + "".join(f"{r.category_id},{r.level1},{r.level2},{r.level3}\n"
                                                                  for r in rows), encoding="utf-8")  # fmt: skip
    images = {r.category_id: int(5 + 400 * (i == 7) + i % 3) for i, r in enumerate(rows)}  # leaf 7 is the big one
    json_path.write_text(json.dumps({str(k): v for k, v in images.items()}))
    return csv_path, json_path, images


def test_generate_demo_from_a_taxonomy_file_and_counts(tmp_path: Path) -> None:
    csv_path, json_path, images = _write_sources(tmp_path, 30)
    config = DemoConfig(products=240, test_products=12, categories=30, taxonomy_csv=str(csv_path),
                        category_counts_json=str(json_path), stock_share=0.6)  # fmt: skip
    summary = generate_demo(tmp_path / "data", config)
    assert (tmp_path / "data" / "category_names.csv").read_text(encoding="utf-8") == csv_path.read_text("utf-8")
    assert summary["categories"] == 30 and summary["largest_category_products"] >= 0.5 * 240
    assert 0.15 < summary["train_duplicate_share"] < 0.7  # stock photos and placeholders repeat pictures
    with pytest.raises(ValueError, match="pass --categories 30"):
        generate_demo(tmp_path / "bad", DemoConfig(products=240, categories=31, taxonomy_csv=str(csv_path)))


def test_default_demo_taxonomy_is_unchanged_by_the_extension(tmp_path: Path) -> None:
    config = DemoConfig(products=20, test_products=2, categories=10)
    summary = generate_demo(tmp_path, config)
    names = (tmp_path / "category_names.csv").read_text(encoding="utf-8").splitlines()[1:]
    expected = make_taxonomy(10, 0, config.resolved_text_leaves())  # the default demo's cover leaves included
    assert [line.split(",")[0] for line in names] == [str(r.category_id) for r in expected]
    assert summary["train_products"] == 20


def test_picture_counts_hit_the_real_totals_exactly() -> None:
    assert tuple(picture_counts(REAL["train_products"], REAL["train_images"])) == REAL["images_per_product"]
    test = picture_counts(REAL["test_products"], REAL["test_images"])
    assert test.sum() == REAL["test_products"] and int(test @ np.arange(1, 5)) == REAL["test_images"]
    small = picture_counts(100, 175)
    assert small.sum() == 100 and int(small @ np.arange(1, 5)) == 175
    with pytest.raises(ValueError):
        picture_counts(10, 41)


@pytest.mark.parametrize("isolate", [False, True])
def test_stage_records_memory_and_disk(tmp_path: Path, isolate: bool) -> None:
    kwargs = {"path": str(tmp_path / "blob"), "megabytes": 64}
    result, record = run_stage("probe", "prodcat.rehearsal.stages:probe_stage", kwargs, tmp_path, isolate=isolate)
    assert result["items"] == 64 and record.unit == "MB" and record.isolated is isolate
    assert record.peak_rss_mb >= 64 and 63 <= record.disk_growth_mb <= 65
    assert record.throughput is not None and record.throughput > 0
    assert RECORD_FIELDS <= set(record.as_json())


def test_rehearsal_arms_share_one_optimizer_and_the_sampled_setting() -> None:
    plan = RehearsalPlan()
    configs = [plan.train_config("W", head, loss, 0) for head, loss in ARMS]
    assert {c["optimizer"] for c in configs} == {"adamw"} and {c["num_sampled"] for c in configs} == {1024}
    assert {c["sampler"] for c in configs} == {"log_uniform"} and len({c["run_name"] for c in configs}) == len(ARMS)
    assert {(c["head"], c["loss"]) for c in configs} >= {
        ("linear", "softmax"),
        ("linear", "sampled"),
        ("hier", "softmax"),
    }


def test_full_store_at_small_size_feeds_train_evaluate_predict(tmp_path: Path) -> None:
    plan = FullPlan(products=1500, test_products=150, categories=40, dim=16, shard_size=512, train_steps=30,
                    batch_size=64, num_sampled=8, bootstrap_resamples=20, lr=0.05)  # fmt: skip
    payload = run_rehearsal_full(tmp_path, plan, isolate=False)
    store = FeatureStore.open(tmp_path / "features" / STORE_NAME)
    assert len(store) == plan.train_images() + plan.test_images() and store.num_shards > 1
    assert store.rows["row"].type.bit_width == 64 and store.feature_shape == (16,)
    assert pq.read_schema(tmp_path / "catalog" / "train.parquet").names == list(TRAIN_COLUMNS)
    assert pq.read_schema(tmp_path / "catalog" / "test.parquet").names == list(TEST_COLUMNS)
    holdout = len(np.unique(store.column("product_id")[store.split_indices("holdout")]))
    assert 0.02 * plan.products < holdout < 0.09 * plan.products
    names = [stage["name"] for stage in payload["stages"]]
    assert names[0] == "synthetic store" and names[-1] == "predict test (store)" and len(names) == 6
    assert all(RECORD_FIELDS <= set(stage) for stage in payload["stages"])
    runs = payload["results"]["runs"]
    assert {run["loss"] for run in runs.values()} == {"sampled", "softmax"}
    for run in runs.values():
        assert run["train"]["steps"] == 30 and run["train"]["epoch_seconds"] > 0
        assert "holdout" in run["holdout"]["protocol"] and run["holdout"]["product_top1"] > 0.1  # chance is ~0.03
    lines = (tmp_path / "submission.csv").read_text().splitlines()
    catalog_ids = pq.read_table(tmp_path / "catalog" / "test.parquet")["product_id"].to_pylist()
    assert lines[0] == "_id,category_id" and [int(line.split(",")[0]) for line in lines[1:]] == catalog_ids
    assert payload["results"]["submission"]["rows"] == plan.test_products
    assert json.loads((tmp_path / "reports" / "rehearsal.json").read_text())["kind"] == "full"
    assert (tmp_path / "reports" / "at_scale" / "index.html").is_file()
    assert (tmp_path / "reports" / "at_scale" / "curves.png").read_bytes()[:4] == b"\x89PNG"  # drawn by report/


def test_full_plan_refuses_a_store_the_disk_cannot_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**9, 10**9))
    with pytest.raises(OSError, match=r"needs about 4\d\.\d GB; free space or pass --dim \d+"):
        check_disk(tmp_path, FullPlan())


def test_cli_rehearsal_commands_refuse_bad_sizes_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from prodcat.cli import app

    result = CliRunner().invoke(app, ["rehearsal", "--workdir", str(tmp_path), "--products", "10"])
    assert result.exit_code == 2 and "must be >= categories" in result.output
    result = CliRunner().invoke(app, ["rehearsal-full", "--workdir", str(tmp_path), "--steps", "0"])
    assert result.exit_code == 2 and "must be >= 1" in result.output
    assert not (tmp_path / "features").exists()  # refused before writing anything


def test_directory_bytes_counts_a_hard_link_once(tmp_path: Path) -> None:
    from prodcat.rehearsal.records import directory_bytes

    (tmp_path / "last.pt").write_bytes(b"x" * 1000)
    (tmp_path / "best.pt").hardlink_to(tmp_path / "last.pt")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "other").write_bytes(b"y" * 24)
    assert directory_bytes(tmp_path) == 1024 and directory_bytes(tmp_path / "missing") == 0


def test_a_failing_stage_is_recorded_before_the_error_surfaces(tmp_path: Path) -> None:
    from prodcat.rehearsal.drivers import _Recorder

    recorder = _Recorder(tmp_path, "full", FullPlan(products=10, test_products=2), isolate=False)
    with pytest.raises(FileNotFoundError):
        recorder.stage("explore", "explore_stage", workdir=str(tmp_path))
    saved = json.loads((tmp_path / "reports" / "rehearsal.json").read_text())
    assert saved["failed"]["stage"] == "explore" and "FileNotFoundError" in saved["failed"]["error"]


def test_resume_reuses_finished_stages_and_refuses_another_plan(tmp_path: Path) -> None:
    from prodcat.rehearsal.drivers import _Recorder

    plan = FullPlan(products=10, test_products=2)
    first = _Recorder(tmp_path, "full", plan, isolate=False)
    done = first.stage("probe", "probe_stage", path=str(tmp_path / "probe.bin"), megabytes=3)
    assert done["items"] == 3
    # a later run of the same plan (another number of seeds is allowed) gets the result back without running it
    again = _Recorder(tmp_path, "full", plan, isolate=False, resume=True)
    reused = again.stage("probe", "missing_stage_would_fail_if_run")
    assert reused["items"] == 3 and again.records[0].seconds == first.records[0].seconds
    saved = json.loads((tmp_path / "reports" / "rehearsal.json").read_text())
    assert saved["resumed_from"]["stages"] == ["probe"] and [s["name"] for s in saved["stages"]] == ["probe"]
    with pytest.raises(ValueError, match=r"different plan \(products: 10 there, 20 now\)"):
        _Recorder(tmp_path, "full", FullPlan(products=20, test_products=2), isolate=False, resume=True)
    fresh = _Recorder(tmp_path / "new", "full", plan, isolate=False, resume=True)  # nothing earlier: starts afresh
    assert fresh.done == {}
