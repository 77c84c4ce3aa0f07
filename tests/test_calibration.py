"""Calibration and long-tail pieces against brute force: ECE by hand, logit adjustment against its formula,
temperature fit recovering a known T, tau choice, the balanced softmax loss, the levers' paired bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prodcat.evaluate.levers import Arm, config_changes, lever_row, paired_bootstrap
from prodcat.model import build_classifier, create_loss, list_losses
from prodcat.predict.calibration import (
    ProductCalibration,
    adjust_logits,
    apply_temperature,
    choose_tau,
    expected_calibration_error,
    fit_temperature,
    log_prior,
    nll,
    reliability,
)
from prodcat.report.levers import levers_table_html, levers_table_markdown


def _ece_by_hand(confidence: list[float], correct: list[bool], bins: int = 15) -> float:
    total, n = 0.0, len(confidence)
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidence) if (low < c <= high) or (b == 0 and c == 0.0)]
        if members:
            accuracy = sum(correct[i] for i in members) / len(members)
            mean = sum(confidence[i] for i in members) / len(members)
            total += len(members) / n * abs(accuracy - mean)
    return total


def test_ece_matches_a_loop_over_bins() -> None:
    confidence = [0.05, 0.5, 0.51, 0.9, 0.95, 1.0, 1 / 15, 0.34, 0.99, 0.6]
    correct = [False, True, False, True, True, True, False, False, True, False]
    assert expected_calibration_error(np.array(confidence), np.array(correct)) == pytest.approx(
        _ece_by_hand(confidence, correct)
    )
    # A two-item example worked out on paper: bin (0.8667, 0.9333] holds 0.9 (right) -> |1 - 0.9| = 0.1;
    # bin (0.2667, 0.3333] holds 0.3 (wrong) -> |0 - 0.3| = 0.3; ECE = (0.1 + 0.3) / 2.
    assert expected_calibration_error(np.array([0.9, 0.3]), np.array([True, False])) == pytest.approx(0.2)
    rng = np.random.default_rng(0)
    confidence_r, correct_r = rng.uniform(size=200), rng.uniform(size=200) < 0.6
    assert expected_calibration_error(confidence_r, correct_r) == pytest.approx(
        _ece_by_hand(confidence_r.tolist(), correct_r.tolist())
    )
    weights = rng.integers(0, 3, 200).astype(float)  # bootstrap weights = repeating items
    repeated = np.repeat(np.arange(200), weights.astype(int))
    assert expected_calibration_error(confidence_r, correct_r, weights=weights) == pytest.approx(
        expected_calibration_error(confidence_r[repeated], correct_r[repeated])
    )
    bins = reliability(np.array(confidence), np.array(correct))
    assert len(bins) == 15 and sum(b["count"] for b in bins) == len(confidence)
    assert bins[14]["count"] == 3 and bins[14]["accuracy"] == pytest.approx(1.0)  # 0.95, 1.0, 0.99
    assert bins[0]["count"] == 2 and bins[0]["confidence"] == pytest.approx((0.05 + 1 / 15) / 2)  # (0, 1/15]


def test_logit_adjustment_is_the_formula() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 4))
    counts = np.array([100, 10, 1, 0])
    prior = log_prior(counts)
    assert prior == pytest.approx(np.log(np.array([100, 10, 1, 1]) / 112))  # zero counts as 1
    for tau in (0.0, 0.5, 1.0, 2.0):
        expected = logits - tau * prior
        expected = expected - np.log(np.exp(expected).sum(axis=1, keepdims=True))
        assert adjust_logits(logits, prior, tau) == pytest.approx(expected)
    # Log-probabilities in, same result as logits in (the per-row constant cancels).
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert adjust_logits(log_probs, prior, 1.0) == pytest.approx(adjust_logits(logits, prior, 1.0))
    calibration = ProductCalibration(1.0, prior, 2.0)
    assert calibration(log_probs) == pytest.approx(apply_temperature(adjust_logits(log_probs, prior, 1.0), 2.0))
    with pytest.raises(ValueError, match="needs the train-split prior"):
        ProductCalibration(0.5, None)


def test_temperature_fit_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4000, 12)) * 3.0
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(12, p=p) for p in probs])
    # The model reports 2x the true logits (over-confident): the calibrated probabilities are softmax(scores / 2).
    scores = 2.0 * logits
    temperature = fit_temperature(scores, labels)
    assert temperature == pytest.approx(2.0, rel=0.08)
    assert nll(scores, labels, temperature) < nll(scores, labels)
    # The fitted T is the minimum: nearby temperatures do no better.
    for other in (temperature * 0.9, temperature * 1.1):
        assert nll(scores, labels, temperature) <= nll(scores, labels, other)
    # Under-confident scores get T < 1; the ranking never changes.
    assert fit_temperature(0.5 * logits, labels) == pytest.approx(0.5, rel=0.08)
    assert (apply_temperature(scores, temperature).argmax(1) == scores.argmax(1)).all()


def test_choose_tau_takes_the_objective_and_the_smaller_tau_on_ties() -> None:
    grid = (0.0, 0.5, 1.0, 1.5)
    top1 = np.array([0.80, 0.80, 0.78, 0.70])
    macro = np.array([0.40, 0.45, 0.52, 0.52])
    assert choose_tau(grid, top1, macro, "top1") == 0.0
    assert choose_tau(grid, top1, macro, "macro") == 1.0
    with pytest.raises(ValueError):
        choose_tau(grid, top1, macro, "f1")


def test_balanced_softmax_is_cross_entropy_on_logits_plus_log_prior() -> None:
    assert "balanced_softmax" in list_losses()
    torch.manual_seed(0)
    counts = np.array([50, 20, 5, 1, 0, 9])
    loss_fn = create_loss("balanced_softmax", 7, 6, prior_counts=counts)
    embedding, target = torch.randn(10, 7, requires_grad=True), torch.tensor([0, 1, 2, 3, 4, 5, 0, 0, 1, 2])
    prior = torch.log(torch.tensor(np.maximum(counts, 1) / np.maximum(counts, 1).sum(), dtype=torch.float32))
    logits = F.linear(embedding, loss_fn.weight, loss_fn.bias)
    expected = F.cross_entropy(logits + prior, target)
    got = loss_fn(embedding, target)
    torch.testing.assert_close(got, expected)
    got.backward()
    grad = loss_fn.weight.grad.clone()
    loss_fn.weight.grad = None
    expected.backward()
    assert grad.abs().sum() > 0
    torch.testing.assert_close(loss_fn.log_probs(embedding), F.log_softmax(logits, dim=1))  # plain at inference
    # The prior is saved with the weights: a model built with other counts predicts the same after loading.
    model = build_classifier("linear", "balanced_softmax", (7,), 6, prior_counts=counts)
    other = build_classifier("linear", "balanced_softmax", (7,), 6, prior_counts=np.ones(6))
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other.output.log_prior, model.output.log_prior)


def test_paired_bootstrap_and_the_table() -> None:
    rng = np.random.default_rng(3)
    label = rng.integers(0, 5, 300)
    before = Arm(np.where(rng.uniform(size=300) < 0.6, label, (label + 1) % 5), rng.uniform(0.3, 1.0, 300))
    better = np.where(rng.uniform(size=300) < 0.3, label, before.pred)
    stats = paired_bootstrap(before, Arm(better, before.confidence), label, resamples=300)
    assert stats["top1"]["change"] == pytest.approx(np.mean(better == label) - np.mean(before.pred == label))
    low, high = stats["top1"]["change_ci95"]
    assert 0 < low <= stats["top1"]["change"] <= high  # paired: a sure gain has an interval above 0
    assert stats["ece"]["before"] == pytest.approx(expected_calibration_error(before.confidence, before.pred == label))
    assert stats["macro"]["after"] == pytest.approx(
        np.mean([np.mean(better[label == leaf] == leaf) for leaf in np.unique(label)])
    )
    same = paired_bootstrap(before, before, label, resamples=50)
    assert same["top1"]["change"] == 0 and same["top1"]["change_ci95"] == [0.0, 0.0]
    row = lever_row("x", "d", before, Arm(better, None), label, "top1", {"time": "1 s"}, 100)
    assert row["verdict"].startswith("helps") and row["ece"] is None and row["n"] == 300
    hurt = lever_row("y", "d", Arm(better, None), before, label, "top1", {}, 100)
    assert hurt["verdict"].startswith("hurts")
    flat = lever_row("z", "d", before, before, label, "ece", {}, 50)
    assert flat["verdict"].startswith("no clear change") and "improves" not in flat["verdict"]
    mixed = lever_row("m", "d", before, Arm(better, before.confidence), label, "ece", {}, 100)
    assert mixed["verdict"].startswith("no clear change (ece") and "improves top1" in mixed["verdict"]
    metrics = {"levers": {"split": "holdout", "n": 300, "rows": [row, hurt, flat], "notes": ["top-1 can drop"]}}
    page = levers_table_html(metrics, note="Demo data is synthetic.")
    assert page.count("<tr>") == 4 and "synthetic" in page and "top-1 can drop" in page
    markdown = levers_table_markdown(metrics)
    assert markdown.count("\n| ") == 5 and "n/a" in markdown  # header, rule, 3 rows; a labels-only row has no ECE
    assert config_changes({"loss": "softmax", "run_name": "a"}, {"loss": "balanced_softmax", "run_name": "b"}) == {
        "loss": ["softmax", "balanced_softmax"]
    }
