"""The one checkpoint format: exact resume, best/last, atomic commits, a loader that needs only the run dir."""

from __future__ import annotations

import hashlib
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
from prodcat.train.loop import read_metrics, train
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
    assert best["config"]["store"] == "toy" and best["taxonomy"] == "taxonomy.parquet" and best["num_classes"] == 12
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
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_checkpoint(run_dir, "last")
    # Even with its checksum made to fit, the step stamp inside the file still has to match.
    digest = hashlib.sha256((directory / meta["files"]["weights"]).read_bytes()).hexdigest()
    (directory / "last.json").write_text(json.dumps(dict(meta, checksums=dict(meta["checksums"], weights=digest))))
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


# -- a damaged checkpoint: one line naming the file, nothing deleted --------------------------------------------------
def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _edit_sidecar(directory: Path, which: str, **changes: object) -> str:
    meta = json.loads((directory / f"{which}.json").read_text())
    (directory / f"{which}.json").write_text(json.dumps(dict(meta, **changes)))
    return f"{which}.json"


def _overwrite(path: Path, offset: int, data: bytes) -> str:
    blob = bytearray(path.read_bytes())
    blob[offset : offset + len(data)] = data
    path.write_bytes(bytes(blob))
    return path.name


def _damage(case: str, directory: Path) -> str:
    """Damage the checkpoint folder one way; returns the name of the file the error must name."""
    last = json.loads((directory / "last.json").read_text())
    weights, optim = directory / last["files"]["weights"], directory / last["files"]["optimizer"]
    if case == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return weights.name
    if case == "4 KB of weights overwritten":
        return _overwrite(weights, weights.stat().st_size // 3, bytes(4096))
    if case == "flipped optimizer bytes":
        middle = optim.stat().st_size // 2
        return _overwrite(optim, middle, bytes(b ^ 0xFF for b in optim.read_bytes()[middle : middle + 8]))
    if case == "garbage sidecar":
        (directory / "last.json").write_bytes(b'{"format": 2, "step": \xff\x00 nonsense')
        return "last.json"
    if case == "garbage best sidecar":
        (directory / "best.json").write_text("[1, 2")
        return "best.json"
    if case == "missing weights":
        weights.unlink()
        return weights.name
    if case == "sidecars lost":
        (directory / "last.json").unlink()
        (directory / "best.json").unlink()
        return ".safetensors"
    if case == "wrong version":
        return _edit_sidecar(directory, "last", format=1)
    if case == "sidecar without checksums":
        meta = json.loads((directory / "last.json").read_text())
        del meta["checksums"]
        (directory / "last.json").write_text(json.dumps(meta))
        return "last.json"
    raise AssertionError(case)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (mlp head: weights of ~30 KB, so 4 KB is a slice of them); copied by each test."""
    root = tmp_path_factory.mktemp("finished")
    make_workdir(root, rows=120)
    train(tiny_config(root, head="mlp", hidden_dim=256, max_steps=6, eval_every=3, run_name="done"))
    return root


DAMAGE = (
    "truncated weights",
    "4 KB of weights overwritten",
    "flipped optimizer bytes",
    "garbage sidecar",
    "garbage best sidecar",
    "missing weights",
    "wrong version",
    "sidecar without checksums",
    "sidecars lost",
)


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_checkpoint_stops_resume_naming_the_file_and_deletes_nothing(
    finished_run: Path, tmp_path: Path, case: str
) -> None:
    root = shutil.copytree(finished_run, tmp_path / "work")
    run_dir = root / "runs" / "done"
    named = _damage(case, checkpoint_dir(run_dir))
    before = _snapshot(run_dir)
    settings = dict(head="mlp", hidden_dim=256, max_steps=6, eval_every=3, run_name="done")
    with pytest.raises(CheckpointError) as error:
        train(tiny_config(root, resume=True, **settings))
    message = str(error.value)
    assert named in message and "\n" not in message, message
    assert _snapshot(run_dir) == before  # every file still there, byte for byte
    with pytest.raises(ConfigError, match="--resume .*--overwrite"):  # a plain rerun does not start over either
        train(tiny_config(root, **settings))
    assert _snapshot(run_dir) == before
    which = "best" if "best" in case else "last"
    if case not in ("flipped optimizer bytes", "sidecars lost"):  # loading a model reads neither
        with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
            load_checkpoint(run_dir, which)
    assert _snapshot(run_dir) == before


def test_a_changed_plan_and_a_sidecar_naming_a_path_are_refused(finished_run: Path, tmp_path: Path) -> None:
    root = shutil.copytree(finished_run, tmp_path / "work")
    run_dir = root / "runs" / "done"
    directory = checkpoint_dir(run_dir)
    settings = dict(head="mlp", hidden_dim=256, max_steps=6, eval_every=3, run_name="done")
    _edit_sidecar(directory, "last", steps_per_epoch=99)  # as if the store had been rebuilt with other rows
    with pytest.raises(CheckpointError, match=r"last\.json: cannot resume, the run's plan changed"):
        train(tiny_config(root, resume=True, **settings))
    meta = json.loads((directory / "best.json").read_text())
    _edit_sidecar(directory, "best", files=dict(meta["files"], weights="../../config.json"))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        load_checkpoint(run_dir, "best")


def test_starting_over_an_existing_run_needs_overwrite(finished_run: Path, tmp_path: Path) -> None:
    root = shutil.copytree(finished_run, tmp_path / "work")
    run_dir = root / "runs" / "done"
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "metrics.json").write_text("{}")  # an evaluation of the old model
    (run_dir / "notes.txt").write_text("mine")
    before = _snapshot(run_dir)
    settings = dict(head="mlp", hidden_dim=256, eval_every=3, run_name="done")
    with pytest.raises(ConfigError, match="already holds a run .*--resume.*--overwrite.*--run-name"):
        train(tiny_config(root, max_steps=4, **settings))
    assert _snapshot(run_dir) == before
    with pytest.raises(ConfigError, match="not both"):
        tiny_config(root, resume=True, overwrite=True)
    train(tiny_config(root, max_steps=4, overwrite=True, **settings))
    assert read_meta(run_dir, "last")["step"] == 4 and read_metrics(run_dir)[-1]["step"] == 4
    assert not (run_dir / "eval").exists() and (run_dir / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in checkpoint_dir(run_dir).iterdir() if p.name.startswith("last")) == [
        "last.000004.optim.safetensors",
        "last.000004.safetensors",
        "last.json",
    ]
    # A run that never saved a checkpoint (killed in its first interval) resumes as a fresh start.
    killed = root / "runs" / "killed"
    killed.mkdir()
    (killed / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")
    train(tiny_config(root, run_name="killed", max_steps=2, resume=True))
    assert read_meta(killed, "last")["step"] == 2


def test_a_checkpoint_with_non_finite_weights_is_refused(finished_run: Path, tmp_path: Path) -> None:
    from prodcat.checkpoint import save_checkpoint
    from prodcat.predict.predictor import Predictor

    root = shutil.copytree(finished_run, tmp_path / "work")
    run_dir = root / "runs" / "done"
    model, meta = load_checkpoint(run_dir, "best")
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    kept = ("files", "checksums", "format", "rng", "optimizer_skeleton", "run_dir")
    save_checkpoint(run_dir, "best", model, None, {k: v for k, v in meta.items() if k not in kept})
    with pytest.raises(CheckpointError, match=r"best\.\d+\.safetensors: tensor .* NaN or infinity"):
        load_checkpoint(run_dir, "best")
    with pytest.raises(CheckpointError, match="NaN or infinity"):  # what evaluate, predict and serve load
        Predictor.load(run_dir)
    from prodcat.config import ServeConfig
    from prodcat.serve.app import serve

    with pytest.raises(CheckpointError, match="NaN or infinity"):  # refused before the server binds a port
        serve(ServeConfig(run=str(run_dir), port=0))
