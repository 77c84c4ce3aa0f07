"""compare and sweep on a tiny store: every run trained and scored on the holdout as `evaluate` scores it, intervals
over products beside the seed spread, the report files drawn from the JSON by prodcat.report, the optimizer held
fixed (or a named factor), one seed shown as n/a."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from prodcat.config import CompareConfig, ConfigError, EvalConfig, SweepConfig, load_config
from prodcat.evaluate.evaluation import bootstrap_ci, evaluate, proportion_ci
from prodcat.paths import WorkPaths
from prodcat.report.experiments import render_experiment
from prodcat.train.experiments import _clip_negatives, compare, sweep
from prodcat.train.loop import read_metrics
from train_fixtures import make_workdir

HOLDOUT = 0.25  # of the toy products: about 15 of 60 (120 rows)

torch.set_num_threads(1)


def _holdout_hits(run_dir: Path) -> np.ndarray:
    """0/1 per holdout product (sorted by id) of `evaluate`'s own predictions for the run."""
    evaluate(EvalConfig(run=str(run_dir), bootstrap_resamples=0))
    return pq.read_table(run_dir / "eval" / "predictions.parquet")["correct"].to_numpy().astype(float)


def test_compare_writes_the_report(tmp_path: Path) -> None:
    make_workdir(tmp_path, rows=120, holdout_fraction=HOLDOUT)
    result = compare(
        CompareConfig(
            workdir=str(tmp_path),
            store="toy",
            head="linear",
            losses=("softmax", "sampled", "adaptive"),
            seeds=2,
            epochs=1,
            num_sampled=4,
            batch_size=32,
            isolate=False,
        )
    )
    out = result.report
    assert out == WorkPaths(tmp_path).report("compare")
    saved = load_config(CompareConfig, out / "config.json")  # the exact config, beside its report
    assert (saved.store, saved.seeds, saved.isolate) == ("toy", 2, False)
    assert saved.losses == ("softmax", "sampled", "adaptive")
    assert sorted(result.runs) == sorted(
        (loss, "adamw", s) for loss in ("softmax", "sampled", "adaptive") for s in (0, 1)
    )
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "config.json"]  # numbers only: the report draws
    report = json.loads((out / "compare.json").read_text())
    assert list(report["losses"]) == ["softmax, adamw", "sampled, adamw", "adaptive, adamw"]
    assert report["settings"]["optimizers"] == ["adamw"] and report["settings"]["reported_split"] == "holdout"
    hits = {}
    for label, agg in report["losses"].items():
        loss = agg["loss"]
        run_dirs = [result.runs[(loss, "adamw", seed)] for seed in (0, 1)]
        assert run_dirs == [WorkPaths(tmp_path).run(f"compare-{loss}-adamw-s{seed}") for seed in (0, 1)]
        assert agg["runs"] == [run_dir.name for run_dir in run_dirs] and agg["optimizer"] == "adamw"
        assert all(json.loads((d / "config.json").read_text())["optimizer"] == "adamw" for d in run_dirs)
        finals = [read_metrics(run_dir)[-1]["val_top1"] for run_dir in run_dirs]
        assert agg["val_top1_mean"] == pytest.approx(sum(finals) / 2)
        assert agg["val_top1_std"] == pytest.approx(abs(finals[0] - finals[1]) / 2**0.5)
        assert agg["seconds_per_epoch_mean"] > 0 and agg["peak_rss_mb_max"] > 0
        assert agg["val_rows"] == read_metrics(run_dirs[0])[-1]["val_rows"]
        # The headline: each seed's holdout product top-1 is the number `prodcat evaluate` reports for that run.
        matrix = np.stack([_holdout_hits(run_dir) for run_dir in run_dirs])
        hits[label] = matrix.mean(axis=0)
        assert agg["holdout_top1_per_seed"] == pytest.approx(matrix.mean(axis=1).tolist())
        assert agg["holdout_top1_mean"] == pytest.approx(matrix.mean())
        assert agg["holdout_top1_std"] == pytest.approx(np.std(matrix.mean(axis=1), ddof=1))
        assert agg["holdout_products"] == matrix.shape[1] >= 5 and agg["holdout_split"] == "holdout"
        by_hand = bootstrap_ci({"t": lambda w, m=hits[label]: float(w @ m / w.sum())}, matrix.shape[1])["t"]
        assert agg["holdout_top1_ci95"] == pytest.approx(by_hand) and "seed" in agg["holdout_ci95_method"]
        assert by_hand[0] <= agg["holdout_top1_mean"] <= by_hand[1]
        steps, mean, std = report["curves"][label]["step"]
        assert steps[0] == 0 and len(steps) == len(mean) == len(std) >= 3
        seconds, _, _ = report["curves"][label]["train_seconds"]
        assert seconds[0] == 0 and seconds == sorted(seconds)
    paired = report["differences"]["sampled, adamw vs softmax, adamw"]
    gap = hits["sampled, adamw"] - hits["softmax, adamw"]
    assert paired["change"] == pytest.approx(gap.mean()) and paired["n"] == len(gap)
    assert paired["ci95"][0] <= paired["change"] <= paired["ci95"][1]
    assert len(report["differences"]) == 3  # every pair of the three arms
    written = render_experiment(out, num_classes=12)
    assert {p.name for p in written} >= {"compare.png", "compare.md", "compare.html", "curves.png"}
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert all((d / "curves.png").is_file() for d in result.runs.values())
    page = (out / "compare.html").read_text()
    assert 'src="data:image/png;base64,' in page  # the figure is embedded
    assert page.count("<tr>") == 2 * (1 + 3)  # the table and the loss x optimizer grid: a header and 3 rows each
    table = (out / "compare.md").read_text()
    assert "| sampled | adamw | 2 | " in table and "± n/a" not in table
    assert "same optimizer for every loss: adamw" in table and "holdout product top-1" in table
    assert "paired 95% interval over the" in table  # the conclusions, in words, from the holdout numbers
    assert render_experiment(out) == []  # up to date: nothing redrawn


