"""Calibration of fused (picture + text) scores on tiny arrays: tau, T and the threshold chosen on val as evaluate
chooses them, the holdout ECE before / after, and the sidecar block read back (or refused) by the text model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prodcat.checkpoint import CheckpointError
from prodcat.config import EvalConfig
from prodcat.predict.calibration import ProductCalibration, adjust_logits, expected_calibration_error, log_prior
from prodcat.predict.text_model import calibration_from_meta
from prodcat.train.text_calibration import fit_fused_calibration, holdout_calibration, sidecar_block

CLASSES = 5
COUNTS = np.array([400, 200, 100, 50, 10])  # a long tail: the prior tau divides out


def _overconfident(products: int, seed: int, sharpness: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities right about 65% of the time, leaning to the frequent leaves, and `sharpness` times too
    sure (as text sharpens scores)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(CLASSES, size=products, p=COUNTS / COUNTS.sum())
    logits = rng.normal(size=(products, CLASSES)) + 0.5 * log_prior(COUNTS)[None, :]
    logits[np.arange(products), labels] += 1.5
    scores = sharpness * logits
    return (scores - np.log(np.exp(scores).sum(1, keepdims=True))).astype(np.float32), labels


def test_the_choices_are_evaluate_s_on_these_scores() -> None:
    log_probs, labels = _overconfident(3000, 0)
    config = EvalConfig(objective="macro", target_accuracy=0.9)
    calibration, chosen = fit_fused_calibration(log_probs, labels, COUNTS, config)
    prior = log_prior(COUNTS)
    macro = []
    for tau in config.tau_grid:  # brute force: mean per-leaf recall of every tau of the grid
        hit = adjust_logits(log_probs, prior, tau).argmax(1) == labels
        macro.append(np.mean([hit[labels == c].mean() for c in range(CLASSES)]))
    assert calibration.tau == config.tau_grid[int(np.argmax(np.array(macro) >= max(macro) - 1e-12))] > 0
    assert calibration.temperature > 2.0  # four times too sure: T flattens the scores back
    assert chosen["val_nll_after"] < chosen["val_nll_before"] and chosen["n"] == 3000 and chosen["fitted_on"] == "val"
    deployed = calibration(log_probs)
    threshold = chosen["confidence"]["threshold"]
    accepted = np.exp(deployed.max(1)) >= threshold
    assert 0 < accepted.sum() < len(labels)
    assert (deployed.argmax(1) == labels)[accepted].mean() >= 0.9  # the target, on val's calibrated probabilities


def test_temperature_off_and_tau_off_keep_the_scores() -> None:
    log_probs, labels = _overconfident(500, 1)
    calibration, _ = fit_fused_calibration(log_probs, labels, COUNTS, EvalConfig(tau_grid=(0.0,), calibrate=False))
    assert calibration.tau == 0.0 and calibration.temperature == 1.0
    assert np.allclose(calibration(log_probs), log_probs, atol=1e-5)


def test_holdout_ece_drops_from_the_picture_calibration_to_the_fused_one() -> None:
    val, val_labels = _overconfident(3000, 2)
    held, held_labels = _overconfident(2000, 3)
    fused, chosen = fit_fused_calibration(val, val_labels, COUNTS, EvalConfig())
    picture = ProductCalibration(0.0, None, 1.3)  # fitted on less sure picture scores: far too little here
    report = holdout_calibration(held, held_labels, (picture, 0.6), (fused, chosen["confidence"]["threshold"]), 200)
    assert report["split"] == "holdout" and report["n"] == 2000 and report["bins"] == 15
    expected = expected_calibration_error(np.exp(picture(held).max(1)), picture(held).argmax(1) == held_labels)
    assert report["before"]["ece"] == pytest.approx(expected)
    assert report["after"]["ece"] < report["before"]["ece"] / 2
    assert report["uncalibrated"]["ece"] > report["after"]["ece"]
    low, high = report["change"]["ece"]["change_ci95"]
    assert low < high < 0  # the paired interval of the change excludes 0
    assert report["before"]["threshold"] == 0.6 and 0 < report["before"]["coverage"] <= 1


def test_sidecar_block_reads_back_and_bad_blocks_are_refused(tmp_path: Path) -> None:
    log_probs, labels = _overconfident(400, 4)
    calibration, chosen = fit_fused_calibration(log_probs, labels, COUNTS, EvalConfig(objective="macro"))
    meta = {"num_classes": CLASSES, "calibration": sidecar_block(calibration, chosen, COUNTS)}
    loaded, threshold = calibration_from_meta(meta, tmp_path / "best.json")
    assert loaded is not None and threshold == chosen["confidence"]["threshold"]
    assert np.allclose(loaded(log_probs), calibration(log_probs))
    assert calibration_from_meta({"num_classes": CLASSES}, tmp_path) == (None, None)  # an older text model
    short = dict(meta["calibration"], prior_counts=[1, 2])
    with pytest.raises(CheckpointError, match="prior_counts has 2 leaves.*--overwrite"):
        calibration_from_meta({"num_classes": CLASSES, "calibration": short}, tmp_path / "best.json")
    with pytest.raises(CheckpointError, match="bad calibration block"):
        calibration_from_meta({"num_classes": CLASSES, "calibration": dict(meta["calibration"], temperature=-1)},
                              tmp_path / "best.json")  # fmt: skip
