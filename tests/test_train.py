"""Training on cached features: it learns, writes its outputs, matches logistic regression, runs every head x loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prodcat.checkpoint import load_checkpoint, read_meta
from prodcat.config import TrainConfig, load_config
from prodcat.features.loaders import FeatureLoader, gather_rows
from prodcat.features.store import StoreError, write_store
from prodcat.paths import WorkPaths
from prodcat.report.runs import draw_training
from prodcat.train.loop import StepPlan, lr_at, read_metrics, train
from train_fixtures import SPATIAL_STORE, make_workdir, tiny_config

torch.set_num_threads(1)  # tiny matmuls: more threads only add contention on the shared cores


def _val_accuracy(run_dir: Path, which: str = "best") -> float:
    model, meta = load_checkpoint(run_dir, which)
    from prodcat.features.store import FeatureStore

    store = FeatureStore.open(WorkPaths(meta["config"]["workdir"]).feature_store(meta["config"]["store"]))
    rows = store.split_indices("val")
    with torch.no_grad():
        predicted = model(torch.from_numpy(store.read(rows))).argmax(1).numpy()
    return float((predicted == store.column("label")[rows]).mean())


def test_training_learns_and_writes_every_output(tmp_path: Path) -> None:
    taxonomy, _ = make_workdir(tmp_path)
    config = tiny_config(tmp_path, epochs=6, run_name="learn")
    run_dir = train(config)
    assert run_dir == WorkPaths(tmp_path).run("learn")
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == sorted({m["step"] for m in metrics})
    first, last = metrics[0], metrics[-1]
    assert first["step"] == 0 and first["train_loss"] is None
    assert last["step"] == read_meta(run_dir, "last")["total_steps"] == read_meta(run_dir, "last")["step"]
    for key in ("epoch", "seconds", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "examples_per_s"):
        assert last[key] is not None, key
    assert last["val_loss"] < 0.6 * first["val_loss"]
    assert metrics[1]["train_loss"] > last["train_loss"]
    assert last["val_top1"] > 3.0 / taxonomy.num_classes
    assert last["val_top1"] <= last["val_top5"] <= 1.0
    assert [m["seconds"] for m in metrics] == sorted(m["seconds"] for m in metrics)
    assert not (run_dir / "curves.png").exists()  # training writes numbers; the report draws them
    assert draw_training(run_dir) == [run_dir / "curves.png"]
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_config(TrainConfig, run_dir / "config.json") == config
    assert (run_dir / "taxonomy.parquet").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["final"]["val_top1"] == last["val_top1"]
    assert summary["seconds_per_epoch"] > 0 and summary["peak_rss_mb"] > 0
    best = read_meta(run_dir, "best")
    assert best["best"]["value"] == max(m["val_top1"] for m in metrics if m["step"] > 0)
    assert _val_accuracy(run_dir, "best") == pytest.approx(best["best"]["value"])


def test_linear_softmax_reaches_logistic_regression(tmp_path: Path) -> None:
    """Correctness anchor: same features (float16-rounded, from the store), same split, sklearn's optimum."""
    from sklearn.linear_model import LogisticRegression

    _, store = make_workdir(tmp_path, rows=1000, dim=32, classes=10, separation=1.3, val_fraction=0.25, seed=3)
    train_rows, val_rows = store.split_indices("train"), store.split_indices("val")
    labels = store.column("label")
    reference = LogisticRegression(max_iter=2000).fit(store.read(train_rows), labels[train_rows])
    reference_accuracy = reference.score(store.read(val_rows), labels[val_rows])
    assert 0.5 < reference_accuracy < 0.97  # a problem where the optimum matters
    run_dir = train(
        tiny_config(tmp_path, lr=0.02, epochs=30, batch_size=64, eval_every=1000, warmup_steps=10, weight_decay=1e-3)
    )
    accuracy = read_metrics(run_dir)[-1]["val_top1"]
    assert accuracy >= reference_accuracy - 0.01, (accuracy, reference_accuracy)


