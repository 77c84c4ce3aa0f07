"""Calibration of a run's fused (picture + text) product scores, chosen on val's fused scores.

`prodcat evaluate` chooses the logit adjustment tau, the temperature T and the auto-accept threshold on val's
picture scores; the text model then moves those scores (sharper where words were read), so the picture-fitted
probabilities no longer mean what they say. Here the same three are chosen the same way (tau for evaluate's
objective, T by val NLL on up to `calibration_products` products, the threshold for its target accuracy, settings
from RUN/eval/config.json) on the fused val scores of the text model kept; `prodcat text-head` stores them in the
text model's sidecar (R/text/), and the Predictor applies them whenever it fuses. Holdout gets ECE before (evaluate's
picture calibration on the fused scores, what was served until now) and after, with n and a paired bootstrap 95%
interval of the change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from prodcat.config import EvalConfig, load_config
from prodcat.evaluate.evaluation import (
    SELECTION_SPLIT,
    choose_threshold,
    confidence_curve,
    macro_accuracy,
    train_pictures_per_leaf,
)
from prodcat.evaluate.levers import Arm, paired_bootstrap
from prodcat.predict.calibration import (
    ECE_BINS,
    ProductCalibration,
    choose_tau,
    expected_calibration_error,
    fit_temperature,
    log_prior,
    nll,
)

__all__ = ["eval_settings", "train_prior_counts", "fit_fused_calibration", "holdout_calibration", "sidecar_block"]

PRIOR_UNIT = "train-split pictures per leaf"  # as evaluate's RUN/eval/prior.json


def eval_settings(run_dir: str | Path) -> tuple[EvalConfig, str]:
    """The run's evaluate settings (objective, tau grid, T on/off, target accuracy) and where they came from."""
    path = Path(run_dir) / "eval" / "config.json"
    if path.is_file():
        return load_config(EvalConfig, path), str(path)
    return EvalConfig(run=str(run_dir)), "EvalConfig defaults (the run was not evaluated)"


def train_prior_counts(predictor: Any) -> np.ndarray:
    """Pictures per leaf in the train split of the run's feature store: the prior evaluate's tau works with."""
    from prodcat.features.store import FeatureStore
    from prodcat.paths import WorkPaths

    store = FeatureStore.open(WorkPaths(predictor.extract_config.workdir).feature_store(predictor.store_name))
    return train_pictures_per_leaf(store, predictor.taxonomy.num_classes)


def _choose_tau(log_probs: np.ndarray, labels: np.ndarray, prior: np.ndarray, config: EvalConfig) -> dict[str, Any]:
    ones = np.ones(len(labels))
    hits = [(log_probs - tau * prior[None, :]).argmax(1) == labels for tau in config.tau_grid]  # argmax: no renorm
    top1 = np.array([hit.mean() for hit in hits])
    macro = np.array([macro_accuracy(hit.astype(np.float64), ones, labels) for hit in hits])
    tau = choose_tau(config.tau_grid, top1, macro, config.objective)
    return {"tau": tau, "objective": config.objective, "grid": list(config.tau_grid), "val_top1": top1.tolist(),
            "val_macro": macro.tolist()}  # fmt: skip


