"""Long-tail correction and calibration of product probabilities: logit adjustment, temperature scaling, ECE.

Both act on a product's log-probabilities (P, C), after the images were combined (whatever combined them: an
aggregation of the per-picture head or a learned product head), in this order:

1. logit adjustment (Menon et al. 2021): score - tau * log prior, renormalised; prior = the train split's label
   frequencies (pictures per leaf; a leaf without any counts as 1). tau = 0 changes nothing; tau = 1 is the Bayes
   correction from the train distribution to a uniform one over leaves. It trades top-1 on a train-distributed test
   set (Kaggle's is one) for macro accuracy (every leaf counted alike): which one matters is the user's objective.
2. temperature scaling (Guo et al. 2017): log_softmax(score / T), one scalar T fitted on val by minimising the NLL
   of the product-level probabilities. It never changes the ranking of the leaves, so top-1 is untouched; only the
   probabilities (and so the auto-accept threshold and ECE) move.

`ProductCalibration` holds (tau, log prior, T); evaluation chooses them on val and saves them in the run folder
(RUN/eval/metrics.json and RUN/eval/prior.json), and the Predictor applies the same object, so evaluated and
served probabilities cannot disagree.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from prodcat.utils import read_json, write_json

__all__ = [
    "ECE_BINS",
    "PRIOR_FILE",
    "DEFAULT_TAU_GRID",
    "ProductCalibration",
    "log_prior",
    "adjust_logits",
    "apply_temperature",
    "nll",
    "fit_temperature",
    "expected_calibration_error",
    "reliability",
    "choose_tau",
    "load_calibration",
    "save_prior",
]

ECE_BINS = 15  # equal-width confidence bins, as Guo et al. 2017
PRIOR_FILE = "prior.json"  # RUN/eval/prior.json: the train-split counts behind log prior
DEFAULT_TAU_GRID = tuple(round(0.1 * step, 1) for step in range(21))  # 0.0, 0.1, ..., 2.0
_T_BOUNDS = (1e-3, 1e3)  # search range of 1 / T


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def log_prior(counts: np.ndarray) -> np.ndarray:
    """log of the label frequencies; zero counts count as 1 so log prior stays finite (as the unigram sampler)."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return np.log(counts / counts.sum())


def adjust_logits(scores: np.ndarray, prior_log: np.ndarray, tau: float) -> np.ndarray:
    """Logit adjustment: log_softmax(scores - tau * log prior) per row (scores: logits or log-probabilities)."""
    return _log_softmax(np.asarray(scores, dtype=np.float64) - tau * prior_log[None, :]).astype(scores.dtype)