HEADS = ("linear", "mlp", "conv", "hier")
LOSSES = ("softmax", "sampled", "adaptive")


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("loss", LOSSES)
def test_every_head_and_loss_trains_a_few_steps(tmp_path: Path, head: str, loss: str) -> None:
    taxonomy, _ = make_workdir(tmp_path, rows=120, spatial=True)
    store = SPATIAL_STORE if head == "conv" else "toy"
    run_dir = train(
        tiny_config(tmp_path, head=head, loss=loss, store=store, max_steps=3, eval_every=2, dropout=0.1, batch_size=16)
    )
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [0, 2, 3]
    assert all(
        np.isfinite(m["val_loss"]) and (m["train_loss"] is None or np.isfinite(m["train_loss"])) for m in metrics
    )
    model, meta = load_checkpoint(run_dir, "last")
    assert meta["in_shape"] == ([2, 2, 4] if head == "conv" else [16]) and meta["step"] == 3
    log_probs = model(torch.randn(5, *meta["in_shape"]))
    assert log_probs.shape == (5, taxonomy.num_classes)
    assert torch.allclose(log_probs.exp().sum(1), torch.ones(5), atol=1e-4)


def test_bfloat16_autocast_runs(tmp_path: Path) -> None:
    make_workdir(tmp_path, rows=120)
    run_dir = train(tiny_config(tmp_path, precision="bfloat16", head="mlp", max_steps=4))
    assert np.isfinite(read_metrics(run_dir)[-1]["val_loss"])


def test_streamed_loader_gives_the_same_batches_and_weights(tmp_path: Path) -> None:
    _, store = make_workdir(tmp_path, rows=200)
    rows = store.split_indices("train")
    resident = FeatureLoader(store, rows, torch.device("cpu"), memory_limit_bytes=1e9)
    streamed = FeatureLoader(store, rows, torch.device("cpu"), memory_limit_bytes=0, workers=2, prefetch=3)
    assert resident.in_memory and not streamed.in_memory
    positions = [np.array([5, 1, 90, 3]), np.arange(len(rows))[::-7], np.arange(0, len(rows), 3), np.array([0])]
    for (a, ta), (b, tb) in zip(resident.batches(positions), streamed.batches(positions), strict=True):
        assert torch.equal(a, b) and all(torch.equal(ta[k], tb[k]) for k in ta)
    for where in positions[1:3]:  # the shard-by-shard fast path (sorted rows) and the fallback
        expected = store.read(rows[where], dtype=np.float16)
        assert np.array_equal(next(iter(streamed.batches([where])))[0].numpy(), expected)
        out = np.full((len(where), *store.feature_shape), np.nan, np.float16)
        assert np.array_equal(gather_rows(store, rows[where], out), expected)
    in_memory = train(tiny_config(tmp_path, run_name="memory", max_steps=7))
    from_disk = train(tiny_config(tmp_path, run_name="disk", max_steps=7, memory_limit_gb=0.0))
    a, _ = load_checkpoint(in_memory, "last")
    b, _ = load_checkpoint(from_disk, "last")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_step_plan_covers_each_row_once_per_epoch_and_splits_batches_across_ranks() -> None:
    config = TrainConfig(batch_size=32, epochs=2, seed=7)
    plan = StepPlan.create(100, config)
    assert plan.steps_per_epoch == 4 and plan.total_steps == 8
    epoch0 = np.concatenate([plan.global_batch(s) for s in range(4)])
    epoch1 = np.concatenate([plan.global_batch(s) for s in range(4, 8)])
    assert sorted(epoch0) == list(range(100)) == sorted(epoch1)
    assert all(np.all(np.diff(plan.global_batch(s)) > 0) for s in range(8))  # store order inside a batch
    assert not np.array_equal(epoch0, epoch1)
    assert [plan.global_rows(s) for s in range(4)] == [32, 32, 32, 4]
    again = StepPlan.create(100, config)
    assert np.array_equal(again.global_batch(5), plan.global_batch(5))  # order is a function of (seed, step) only
    ranks = [StepPlan.create(100, config, rank=r, world_size=3) for r in range(3)]
    for step in (0, 3, 6):
        parts = [r.local_batch(step) for r in ranks]
        assert np.array_equal(np.concatenate(parts), plan.global_batch(step))
    assert StepPlan.create(10, TrainConfig(batch_size=32, max_steps=5)).batch_size == 10
    assert StepPlan.create(65, config, world_size=2).steps_per_epoch == 2  # a 1-row last batch cannot feed 2 ranks


