"""compare and sweep on a tiny store: every run trained, every report file written with consistent numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prodcat.experiments import _clip_negatives, compare, sweep
from prodcat.paths import WorkPaths
from prodcat.train import read_metrics
from train_fixtures import make_workdir

torch.set_num_threads(1)


def test_compare_writes_the_report(tmp_path: Path) -> None:
    make_workdir(tmp_path, rows=120)
    out = compare(
        tmp_path,
        features="toy",
        head="linear",
        losses=("softmax", "sampled", "adaptive"),
        seeds=2,
        epochs=1,
        num_sampled=4,
        batch_size=32,
        isolate=False,
    )
    assert out == WorkPaths(tmp_path).report("compare")
    report = json.loads((out / "compare.json").read_text())
    assert list(report["losses"]) == ["softmax", "sampled", "adaptive"]
    for loss, agg in report["losses"].items():
        run_dirs = [WorkPaths(tmp_path).run(f"compare-{loss}-s{seed}") for seed in (0, 1)]
        assert agg["runs"] == [run_dir.name for run_dir in run_dirs]
        finals = [read_metrics(run_dir)[-1]["val_top1"] for run_dir in run_dirs]
        assert agg["val_top1_mean"] == pytest.approx(sum(finals) / 2)
        assert agg["val_top1_std"] == pytest.approx(abs(finals[0] - finals[1]) / 2**0.5)
        assert agg["seconds_per_epoch_mean"] > 0 and agg["peak_rss_mb_max"] > 0
        steps, mean, std = report["curves"][loss]["step"]
        assert steps[0] == 0 and len(steps) == len(mean) == len(std) >= 3
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "compare.html").read_text()
    assert page.count("<tr>") == 4 and "compare.png" in page
    assert "| sampled | 2 |" in (out / "compare.md").read_text()


def test_compare_trains_in_a_subprocess(tmp_path: Path) -> None:
    make_workdir(tmp_path, rows=80)
    out = compare(
        tmp_path,
        features="toy",
        head="linear",
        losses=("sampled",),
        seeds=1,
        epochs=1,
        num_sampled=4,
        batch_size=32,
        isolate=True,
    )
    agg = json.loads((out / "compare.json").read_text())["losses"]["sampled"]
    run_dir = WorkPaths(tmp_path).run("compare-sampled-s0")
    assert agg["val_top1_mean"] == read_metrics(run_dir)[-1]["val_top1"]
    assert agg["peak_rss_mb_max"] == json.loads((run_dir / "summary.json").read_text())["peak_rss_mb"]


def test_sweep_clips_k_and_writes_the_report(tmp_path: Path) -> None:
    make_workdir(tmp_path, rows=120)  # 12 classes
    out = sweep(
        tmp_path,
        features="toy",
        head="linear",
        num_sampled=(2, 50),
        sampler="log_uniform",
        epochs=1,
        seeds=1,
        batch_size=32,
    )
    report = json.loads((out / "sweep.json").read_text())
    assert [p["num_sampled"] for p in report["points"]] == [2, 11]
    assert any("clipped to K=11" in note for note in report["notes"])
    assert report["reference"]["runs"] == ["sweep-softmax-s0"]
    assert all(p["step_seconds_mean"] > 0 for p in report["points"])
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "full softmax" in (out / "sweep.md").read_text() and (out / "sweep.html").is_file()


def test_clip_negatives() -> None:
    assert _clip_negatives([8, 32, 100, 200], 100) == (
        [8, 32, 99],
        ["K=100 >= C=100: clipped to K=99 (C - 1)", "K=200 >= C=100: clipped to K=99 (C - 1)"],
    )
    with pytest.raises(ValueError):
        _clip_negatives([0], 10)