def test_compare_with_optimizers_trains_every_loss_optimizer_cell(tmp_path: Path) -> None:
    make_workdir(tmp_path, rows=80, holdout_fraction=HOLDOUT)
    result = compare(
        CompareConfig(
            workdir=str(tmp_path),
            store="toy",
            head="linear",
            losses=("softmax", "sampled"),
            seeds=1,
            epochs=1,
            num_sampled=4,
            batch_size=32,
            optimizers=("adamw", "rowwise_adamw"),
            note="toy data is synthetic",
            isolate=False,
        )
    )
    cells = {(loss, name) for loss in ("softmax", "sampled") for name in ("adamw", "rowwise_adamw")}
    assert set(result.runs) == {(loss, name, 0) for loss, name in cells}
    for (loss, name, _), run_dir in result.runs.items():
        assert run_dir.name == f"compare-{loss}-{name}-s0"
        config = json.loads((run_dir / "config.json").read_text())
        assert (config["loss"], config["optimizer"]) == (loss, name)
    report = json.loads((result.report / "compare.json").read_text())
    assert {(a["loss"], a["optimizer"]) for a in report["losses"].values()} == cells
    for agg in report["losses"].values():
        assert agg["val_top1_std"] is None and agg["holdout_top1_std"] is None and agg["seeds"] == 1
        hits = round(agg["holdout_top1_mean"] * agg["holdout_products"])
        assert agg["holdout_top1_ci95"] == pytest.approx(proportion_ci(hits, agg["holdout_products"]))  # Wilson
    render_experiment(result.report)
    table = (result.report / "compare.md").read_text()
    assert "± n/a [" in table and "± 0" not in table  # one seed: no spread, the interval over products beside it
    assert "| sampled | rowwise_adamw |" in table and "toy data is synthetic" in table
    assert "Loss x optimizer" in table and "one seed, so no seed spread" in table


def test_compare_arms_pick_cells_and_bad_optimizers_fail_before_training(tmp_path: Path) -> None:
    make_workdir(tmp_path, rows=80, holdout_fraction=HOLDOUT)
    common = dict(store="toy", head="linear", seeds=1, epochs=1, num_sampled=4, batch_size=32, isolate=False)
    with pytest.raises(ConfigError, match="rowwise_adamw"):
        compare(CompareConfig(workdir=str(tmp_path), losses=("softmax",), optimizer="adam", **common))
    with pytest.raises(ConfigError, match="not both"):
        compare(
            CompareConfig(workdir=str(tmp_path), losses=("softmax",), optimizer="sgd", optimizers=("adamw",), **common)
        )
    assert not WorkPaths(tmp_path).runs.exists() or not any(WorkPaths(tmp_path).runs.iterdir())
    result = compare(
        CompareConfig(
            workdir=str(tmp_path), losses=(), arms=[("softmax", "adamw"), ("sampled", "rowwise_sgd")], **common
        )
    )
    assert set(result.runs) == {("softmax", "adamw", 0), ("sampled", "rowwise_sgd", 0)}