def test_lr_warms_up_then_decays_to_zero() -> None:
    lrs = [lr_at(step, 0.1, 10, 100) for step in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert 0 < lrs[-1] < 1e-3
    assert lr_at(100, 0.1, 10, 100) == pytest.approx(0.0)


def test_labels_outside_the_taxonomy_are_refused(tmp_path: Path) -> None:
    taxonomy, _ = make_workdir(tmp_path, rows=40)
    paths = WorkPaths(tmp_path)
    n = 20
    label = np.full(n, taxonomy.num_classes)  # one past the last class
    write_store(
        paths.feature_store("bad"),
        np.zeros((n, 4), np.float32),
        product_id=np.arange(n),
        image_index=np.zeros(n),
        label=label,
        level1=np.zeros(n),
        level2=np.zeros(n),
        split=np.array(["train"] * n),
    )
    with pytest.raises(StoreError, match="outside the taxonomy"):
        train(tiny_config(tmp_path, store="bad"))


def test_divergence_stops_with_an_error_and_never_saves_a_non_finite_model(tmp_path: Path) -> None:
    from prodcat.checkpoint import checkpoint_dir
    from prodcat.train.loop import TrainingDiverged

    make_workdir(tmp_path, rows=120)
    # Evaluated only at the end: the diverged weights are the only ones there would be to save.
    with pytest.raises(TrainingDiverged, match=r"diverged by step 20 .*nothing of it was saved \(no checkpoint"):
        train(tiny_config(tmp_path, run_name="once", lr=1e10, max_steps=20, eval_every=100))
    run_dir = WorkPaths(tmp_path).run("once")
    assert not checkpoint_dir(run_dir).exists() and not (run_dir / "summary.json").exists()
    # Evaluated every step: the finite (if useless) steps before the NaN are kept, the NaN one never is.
    with pytest.raises(TrainingDiverged, match="checkpoints keep step") as error:
        train(tiny_config(tmp_path, run_name="often", lr=1e10, max_steps=20, eval_every=1))
    run_dir = WorkPaths(tmp_path).run("often")
    for which in ("best", "last"):
        model, meta = load_checkpoint(run_dir, which)  # refuses non-finite weights, so these are finite
        assert meta["step"] < 20 and f"keep step {read_meta(run_dir, 'last')['step']})" in str(error.value)
    assert not (run_dir / "summary.json").exists()


def test_the_cli_ends_divergence_and_bad_flags_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from typer.testing import CliRunner

    from prodcat.cli import app, main

    make_workdir(tmp_path, rows=120)
    common = ["train", "-w", str(tmp_path), "--features", "toy", "--batch-size", "32", "--max-steps", "20"]
    result = CliRunner().invoke(app, [*common, "--lr", "1e10", "--eval-every", "100"])
    assert result.exit_code == 2 and "training diverged by step 20" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    result = CliRunner().invoke(app, [*common, "--eval-every", "10"])
    assert result.exit_code == 2 and "already holds a run" in result.stderr and "--overwrite" in result.stderr
    result = CliRunner().invoke(app, [*common, "--eval-every", "10", "--overwrite"])
    assert result.exit_code == 0, result.output
    for flags, field in (
        (["--max-steps", "-3"], "max_steps"),
        (["--warmup-steps", "-10"], "warmup_steps"),
        (["--run-name", "../.."], "run_name"),
        (["--lr", "0"], "lr"),
    ):
        monkeypatch.setattr("sys.argv", ["prodcat", *common, *flags])
        with pytest.raises(SystemExit) as stop:
            main()
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith(f"error: {field} must be") and err.count("\n") == 1, err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["linear-softmax-s0"]  # nothing written elsewhere


@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_training_sets_passive_omp_waits_before_torch_loads(preset: str | None) -> None:
    """`prodcat train` imports prodcat.train before torch (libgomp reads OMP_WAIT_POLICY once, at load); a value the
    user set is kept."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if preset is not None:
        env["OMP_WAIT_POLICY"] = preset
    code = (
        "import os, sys\nimport prodcat.cli\ntorch_first = 'torch' in sys.modules\nimport prodcat.train.loop\n"
        "print(torch_first, os.environ['OMP_WAIT_POLICY'])"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", preset or "PASSIVE"]