def apply_temperature(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    """log_softmax(log_probs / T): the same ranking, flatter (T > 1) or sharper (T < 1) probabilities."""
    if temperature == 1.0:
        return np.asarray(log_probs)
    return _log_softmax(np.asarray(log_probs, dtype=np.float64) / temperature).astype(log_probs.dtype)


def nll(log_probs: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels after temperature T."""
    tempered = _log_softmax(np.asarray(log_probs, dtype=np.float64) / temperature)  # logits in: normalise too
    return float(-tempered[np.arange(len(labels)), labels].mean()) if len(labels) else 0.0


def _nll_slope(scores: np.ndarray, labels: np.ndarray, beta: float) -> tuple[float, float]:
    """First and second derivative of the mean NLL in beta = 1 / T: E_p[z] - z_y and Var_p[z] (convex in beta)."""
    probs = np.exp(_log_softmax(beta * scores))
    mean = (probs * scores).sum(axis=1)
    variance = (probs * scores * scores).sum(axis=1) - mean * mean
    true = scores[np.arange(len(labels)), labels]
    return float((mean - true).mean()), float(max(variance.mean(), 0.0))


def fit_temperature(log_probs: np.ndarray, labels: np.ndarray, iterations: int = 60) -> float:
    """The T minimising the mean NLL of log_softmax(log_probs / T): Newton steps on beta = 1 / T, kept inside a
    bracket that bisection on the derivative's sign shrinks (the NLL is convex in beta, so the root is the minimum).
    """
    scores = np.asarray(log_probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if not len(labels):
        return 1.0
    scores = np.maximum(scores, scores.max(axis=1, keepdims=True) - 1e4)  # -inf rows (zero probability) stay finite
    low, high, beta = _T_BOUNDS[0], _T_BOUNDS[1], 1.0
    for _ in range(iterations):
        slope, curvature = _nll_slope(scores, labels, beta)
        if abs(slope) < 1e-10:
            break
        low, high = (beta, high) if slope < 0 else (low, beta)
        step = beta - slope / curvature if curvature > 1e-12 else np.nan
        beta = step if low < step < high else np.sqrt(low * high)  # Newton inside the bracket, else bisect
        if high / low < 1 + 1e-9:
            break
    return float(1.0 / beta)


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    # Right-closed bins (lo, hi]: a confidence of exactly 1/15 falls in the first bin; 0 (impossible for a top-1
    # probability) in the first as well.
    return np.clip(np.ceil(np.asarray(confidence, np.float64) * bins).astype(np.int64) - 1, 0, bins - 1)


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS, weights: np.ndarray | None = None
) -> float:
    """ECE = sum over equal-width bins of (share of items) * |accuracy - mean confidence|; `weights` (bootstrap
    draw counts) weigh the items."""
    confidence = np.asarray(confidence, np.float64)
    weights = np.ones(len(confidence)) if weights is None else np.asarray(weights, np.float64)
    total = weights.sum()
    if total <= 0:
        return 0.0
    index = _bin_index(confidence, bins)
    confidence_sum = np.bincount(index, weights=weights * confidence, minlength=bins)
    hit_sum = np.bincount(index, weights=weights * np.asarray(correct, np.float64), minlength=bins)
    return float(np.abs(hit_sum - confidence_sum).sum() / total)


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Per bin: bounds, items, mean confidence and accuracy (None for an empty bin): a reliability diagram's data."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, np.float64)
    index = _bin_index(confidence, bins)
    result = []
    for b in range(bins):
        mine = index == b
        count = int(mine.sum())
        result.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": count,
                "confidence": float(confidence[mine].mean()) if count else None,
                "accuracy": float(correct[mine].mean()) if count else None,
            }
        )
    return result


def choose_tau(grid: tuple[float, ...], top1: np.ndarray, macro: np.ndarray, objective: str) -> float:
    """The tau of `grid` with the best val `objective` ("top1" or "macro"); ties go to the smallest tau (the
    smaller change)."""
    if objective not in ("top1", "macro"):
        raise ValueError(f"objective must be top1 or macro, got {objective!r}")
    values = np.asarray(top1 if objective == "top1" else macro, np.float64)
    order = np.argsort(np.asarray(grid, np.float64), kind="stable")
    best = order[int(np.argmax(values[order] >= values.max() - 1e-12))]
    return float(grid[best])


@dataclasses.dataclass
class ProductCalibration:
    """What evaluation chose on val and the Predictor applies to product log-probabilities."""

    tau: float = 0.0
    prior_log: np.ndarray | None = None  # (C,) log train-split label frequencies; needed when tau != 0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.tau != 0.0 and self.prior_log is None:
            raise ValueError("logit adjustment (tau != 0) needs the train-split prior")

    def adjust(self, log_probs: np.ndarray) -> np.ndarray:
        """Step 1, before training twins are folded in: the logit adjustment (changes the ranking)."""
        return log_probs if self.tau == 0.0 else adjust_logits(log_probs, self.prior_log, self.tau)  # type: ignore[arg-type]

    def temper(self, log_probs: np.ndarray) -> np.ndarray:
        """Step 2, last: temperature scaling (never changes the ranking)."""
        return apply_temperature(log_probs, self.temperature)

    def __call__(self, log_probs: np.ndarray) -> np.ndarray:
        return self.temper(self.adjust(log_probs))


def save_prior(eval_dir: str | Path, counts: np.ndarray, unit: str) -> Path:
    """Write the counts behind log prior beside metrics.json, so a run folder stands alone."""
    path = Path(eval_dir) / PRIOR_FILE
    write_json(path, {"unit": unit, "zero_counts_as": 1, "counts": [int(c) for c in np.asarray(counts)]})
    return path


def load_calibration(run_dir: str | Path, metrics: dict[str, Any] | None = None) -> ProductCalibration:
    """The choices of RUN/eval/metrics.json (identity when the run was never evaluated, or predates them)."""
    eval_dir = Path(run_dir) / "eval"
    if metrics is None:
        path = eval_dir / "metrics.json"
        metrics = read_json(path) if path.is_file() else {}
    tau = float((metrics.get("logit_adjustment") or {}).get("tau") or 0.0)
    temperature = float((metrics.get("calibration") or {}).get("temperature") or 1.0)
    prior = None
    if tau != 0.0:
        prior_path = eval_dir / PRIOR_FILE
        if not prior_path.is_file():
            raise FileNotFoundError(f"{prior_path}: metrics.json asks for tau = {tau:g} but the prior is missing; "
                                    "re-run `prodcat evaluate`")  # fmt: skip
        prior = log_prior(np.asarray(read_json(prior_path)["counts"], dtype=np.float64))
    return ProductCalibration(tau, prior, temperature)
