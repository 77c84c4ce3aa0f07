"""`prodcat ocr`: tables, failures reported without stopping, resume after a partial run, selection, the CLI."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from prodcat.cli import app
from prodcat.ocr.engine import EngineUnavailable, Word, create_engine
from prodcat.ocr.samples import ground_truth_words
from prodcat.ocr.stage import OcrConfig, OcrError, run_ocr
from prodcat.report.ocr_examples import draw_ocr_examples

PICTURES = 7  # products 1-4 (product 2 has two pictures), 5 and 6


class CountingEngine:
    """Reads one word per picture; counts calls; can fail on a given call or stop the run (a kill) after some."""

    name, version = "fake", "fake 1"

    def __init__(self, fail_on: int | None = None, stop_after: int | None = None) -> None:
        self.calls, self.fail_on, self.stop_after = 0, fail_on, stop_after

    def read(self, image: Image.Image) -> list[Word]:
        self.calls += 1
        if self.stop_after is not None and self.calls > self.stop_after:
            raise KeyboardInterrupt  # escapes the per-picture guard, as a kill would stop the run
        if self.calls == self.fail_on:
            raise RuntimeError("engine crashed on this one")
        return [Word("LIVRE", 0.9, (1, 2, 40, 20))]


def statuses(workdir: Path) -> dict[tuple[int, int], str]:
    table = pq.read_table(workdir / "ocr" / "pictures.parquet").to_pylist()
    return {(row["product_id"], row["image_index"]): row["status"] for row in table}


def test_tables_and_a_garbage_picture_reported_while_the_run_goes_on(cover_workdir) -> None:
    workdir, _ = cover_workdir
    engine = CountingEngine(fail_on=2)
    summary = run_ocr(OcrConfig(workdir=str(workdir), splits=("train",), shard_size=3, examples=2), engine=engine)
    found = statuses(workdir)
    assert len(found) == PICTURES and found[(6, 0)] == "failed"
    assert summary["failed"] == 2 and summary["ok"] == PICTURES - 2  # garbage bytes + the engine's crash
    reasons = pq.read_table(workdir / "ocr" / "pictures.parquet").column("reason").to_pylist()
    assert any("product 6 picture 0" in r and "ImageDecodeError" in r for r in reasons)
    assert any("engine crashed" in r for r in reasons)
    words = pq.read_table(workdir / "ocr" / "words.parquet")
    assert set(words.column_names) >= {"product_id", "image_index", "word", "confidence", "left", "top"}
    assert words.num_rows == PICTURES - 2
    assert not (workdir / "ocr" / "examples.png").exists()  # the stage writes tables; the report draws
    assert draw_ocr_examples(workdir) == workdir / "ocr" / "examples.png"
    assert (workdir / "ocr" / "examples.png").stat().st_size > 1000
    assert draw_ocr_examples(workdir) is None  # up to date
    assert summary["cdiscount_hours"] > 0 and summary["pictures_per_s"] > 0


def test_resume_after_a_partial_run_redoes_only_missing_shards(cover_workdir) -> None:
    workdir, _ = cover_workdir
    config = OcrConfig(workdir=str(workdir), splits=("train",), shard_size=2, examples=0)
    with pytest.raises(KeyboardInterrupt):
        run_ocr(config, engine=CountingEngine(stop_after=3))  # dies inside the second shard
    done = sorted(p.name for p in (workdir / "ocr" / "shards").glob("*.done"))
    assert done == ["000000.done"]
    assert not list((workdir / "ocr" / "shards").glob("000001.*"))  # nothing half-written under a real name
    again = CountingEngine()
    summary = run_ocr(config, engine=again)
    decodable = PICTURES - 1 - 2  # the garbage picture never reaches the engine; shard 0 is kept
    assert again.calls == decodable and summary["this_run"]["shards"] == 3
    assert len(statuses(workdir)) == PICTURES
    third = CountingEngine()
    run_ocr(config, engine=third)
    assert third.calls == 0  # all done: nothing redone


def test_other_settings_on_an_existing_run_are_refused(cover_workdir) -> None:
    workdir, _ = cover_workdir
    run_ocr(OcrConfig(workdir=str(workdir), splits=("train",), examples=0), engine=CountingEngine())
    with pytest.raises(OcrError, match="other settings.*select"):
        run_ocr(OcrConfig(workdir=str(workdir), splits=("train",), select="text_likely"), engine=CountingEngine())


def test_text_likely_skips_photos_and_reads_covers(cover_workdir) -> None:
    workdir, _ = cover_workdir
    summary = run_ocr(
        OcrConfig(workdir=str(workdir), splits=("train",), select="text_likely", examples=0), engine=CountingEngine()
    )
    found = statuses(workdir)
    assert found[(2, 1)] == "skipped" and found[(5, 0)] == "skipped"
    assert all(found[(product, 0)] == "ok" for product in range(1, 5))
    assert summary["skipped"] == 2 and summary["share_read"] == pytest.approx(4 / PICTURES)


def test_tesseract_end_to_end_with_two_worker_processes(cover_workdir) -> None:
    try:
        create_engine("tesseract")
    except EngineUnavailable as error:
        pytest.skip(f"Tesseract not installed: {error}")
    workdir, truth = cover_workdir
    summary = run_ocr(OcrConfig(workdir=str(workdir), splits=("train",), workers=2, shard_size=2, examples=3))
    assert summary["failed"] == 1 and summary["workers"] == 2  # the garbage picture
    words = pq.read_table(workdir / "ocr" / "words.parquet").to_pylist()
    for product, printed in truth.items():
        read = set(ground_truth_words(" ".join(w["word"] for w in words if w["product_id"] == product)))
        assert len(read & set(ground_truth_words(" ".join(printed)))) >= 1, (product, printed, read)


def test_cli_without_tesseract_says_how_to_install(cover_workdir, monkeypatch: pytest.MonkeyPatch) -> None:
    workdir, _ = cover_workdir
    monkeypatch.setitem(sys.modules, "tesserocr", None)
    result = CliRunner().invoke(app, ["ocr", "--workdir", str(workdir), "--split", "train"])
    assert result.exit_code == 2
    assert "apt-get install tesseract-ocr tesseract-ocr-fra" in result.output


def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(cover_workdir, tmp_path: Path) -> None:
    try:
        create_engine("tesseract")
    except EngineUnavailable as error:
        pytest.skip(f"Tesseract not installed: {error}")
    workdir, _ = cover_workdir
    args = ["--split", "train", "--workers", "0", "--shard-size", "2"]
    command = [sys.executable, "-m", "prodcat", "ocr", "--workdir", str(workdir), *args]
    env = dict(os.environ, PRODCAT_OCR_SLOW_SHARDS="5", PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = workdir / "ocr" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and not list(shards.glob("*.done")) and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(list(shards.glob("*.done"))) == 1, "the kill should land after the first of 4 shards"
    assert not (workdir / "ocr" / "words.parquet").exists()
    env.pop("PRODCAT_OCR_SLOW_SHARDS")
    subprocess.run(command, env=env, check=True, capture_output=True)
    resumed = [pq.read_table(workdir / "ocr" / f"{kind}.parquet") for kind in ("words", "pictures")]
    reference = tmp_path / "reference"
    shutil.copytree(workdir, reference, ignore=shutil.ignore_patterns("ocr"))
    run_ocr(OcrConfig(workdir=str(reference), splits=("train",), workers=0, shard_size=2, examples=0))
    assert resumed[0].equals(pq.read_table(reference / "ocr" / "words.parquet"))
    assert resumed[1].drop(["seconds"]).equals(pq.read_table(reference / "ocr" / "pictures.parquet").drop(["seconds"]))
