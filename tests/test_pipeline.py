"""End to end: `prodcat demo --quick`, and ingest -> extract -> train -> predict on the real Kaggle example file."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import bson
import pytest
import torch
from typer.testing import CliRunner

from prodcat.cli import app
from prodcat.config import ExtractConfig, IngestConfig, TrainConfig
from prodcat.data.catalog import ingest
from prodcat.data.taxonomy import read_category_csv
from prodcat.features.extract import extract
from prodcat.pipeline import run_demo
from prodcat.predict.submission import predict_bson
from prodcat.train.loop import train

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cdiscount"


def _submission(path: Path) -> list[tuple[int, int]]:
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["_id", "category_id"]
        return [(int(a), int(b)) for a, b in reader]


def _bson_ids(path: Path) -> list[int]:
    with open(path, "rb") as handle:
        return [int(doc["_id"]) for doc in bson.decode_file_iter(handle)]


def test_quick_demo_runs_every_stage(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    workdir = tmp_path / "demo"
    summary = run_demo(workdir, quick=True)
    report = Path(summary["report"])
    assert report.is_file() and "Gallery" in report.read_text(encoding="utf-8")
    # loss x optimizer: every loss with adamw, the optimizer factor on the sampled loss (quick plan); names say both.
    arms = [("softmax", "adamw"), ("sampled", "adamw"), ("adaptive", "adamw"), ("sampled", "rowwise_adamw")]
    assert sorted(summary["runs"]) == sorted(f"compare-{loss}-{name}-s0" for loss, name in arms)
    for loss, name in arms:
        run_dir = workdir / "runs" / f"compare-{loss}-{name}-s0"
        assert json.loads((run_dir / "config.json").read_text())["optimizer"] == name
        metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
        assert 0.0 <= metrics["image"]["top1"] <= 1.0
        assert metrics["product"]["aggregation"] in ("mean_prob", "mean_logprob", "vote")
    compared = json.loads((workdir / "reports" / "compare" / "compare.json").read_text())
    assert any("synthetic" in note for note in compared["notes"])
    rows = _submission(workdir / "submission.csv")
    assert [product_id for product_id, _ in rows] == _bson_ids(workdir / "data" / "test.bson")
    known = {row[0] for row in read_category_csv(workdir / "data" / "category_names.csv")}
    assert all(category in known for _, category in rows)
    # Better than always answering the most frequent category on validation.
    best = summary["runs"][summary["best_run"]]
    assert best["product_top1"] > 0.5
    assert (workdir / "reports" / "compare" / "compare.png").is_file()


def test_real_example_file_ingest_extract_predict(tmp_path: Path) -> None:
    if not (SHARED / "train_example.bson").is_file():
        pytest.skip(f"real Kaggle files absent: {SHARED} (only in the developers' workspace)")
    torch.set_num_threads(2)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(SHARED / "train_example.bson", data / "train.bson")
    shutil.copy(SHARED / "category_names.csv", data / "category_names.csv")
    workdir = tmp_path / "W"
    ingest(IngestConfig(data_dir=str(data), workdir=str(workdir), val_fraction=0.1, seed=0))
    extract(
        ExtractConfig(
            workdir=str(workdir), backbone="efficientnet_lite0", splits=("train", "val"), batch_size=32, workers=0
        )
    )
    run = train(
        TrainConfig(
            workdir=str(workdir),
            head="linear",
            loss="softmax",
            max_steps=20,
            batch_size=32,
            eval_every=10,
            warmup_steps=2,
            run_name="real",
        )
    )
    out = tmp_path / "submission.csv"
    summary = predict_bson(run, data / "train.bson", out)
    rows = _submission(out)
    assert summary["products"] == len(rows) == 82
    assert [product_id for product_id, _ in rows] == _bson_ids(data / "train.bson")
    known = {row[0] for row in read_category_csv(data / "category_names.csv")}
    assert all(category in known for _, category in rows)
    # The real example is tiny; still, a head trained on it should fit most of its own products.
    truth = {int(doc["_id"]): int(doc["category_id"]) for doc in bson.decode_file_iter(open(data / "train.bson", "rb"))}
    assert sum(truth[pid] == cat for pid, cat in rows) / len(rows) > 0.3


def test_predict_cli_never_drops_a_product_with_bad_pictures(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    workdir = tmp_path / "demo"
    run_demo_dir = tmp_path / "src"
    from prodcat.config import DemoConfig
    from prodcat.data.synthetic.demo import generate_demo

    generate_demo(run_demo_dir, DemoConfig(products=60, test_products=0, categories=4, seed=1))
    ingest(IngestConfig(data_dir=str(run_demo_dir), workdir=str(workdir), val_fraction=0.2))
    extract(
        ExtractConfig(
            workdir=str(workdir),
            backbone="test_efficientnet",
            random_init=True,
            splits=("train", "val"),
            batch_size=32,
            workers=0,
        )
    )
    run = train(
        TrainConfig(
            workdir=str(workdir),
            store="test_efficientnet-pooled",
            max_steps=5,
            batch_size=16,
            eval_every=5,
            warmup_steps=1,
            run_name="tiny",
        )
    )
    bad = tmp_path / "test.bson"
    with open(bad, "wb") as handle:
        handle.write(bson.encode({"_id": 7, "imgs": [{"picture": bson.Binary(b"not a jpeg")}]}))
        handle.write(bson.encode({"_id": 8, "imgs": []}))
        with open(run_demo_dir / "train.bson", "rb") as source:
            first = next(bson.decode_file_iter(source))
        handle.write(bson.encode({"_id": 9, "imgs": first["imgs"]}))
    out = tmp_path / "sub.csv"
    result = CliRunner().invoke(app, ["predict", "--run", str(run), "--bson", str(bad), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = _submission(out)
    assert [pid for pid, _ in rows] == [7, 8, 9]
    assert "2 without decodable images" in result.output


def _headline(val: float, reported: float) -> dict:
    return {
        "val_product_top1": val,
        "val_products": 90,
        "split": "holdout",
        "product_top1": reported,
        "product_top1_ci95": [reported - 0.05, reported + 0.04],
        "products": 120,
        "image_top1": reported - 0.02,
        "aggregation": "mean_prob",
    }


def test_demo_closing_lines_rank_by_val_and_say_what_to_run_next(tmp_path: Path) -> None:
    from prodcat.pipeline import best_run, summary_lines

    # The holdout would pick "b"; the best run is chosen on val, so it is "a".
    runs = {"a": _headline(0.81234, 0.70), "b": _headline(0.79, 0.75)}
    assert best_run(runs) == "a"
    summary = {
        "runs": runs,
        "best_run": "a",
        "best_run_dir": str(tmp_path / "runs" / "a"),
        "report": str(tmp_path / "reports" / "index.html"),
        "submission": str(tmp_path / "submission.csv"),
        "seconds": {"ingest": 1.2, "compare": 83.4},
    }
    text = "\n".join(summary_lines(summary))
    assert "synthetic" in text
    assert "best run: a, chosen on val product top-1 0.812 (n = 90 products; 2 runs compared)" in text
    assert "holdout product top-1: 0.700, 95% interval [0.650, 0.740], n = 120 products" in text
    assert f"written by a): {tmp_path / 'submission.csv'}" in text
    assert f"report: file://{tmp_path}/reports/index.html" in text
    assert f"try next: .venv/bin/prodcat serve --run {tmp_path / 'runs' / 'a'} --port 8000" in text
    assert "compare                    83" in text and "total                      85" in text