def fit_fused_calibration(
    log_probs: np.ndarray, labels: np.ndarray, prior_counts: np.ndarray, config: EvalConfig
) -> tuple[ProductCalibration, dict[str, Any]]:
    """tau, then T on the tau-adjusted scores, then the threshold on the calibrated ones: all on these (val) fused
    product log-probabilities. Returns the calibration and what was chosen (for the sidecar and fusion.json)."""
    labels = np.asarray(labels, np.int64)
    prior = log_prior(prior_counts)
    tau_block = _choose_tau(log_probs, labels, prior, config)
    adjusted = ProductCalibration(tau_block["tau"], prior).adjust(log_probs)
    rng = np.random.default_rng(0)  # as evaluate: the NLL of one scalar needs no more than calibration_products
    kept = np.sort(rng.choice(len(labels), min(len(labels), config.calibration_products), replace=False))
    temperature = fit_temperature(adjusted[kept], labels[kept]) if config.calibrate else 1.0
    calibration = ProductCalibration(tau_block["tau"], prior, temperature)
    deployed = calibration.temper(adjusted)
    correct = deployed.argmax(1) == labels
    threshold = choose_threshold(confidence_curve(np.exp(deployed.max(1)), correct), config.target_accuracy)
    chosen = {
        "fitted_on": SELECTION_SPLIT,
        "n": int(len(labels)),
        "logit_adjustment": tau_block,
        "temperature": temperature,
        "fit_products": int(len(kept)),
        "val_nll_before": nll(adjusted[kept], labels[kept]),
        "val_nll_after": nll(adjusted[kept], labels[kept], temperature),
        "confidence": {"target_accuracy": config.target_accuracy, **threshold},
    }
    return calibration, chosen


def sidecar_block(calibration: ProductCalibration, chosen: dict[str, Any], prior_counts: np.ndarray) -> dict:
    """What the Predictor needs (read back by `prodcat.predict.text_model.calibration_from_meta`), self-contained."""
    return {
        "fitted_on": chosen["fitted_on"],
        "n": chosen["n"],
        "tau": calibration.tau,
        "objective": chosen["logit_adjustment"]["objective"],
        "temperature": calibration.temperature,
        "threshold": chosen["confidence"]["threshold"],
        "target_accuracy": chosen["confidence"]["target_accuracy"],
        "prior_unit": PRIOR_UNIT,
        "prior_counts": [int(c) for c in np.asarray(prior_counts)],
    }


def _arm(log_probs: np.ndarray, labels: np.ndarray, threshold: float | None) -> dict[str, Any]:
    """Top-1, ECE, NLL and what the threshold auto-accepts, of one arm's calibrated scores."""
    prob = np.exp(log_probs.max(1))
    correct = log_probs.argmax(1) == labels
    accepted = np.zeros(len(prob), bool) if threshold is None else prob >= threshold
    count = int(accepted.sum())
    return {
        "top1": float(correct.mean()) if len(labels) else None,
        "ece": expected_calibration_error(prob, correct),
        "nll": float(-log_probs[np.arange(len(labels)), labels].mean()) if len(labels) else None,
        "threshold": threshold,
        "accepted": count,
        "coverage": float(accepted.mean()) if len(prob) else 0.0,
        "accepted_accuracy": float(correct[accepted].mean()) if count else None,
    }


def holdout_calibration(
    log_probs: np.ndarray,
    labels: np.ndarray,
    picture: tuple[ProductCalibration, float | None],
    fused: tuple[ProductCalibration, float | None],
    resamples: int,
    split: str = "holdout",
    picture_source: str = "evaluate's, fitted on val picture scores",
) -> dict[str, Any]:
    """ECE (and NLL, top-1, auto-accept) of the fused scores on `split`: uncalibrated, with evaluate's picture
    calibration (before: what was applied until now) and with the fused one (after); a paired bootstrap over
    products gives the 95% interval of each change."""
    labels = np.asarray(labels, np.int64)
    before, after = picture[0](log_probs), fused[0](log_probs)
    stats = paired_bootstrap(Arm(before.argmax(1), np.exp(before.max(1))), Arm(after.argmax(1), np.exp(after.max(1))),
                             labels, resamples)  # fmt: skip
    return {
        "split": split,
        "n": int(len(labels)),
        "bins": ECE_BINS,
        "uncalibrated": _arm(log_probs, labels, None),
        "before": {"calibration": picture_source, **_arm(before, labels, picture[1])},
        "after": {"calibration": "fitted on val fused scores", **_arm(after, labels, fused[1])},
        "change": stats,
        "interval": f"95% paired bootstrap over products ({resamples:,} resamples), the same draw for both arms",
    }
