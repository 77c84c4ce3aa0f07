"""The one checkpoint format: exact resume, best/last, atomic commits, a loader that needs only the run dir."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from prodcat.checkpoint import (
    CheckpointError,
    _join_tensors,
    _split_tensors,
    capture_rng,
    checkpoint_dir,
    load_checkpoint,
    read_meta,
    resolve_resume,
    restore_rng,
)
from prodcat.config import ConfigError
from prodcat.model import build_optimizer
from prodcat.train import read_metrics, train
from train_fixtures import make_workdir, tiny_config

torch.set_num_threads(1)


def _tensors(run_dir: Path, which: str = "last") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    meta = read_meta(run_dir, which)
    directory = checkpoint_dir(run_dir)
    return (
        safetensors.torch.load_file(directory / meta["files"]["weights"]),
        safetensors.torch.load_file(directory / meta["files"]["optimizer"]),
    )


@pytest.mark.parametrize(
    "overrides",
    [
        dict(head="linear", loss="softmax", optimizer="adamw"),
        # dropout + sampled negatives (RNG inside the step) + the row-wise sparse optimizer
        dict(head="mlp", loss="sampled", optimizer="rowwise_sgd", dropout=0.3, sampler="unigram"),
    ],
    ids=["linear-softmax-adamw", "mlp-sampled-rowwise_sgd"],
)
def test_resume_continues_exactly(tmp_path: Path, overrides: dict) -> None:
    make_workdir(tmp_path, rows=200)
    common = dict(epochs=3, eval_every=4, **overrides)  # about 160 train rows / 32 -> 15 steps
    whole = train(tiny_config(tmp_path, run_name="whole", **common))
    stopped = train(tiny_config(tmp_path, run_name="split", stop_after=6, **common))
    assert read_meta(stopped, "last")["step"] == 6
    assert not json.loads((stopped / "summary.json").read_text())["complete"]
    resumed = train(tiny_config(tmp_path, run_name="split", resume=True, **common))
    assert resumed == stopped
    (weights_a, optim_a), (weights_b, optim_b) = _tensors(whole), _tensors(resumed)
    assert weights_a.keys() == weights_b.keys() and optim_a.keys() == optim_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    for key in optim_a:
        assert torch.equal(optim_a[key], optim_b[key]), key
    steps = [m["step"] for m in read_metrics(resumed)]
    assert steps == sorted(set(steps)) and steps[-1] == read_meta(whole, "last")["total_steps"]
    final_whole, final_resumed = read_metrics(whole)[-1], read_metrics(resumed)[-1]
    assert final_whole["val_loss"] == final_resumed["val_loss"]


def test_resume_refuses_a_changed_config_and_starts_fresh_without_checkpoint(tmp_path: Path) -> None:
    make_workdir(tmp_path, rows=120)
    run_dir = train(tiny_config(tmp_path, stop_after=3))
    with pytest.raises(ConfigError, match="lr"):
        train(tiny_config(tmp_path, resume=True, lr=0.5))
    fresh = train(tiny_config(tmp_path, run_name="other", resume=True, max_steps=2))
    assert read_metrics(fresh)[0]["step"] == 0 and resolve_resume(fresh)["step"] == 2
    assert resolve_resume(tmp_path / "nowhere") is None
    assert resolve_resume(run_dir)["step"] == 3


def test_best_and_last_and_a_loader_that_needs_only_the_run_dir(tmp_path: Path) -> None:
    _, store = make_workdir(tmp_path, rows=200)
    run_dir = train(tiny_config(tmp_path, epochs=3, eval_every=2, lr=0.2))
    metrics = [m for m in read_metrics(run_dir) if m["step"] > 0]
    best_step = max(metrics, key=lambda m: m["val_top1"])["step"]  # first of the ties, like the trainer
    best, last = read_meta(run_dir, "best"), read_meta(run_dir, "last")
    assert best["step"] == best_step == best["best"]["step"] and last["step"] == metrics[-1]["step"]
    assert last["best"] == best["best"]
    files = sorted(p.name for p in checkpoint_dir(run_dir).iterdir())
    assert len(files) == 6, files  # two sidecars, two weights, two optimizer states: nothing stale
    assert best["store"]["name"] == "toy" and best["taxonomy"] == "taxonomy.parquet" and best["num_classes"] == 12
    moved = shutil.copytree(run_dir, tmp_path / "elsewhere" / "run")
    shutil.rmtree(tmp_path / "runs")  # the loader must not need the work dir's taxonomy or runs folder
    rows = store.split_indices("val")
    features = torch.from_numpy(store.read(rows))
    for which, meta in (("best", best), ("last", last)):
        model, loaded = load_checkpoint(moved, which)
        assert not model.training and loaded["step"] == meta["step"]
        with torch.no_grad():
            accuracy = (model(features).argmax(1).numpy() == store.column("label")[rows]).mean()
        assert accuracy == pytest.approx(meta["metrics"]["val_top1"])


def test_a_crash_before_the_sidecar_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    make_workdir(tmp_path, rows=120)
    run_dir = train(tiny_config(tmp_path, max_steps=4, eval_every=2))
    directory = checkpoint_dir(run_dir)
    meta = read_meta(run_dir, "last")
    # A later save wrote its tensors, then died before committing the sidecar.
    shutil.copyfile(directory / meta["files"]["weights"], directory / "last.000006.safetensors")
    model, loaded = load_checkpoint(run_dir, "last")
    assert loaded["step"] == 4
    # A weights file that does not hold the step its sidecar names is refused.
    (directory / meta["files"]["weights"]).unlink()
    shutil.move(directory / "last.000006.safetensors", directory / meta["files"]["weights"])
    torch_state = safetensors.torch.load_file(directory / meta["files"]["weights"])
    safetensors.torch.save_file(torch_state, directory / meta["files"]["weights"], metadata={"step": "6"})
    with pytest.raises(CheckpointError, match="holds step 6"):
        load_checkpoint(run_dir, "last")
    (directory / meta["files"]["weights"]).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(run_dir, "last")
    with pytest.raises(CheckpointError, match="no 'nope' checkpoint"):
        read_meta(run_dir, "nope")


def test_optimizer_state_round_trips_through_tensors_and_json() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = build_optimizer(model, "adamw", 0.1, 0.01, 0.9)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    state["param_groups"][0]["extra"] = (1, float("inf"), None, "x")
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors(state, "optim", tensors)
    restored = _join_tensors(json.loads(json.dumps(skeleton)), safetensors.torch.load(safetensors.torch.save(tensors)))
    assert restored["param_groups"] == state["param_groups"]
    assert restored["state"].keys() == state["state"].keys()
    for index, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(restored["state"][index][key], value)
    optimizer.load_state_dict(restored)


def test_rng_states_round_trip() -> None:
    state = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)
    restore_rng(state)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
