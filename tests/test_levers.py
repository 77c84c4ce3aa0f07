"""Levers 3 and 4 through `evaluate` on a tiny trained run: the deployed product block is the formula applied with
the choices made on val, the Predictor applies them, the levers table compares runs (balanced softmax)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from prodcat.config import CompareConfig, EvalConfig, TrainConfig
from prodcat.evaluate.evaluation import evaluate, macro_accuracy, train_pictures_per_leaf
from prodcat.predict.calibration import adjust_logits, apply_temperature, log_prior
from prodcat.predict.predictor import Predictor, aggregate_products
from prodcat.report.runs import EVAL_FIGURES, draw_evaluation
from prodcat.train.experiments import compare
from test_evaluate import COMMON, build_workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from prodcat.train.loop import train

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("leverwork")
    _, store = build_workdir(root)
    common = dict(workdir=str(root), **COMMON)
    return {
        "root": root,
        "store": store,
        "softmax": train(TrainConfig(head="linear", loss="softmax", run_name="softmax", **common)),
        "balanced": train(TrainConfig(head="linear", loss="balanced_softmax", run_name="balanced", **common)),
    }


def _products(predictor: Predictor, store, split: str, method: str) -> tuple[np.ndarray, np.ndarray]:
    rows = store.split_indices(split)
    ids, index = np.unique(store.column("product_id")[rows], return_inverse=True)
    log_probs = predictor.log_probs_from_features(store.read(rows))
    labels = np.zeros(len(ids), np.int64)
    labels[index] = store.column("label")[rows]
    return aggregate_products(log_probs, index, len(ids), method), labels


def test_deployed_numbers_are_the_formula_with_val_choices(runs: dict) -> None:
    run, store = runs["softmax"], runs["store"]
    metrics = evaluate(EvalConfig(run=str(run), objective="macro", target_accuracy=0.8, bootstrap_resamples=200))
    tau, temperature = metrics["logit_adjustment"]["tau"], metrics["calibration"]["temperature"]
    assert metrics["logit_adjustment"]["chosen_on"] == "val" and metrics["calibration"]["fitted_on"] == "val"
    assert temperature != 1.0 and metrics["calibration"]["val_nll_after"] <= metrics["calibration"]["val_nll_before"]
    predictor = Predictor.load(run)
    method = metrics["product"]["aggregation"]
    prior = log_prior(train_pictures_per_leaf(store, predictor.taxonomy.num_classes))
    # Val: the chosen tau is the grid's best macro accuracy (smallest on ties), by brute force.
    val_scores, val_labels = _products(predictor, store, "val", method)
    macro = [macro_accuracy((adjust_logits(val_scores, prior, t).argmax(1) == val_labels).astype(float),
                            np.ones(len(val_labels)), val_labels) for t in EvalConfig().tau_grid]  # fmt: skip
    assert tau == EvalConfig().tau_grid[int(np.argmax(np.array(macro) >= max(macro) - 1e-12))]
    # Holdout: the reported product block is log_softmax((log p - tau log prior)) / T, top-1 and loss alike.
    scores, labels = _products(predictor, store, "holdout", method)
    deployed = apply_temperature(adjust_logits(scores, prior, tau), temperature)
    assert metrics["product"]["top1"] == pytest.approx(np.mean(deployed.argmax(1) == labels))
    assert metrics["product"]["loss"] == pytest.approx(-deployed[np.arange(len(labels)), labels].mean(), rel=1e-4)
    before = metrics["logit_adjustment"]["before"]
    assert before["top1"] == pytest.approx(np.mean(scores.argmax(1) == labels))
    assert set(before["groups"]) == {"head", "medium", "tail"}
    assert sum(g["products"] for g in before["groups"].values()) == len(labels)
    table = pq.read_table(run / "eval" / "predictions.parquet").to_pandas()
    assert table["top1_prob"].to_numpy() == pytest.approx(np.exp(deployed.max(1)), rel=1e-5)
    assert table["base_top1_prob"].to_numpy() == pytest.approx(np.exp(scores.max(1)), rel=1e-5)
    calibration = metrics["calibration"]
    assert calibration["bins"] == 15 and sum(b["count"] for b in calibration["reliability_after"]) == len(labels)
    draw_evaluation(run)  # the report draws from the numbers evaluation wrote
    assert (run / "eval" / EVAL_FIGURES["reliability"]).stat().st_size > 1000
    accepted = calibration["auto_accept"]["calibrated"]
    assert accepted["threshold"] == metrics["confidence"]["threshold"]
    assert accepted["coverage"] == pytest.approx(metrics["confidence"]["coverage"])
    base_threshold = metrics["selection"]["threshold_uncalibrated"]["threshold"]
    if base_threshold is not None:
        assert calibration["auto_accept"]["uncalibrated"]["coverage"] == pytest.approx(
            np.mean(np.exp(scores.max(1)) >= base_threshold)
        )
    assert "Top-1 on a test set drawn like the train split" in metrics["notes"][0]
    rows = {row["lever"]: row for row in metrics["levers"]["rows"]}
    assert {"logit adjustment", "temperature scaling", "training twins", "balanced softmax"} <= set(rows)
    assert rows["temperature scaling"]["top1"]["change"] == 0.0  # T never changes the ranking
    assert rows["temperature scaling"]["ece"]["after"] == pytest.approx(calibration["ece_after"])
    missing = rows["balanced softmax"]
    assert missing["verdict"] == "not measured" and "--compare-runs" in missing["detail"]
    assert "| temperature scaling |" in (run / "eval" / "levers.md").read_text(encoding="utf-8")


def test_predictor_applies_temperature_and_tau(runs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    run = runs["softmax"]
    evaluate(EvalConfig(run=str(run), objective="macro", bootstrap_resamples=0))
    saved = json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    predictor = Predictor.load(run)
    assert predictor.calibration.temperature == saved["calibration"]["temperature"] != 1.0
    assert predictor.calibration.tau == saved["logit_adjustment"]["tau"]
    rng = np.random.default_rng(0)
    image_log_probs = np.log(rng.dirichlet(np.ones(predictor.taxonomy.num_classes) * 0.3, size=5)).astype(np.float32)
    monkeypatch.setattr(predictor, "image_log_probs", lambda images: image_log_probs)
    products = [[object(), object()], [object()], [object(), object()]]  # images never decoded: log-probs patched
    calibrated = predictor.predict_products(products, top_k=3)  # type: ignore[arg-type]
    plain_tau = predictor.calibration.tau
    predictor.calibration = type(predictor.calibration)(plain_tau, predictor.calibration.prior_log, 1.0)
    uncalibrated = predictor.predict_products(products, top_k=3)  # type: ignore[arg-type]
    for a, b in zip(calibrated, uncalibrated, strict=True):
        assert [s.label for s in a.top] == [s.label for s in b.top]  # top-1 (and ranking) unchanged
        assert a.top[0].probability != pytest.approx(b.top[0].probability)  # probabilities changed
        assert sum(s.probability for s in a.top) <= 1.0 + 1e-6


def test_balanced_softmax_run_is_a_row_of_the_levers_table(runs: dict) -> None:
    softmax, balanced = runs["softmax"], runs["balanced"]
    config = dict(bootstrap_resamples=200)
    with_missing = evaluate(EvalConfig(run=str(softmax), compare_runs=(str(runs["root"] / "runs" / "nope"),), **config))
    assert with_missing["levers"]["rows"][-1]["verdict"] == "not measured"
    evaluate(EvalConfig(run=str(balanced), **config))
    metrics = evaluate(EvalConfig(run=str(softmax), compare_runs=(str(balanced),), **config))
    row = metrics["levers"]["rows"][-1]
    assert row["lever"] == "loss: softmax -> balanced_softmax" and row["note"] is None and row["goal"] == "macro"
    other = json.loads((balanced / "eval" / "metrics.json").read_text(encoding="utf-8"))
    # The row compares the two runs' plain predictions: before = this run's, after = the balanced run's.
    assert row["top1"]["after"] == pytest.approx(other["logit_adjustment"]["before"]["top1"])
    assert row["macro"]["before"] == pytest.approx(metrics["logit_adjustment"]["before"]["macro"])
    assert row["top1"]["change_ci95"][0] <= row["top1"]["change"] <= row["top1"]["change_ci95"][1]
    assert "training" in row["cost"]["time"]


def test_compare_trains_balanced_softmax_through_the_registry(tmp_path: Path) -> None:
    build_workdir(tmp_path)
    config = CompareConfig(
        workdir=str(tmp_path), store="toy", head="linear", losses=("softmax", "balanced_softmax"), seeds=1, epochs=1,
        num_sampled=4, batch_size=32, isolate=False,
    )  # fmt: skip
    result = compare(config)
    assert set(result.runs) == {("softmax", "adamw", 0), ("balanced_softmax", "adamw", 0)}
    report = json.loads((result.report / "compare.json").read_text())
    assert {agg["loss"] for agg in report["losses"].values()} == {"softmax", "balanced_softmax"}
