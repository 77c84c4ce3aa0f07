"""The optimizer is a factor, never a side effect of the loss: what `optimizer` names is what trains, for every loss;
resume keeps it; sampled softmax at K = C - 1 matches softmax under the same optimizer."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prodcat.checkpoint import read_meta
from prodcat.config import ConfigError, TrainConfig
from prodcat.model import list_optimizers
from prodcat.train.loop import _saved_optimizer, read_metrics, run_summary, setup, train
from train_fixtures import make_workdir, tiny_config

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def _rowwise_params(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups if group["rowwise"] for p in group["params"]}


@pytest.mark.parametrize(
    ("loss", "optimizer", "rowwise", "sparse"),
    [
        ("sampled", "adamw", False, False),  # dense AdamW everywhere, the sampled output layer too
        ("sampled", "rowwise_adamw", True, True),
        ("softmax", "rowwise_adamw", True, False),  # the row-wise rule with dense gradients
        ("softmax", "adamw", False, False),
        ("adaptive", "rowwise_sgd", True, False),
    ],
)
def test_the_named_optimizer_trains_whatever_the_loss(
    tmp_path: Path, loss: str, optimizer: str, rowwise: bool, sparse: bool
) -> None:
    make_workdir(tmp_path, rows=80)
    run = setup(tiny_config(tmp_path, loss=loss, optimizer=optimizer, max_steps=2))
    output = {id(p) for p in run.model.output.parameters()}
    assert _rowwise_params(run.optimizer) == (output if rowwise else set())
    assert run.sparse_output is sparse and getattr(run.model.output, "sparse_grad", False) is sparse
    assert type(run.optimizer).__name__ == ("RowWiseSGD" if optimizer.endswith("sgd") else "RowWiseAdamW")


def test_checkpoint_and_config_record_the_optimizer_and_resume_refuses_another(tmp_path: Path) -> None:
    make_workdir(tmp_path, rows=120)
    run_dir = train(tiny_config(tmp_path, loss="sampled", optimizer="rowwise_adamw", stop_after=3))
    meta = read_meta(run_dir, "last")
    assert meta["config"]["optimizer"] == "rowwise_adamw" and meta["sparse_output"] is True  # said once, in config
    assert json.loads((run_dir / "config.json").read_text())["optimizer"] == "rowwise_adamw"
    with pytest.raises(ConfigError, match="optimizer"):
        train(tiny_config(tmp_path, loss="sampled", optimizer="adamw", resume=True))
    train(tiny_config(tmp_path, loss="sampled", optimizer="rowwise_adamw", resume=True))
    assert run_summary(run_dir)["complete"]


def test_configs_from_before_the_explicit_choice_resume_as_what_they_trained_with() -> None:
    legacy = dict(optimizer="adamw", loss="sampled", sparse_output=None, distributed=False)
    assert _saved_optimizer(legacy) == "rowwise_adamw"  # auto: the sampled loss was switched to row-wise
    assert _saved_optimizer({**legacy, "distributed": True}) == "adamw"  # never under DDP
    assert _saved_optimizer({**legacy, "sparse_output": False}) == "adamw"
    assert _saved_optimizer({**legacy, "loss": "softmax"}) == "adamw"
    assert _saved_optimizer({**legacy, "optimizer": "sgd", "sparse_output": True}) == "rowwise_sgd"
    assert _saved_optimizer({"optimizer": "rowwise_adamw", "loss": "softmax"}) == "rowwise_adamw"


def test_an_unknown_optimizer_is_a_config_error_naming_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="optimizer must be one of adamw, rowwise_adamw, rowwise_sgd, sgd"):
        TrainConfig(optimizer="adam")
    assert set(list_optimizers()) == {"adamw", "sgd", "rowwise_adamw", "rowwise_sgd"}
    make_workdir(tmp_path, rows=40)
    command = [sys.executable, "-m", "prodcat", "train", "--workdir", str(tmp_path), "--optimizer", "adam"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 2 and "optimizer must be one of" in result.stderr
    assert "Traceback" not in result.stderr


def test_metrics_time_training_apart_from_validation(tmp_path: Path) -> None:
    make_workdir(tmp_path, rows=120)
    metrics = read_metrics(train(tiny_config(tmp_path, epochs=2, eval_every=1)))
    assert metrics[0]["train_seconds"] == 0.0
    assert all(m["train_seconds"] < m["seconds"] for m in metrics[1:])  # validating every step is not training


def _mean_final_top1(root: Path, loss: str, optimizer: str) -> float:
    finals = []
    for seed in (0, 1, 2):
        config = tiny_config(
            root,
            loss=loss,
            optimizer=optimizer,
            seed=seed,
            num_sampled=11,  # C - 1 of the 12 classes, drawn without replacement: the whole softmax but one class
            sample_with_replacement=False,
            epochs=1,  # short and fast: where the two optimizers part (the row-wise one is ahead early)
            lr=0.01,
            batch_size=64,
            eval_every=1000,
            run_name=f"{loss}-{optimizer}-s{seed}",
        )
        finals.append(run_summary(train(config))["final"]["val_top1"])
    return statistics.fmean(finals)


def test_sampled_at_k_c_minus_1_matches_softmax_under_the_same_optimizer(tmp_path: Path) -> None:
    make_workdir(tmp_path, rows=1500, val_fraction=0.4, separation=1.5)  # ~600 val rows: 1 point is ~6 rows
    top1 = {
        (loss, name): _mean_final_top1(tmp_path, loss, name)
        for loss in ("softmax", "sampled")
        for name in ("adamw", "rowwise_adamw")
    }
    for name in ("adamw", "rowwise_adamw"):
        assert abs(top1[("sampled", name)] - top1[("softmax", name)]) <= 0.01, top1  # same optimizer: same result
    # Here the optimizer matters by more than that, so an arm that silently changed it would fail the check above.
    assert top1[("sampled", "rowwise_adamw")] - top1[("sampled", "adamw")] > 0.02, top1