def test_compare_trains_in_a_subprocess(tmp_path: Path) -> None:
    make_workdir(tmp_path, rows=80, holdout_fraction=HOLDOUT)
    result = compare(
        CompareConfig(
            workdir=str(tmp_path),
            store="toy",
            head="linear",
            losses=("sampled",),
            seeds=1,
            epochs=1,
            num_sampled=4,
            batch_size=32,
            optimizer="rowwise_adamw",
            isolate=True,
        )
    )
    agg = json.loads((result.report / "compare.json").read_text())["losses"]["sampled, rowwise_adamw"]
    run_dir = result.runs[("sampled", "rowwise_adamw", 0)]
    assert run_dir == WorkPaths(tmp_path).run("compare-sampled-rowwise_adamw-s0")
    assert agg["val_top1_mean"] == read_metrics(run_dir)[-1]["val_top1"]
    assert agg["peak_rss_mb_max"] == json.loads((run_dir / "summary.json").read_text())["peak_rss_mb"]


def test_sweep_clips_k_and_writes_the_report(tmp_path: Path) -> None:
    make_workdir(tmp_path, rows=120, holdout_fraction=HOLDOUT)  # 12 classes
    result = sweep(
        SweepConfig(
            workdir=str(tmp_path),
            store="toy",
            head="linear",
            num_sampled=(2, 50),
            sampler="log_uniform",
            epochs=1,
            seeds=1,
            batch_size=32,
            optimizer="rowwise_adamw",
        )
    )
    out = result.report
    assert load_config(SweepConfig, out / "config.json").num_sampled == (2, 50)  # as asked; the report says clipped
    report = json.loads((out / "sweep.json").read_text())
    assert [p["num_sampled"] for p in report["points"]] == [2, 11]
    assert any("clipped to K=11" in note for note in report["notes"])
    assert report["reference"]["runs"] == ["sweep-softmax-rowwise_adamw-s0"]
    assert set(result.runs) == {
        ("sampled-k2", "rowwise_adamw", 0),
        ("sampled-k11", "rowwise_adamw", 0),
        ("softmax", "rowwise_adamw", 0),
    }
    # The full-softmax reference line trains with the sweep's optimizer, like every point.
    assert {json.loads((d / "config.json").read_text())["optimizer"] for d in result.runs.values()} == {"rowwise_adamw"}
    assert report["settings"]["optimizer"] == "rowwise_adamw" and report["reference"]["val_top1_std"] is None
    reference = _holdout_hits(result.runs[("softmax", "rowwise_adamw", 0)])
    assert report["reference"]["holdout_top1_mean"] == pytest.approx(reference.mean())
    for point in report["points"]:
        hits = _holdout_hits(result.runs[(f"sampled-k{point['num_sampled']}", "rowwise_adamw", 0)])
        paired = point["vs_reference"]
        assert paired["change"] == pytest.approx(hits.mean() - reference.mean()) and paired["n"] == len(hits)
        assert paired["ci95"][0] <= paired["change"] <= paired["ci95"][1]
    assert all(p["step_seconds_mean"] > 0 for p in report["points"])
    render_experiment(out)
    table = (out / "sweep.md").read_text()
    assert "± n/a [" in table and "± 0" not in table and "(reference)" in table
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "full softmax" in table and (out / "sweep.html").is_file()


def test_clip_negatives() -> None:
    assert _clip_negatives([8, 32, 100, 200], 100) == (
        [8, 32, 99],
        ["K=100 >= C=100: clipped to K=99 (C - 1)", "K=200 >= C=100: clipped to K=99 (C - 1)"],
    )
    with pytest.raises(ValueError):
        _clip_negatives([0], 10)


def test_compare_cli_takes_the_optimizer_factor(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from prodcat.cli import app

    make_workdir(tmp_path, rows=80, holdout_fraction=HOLDOUT)
    args = ["compare", "--workdir", str(tmp_path), "--features", "toy", "--losses", "sampled", "--seeds", "1"]
    args += ["--epochs", "1", "--num-sampled", "4", "--batch-size", "32", "--optimizers", "adamw,rowwise_adamw"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "comparison of 2 runs" in result.output
    for name in ("adamw", "rowwise_adamw"):
        run_dir = WorkPaths(tmp_path).run(f"compare-sampled-{name}-s0")
        assert (run_dir / "summary.json").is_file() and (run_dir / "curves.png").is_file()  # the CLI draws
    assert (WorkPaths(tmp_path).report("compare") / "compare.html").is_file()
