"""A run's text model at prediction time: load R/text/, read the words on pictures, fuse them with the picture
scores. Below the Predictor (which uses it) and free of it; the training side is `prodcat.train.text_fusion`.

The fused scores have their own calibration (logit adjustment tau, temperature T, auto-accept threshold), chosen on
val's fused scores by `prodcat text-head` and kept in R/text/'s checkpoint sidecar: evaluate's calibration was fitted
on picture scores, which the text moves. The Predictor applies this one whenever the text model is in use.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prodcat.config import config_from_dict
from prodcat.ocr.text_features import TextFeatureConfig, product_texts, text_features
from prodcat.predict.aggregation import sum_by_product
from prodcat.predict.calibration import ProductCalibration, log_prior
from prodcat.utils import get_logger

__all__ = ["ProductSet", "FusedLinear", "TextModel", "TEXT_DIR", "head_log_probs", "late_fuse", "load_text_model",
           "fuse_stored", "read_texts", "calibration_from_meta"]  # fmt: skip

TEXT_DIR = "text"  # R/text/checkpoints/best.json + best.000000.safetensors, R/text/fusion.json
log = get_logger("prodcat.predict.text_model")


@dataclasses.dataclass
class ProductSet:
    """One split at product level: picture head log-probs, mean picture features, the words read, labels."""

    product_id: np.ndarray  # (P,)
    label: np.ndarray  # (P,)
    picture_log_probs: np.ndarray  # (P, C) the run's head, aggregated as evaluate chose on val
    picture_mean: np.ndarray  # (P, D) mean of the product's stored picture features
    texts: list[str]  # words read (confidence-filtered), "" when none

    @property
    def has_text(self) -> np.ndarray:
        return np.array([bool(text.strip()) for text in self.texts], dtype=bool)


class FusedLinear(nn.Module):
    """Linear scores over [standardised picture features ; hashed text]: either part may be absent (size 0). The
    text part is an EmbeddingBag over the sparse vector's (index, value) pairs: exact, and cheap at 2^14+ columns."""

    def __init__(self, picture_dim: int, n_features: int, num_classes: int) -> None:
        super().__init__()
        self.picture_dim, self.n_features = picture_dim, n_features
        self.picture = nn.Linear(picture_dim, num_classes) if picture_dim else None
        self.text = nn.EmbeddingBag(n_features, num_classes, mode="sum") if n_features else None
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.register_buffer("mean", torch.zeros(picture_dim))
        self.register_buffer("scale", torch.ones(picture_dim))
        if self.text is not None:
            nn.init.zeros_(self.text.weight)  # no words, no opinion: starts at the bias alone

    def forward(self, picture: torch.Tensor | None, text: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        scores = self.bias.expand(len(picture) if picture is not None else len(text[1]), -1)
        if self.picture is not None and picture is not None:
            scores = scores + self.picture((picture - self.mean) / self.scale)
        if self.text is not None and text is not None:
            indices, offsets, values = text
            scores = scores + self.text(indices, offsets, per_sample_weights=values)
        return torch.log_softmax(scores, dim=1)


def _bag(matrix: Any, rows: np.ndarray | None = None) -> tuple[torch.Tensor, ...]:
    """(indices, offsets, values) of CSR rows for nn.EmbeddingBag."""
    part = matrix if rows is None else matrix[rows]
    return (
        torch.from_numpy(part.indices.astype(np.int64)),
        torch.from_numpy(part.indptr[:-1].astype(np.int64)),
        torch.from_numpy(part.data.astype(np.float32)),
    )


def read_texts(workdir: str | Path, min_confidence: float) -> dict[int, str]:
    """product_id -> words read by `prodcat ocr` (W/ocr/words.parquet); a clear error when it has not run."""
    import pyarrow.parquet as pq

    path = Path(workdir) / "ocr" / "words.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `prodcat ocr --workdir {workdir} --select text_likely` first")
    return product_texts(pq.read_table(path), min_confidence)


def _inputs(data: ProductSet, text_config: TextFeatureConfig | None, picture: bool) -> tuple[Any, Any]:
    matrix = None if text_config is None else text_features(data.texts, text_config).tocsr()
    return (torch.from_numpy(data.picture_mean) if picture else None), matrix


def _forward(model: FusedLinear, picture: torch.Tensor | None, matrix: Any, rows: np.ndarray) -> torch.Tensor:
    return model(None if picture is None else picture[rows], None if matrix is None else _bag(matrix, rows))


@torch.no_grad()
def head_log_probs(model: FusedLinear, data: ProductSet, text_config: TextFeatureConfig) -> np.ndarray:
    picture, matrix = _inputs(data, text_config if model.n_features else None, bool(model.picture_dim))
    return _forward(model, picture, matrix, np.arange(len(data.label))).numpy()


def late_fuse(picture: np.ndarray, text: np.ndarray, has_text: np.ndarray, weight: float) -> np.ndarray:
    """picture + weight * text on products with words, picture alone elsewhere (renormalised)."""
    fused = picture + weight * np.where(has_text[:, None], text, 0.0)
    fused = fused - fused.max(axis=1, keepdims=True)
    return fused - np.log(np.exp(fused).sum(axis=1, keepdims=True))


class TextModel:
    """A run's text model: reads words on pictures (text-likely ones) and fuses them with the picture head.

    `calibration` and `accept_threshold` were chosen on val's fused scores; calibration None (a text model trained
    before they were kept) leaves the run's picture calibration in use."""

    def __init__(
        self,
        model: FusedLinear,
        kind: str,
        late_weight: float,
        text_config: TextFeatureConfig,
        calibration: ProductCalibration | None = None,
        accept_threshold: float | None = None,
    ) -> None:
        self.model, self.kind, self.late_weight, self.text_config = model.eval(), kind, late_weight, text_config
        self.calibration, self.accept_threshold = calibration, accept_threshold
        self._engine: Any = None
        self._lock = threading.Lock()  # one Tesseract handle: calls from several threads take turns

    def fuse(self, picture_log_probs: np.ndarray, picture_mean: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """Product log-probabilities with the words `texts` (one string per product)."""
        data = ProductSet(np.zeros(len(texts)), np.zeros(len(texts), np.int64), picture_log_probs,
                          np.asarray(picture_mean, np.float32).reshape(len(texts), -1), list(texts))  # fmt: skip
        if self.kind == "concat":
            return head_log_probs(self.model, data, self.text_config)
        return late_fuse(picture_log_probs, head_log_probs(self.model, data, self.text_config), data.has_text,
                         self.late_weight)  # fmt: skip

    def read(self, images: Sequence[torch.Tensor]) -> list[list[str]]:
        """Words read (confident enough) on each decoded uint8 (3, H, W) image; [] for pictures the text-presence
        test passes over, or when no OCR engine is installed (said once in the log)."""
        from PIL import Image

        from prodcat.ocr.select import text_likely

        found: list[list[str]] = []
        for image in images:
            picture = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
            engine = self._ocr_engine() if text_likely(picture) else None
            if engine is None:
                found.append([])
                continue
            with self._lock:
                words = engine.read(picture)
            found.append([w.text for w in words if w.confidence >= self.text_config.min_confidence])
        return found

    def _ocr_engine(self) -> Any:
        if self._engine is None:
            from prodcat.ocr.engine import EngineUnavailable, create_engine

            try:
                self._engine = create_engine()
            except EngineUnavailable as error:
                log.warning("text model without OCR: %s; predictions use the pictures alone", error)
                self._engine = False
        return self._engine or None


def load_text_model(run_dir: str | Path) -> TextModel | None:
    """R/text/'s model, checked (format, sha256); None when the run has none."""
    import safetensors.torch

    from prodcat.checkpoint import CheckpointError, checkpoint_dir, verify_checkpoint

    folder = Path(run_dir) / TEXT_DIR
    if not (checkpoint_dir(folder) / "best.json").is_file():
        return None
    meta = verify_checkpoint(folder, "best")
    picture_dim, n_features = (int(v) for v in meta["in_shape"])
    model = FusedLinear(picture_dim, n_features, int(meta["num_classes"]))
    path = checkpoint_dir(folder) / meta["files"]["weights"]
    try:
        model.load_state_dict(safetensors.torch.load_file(str(path)))
    except RuntimeError as error:
        raise CheckpointError(f"{path}: text model weights do not fit ({error})") from None
    text_config = config_from_dict(TextFeatureConfig, meta["text_features"])
    calibration, threshold = calibration_from_meta(meta, checkpoint_dir(folder) / "best.json")
    if calibration is None:
        log.warning("%s: no calibration of the fused scores; the run's picture calibration applies (re-run "
                    "`prodcat text-head --run %s --overwrite` to fit one)", folder, run_dir)  # fmt: skip
    return TextModel(model, meta["kind"], float(meta["late_weight"]), text_config, calibration, threshold)


def calibration_from_meta(meta: dict[str, Any], where: Path) -> tuple[ProductCalibration | None, float | None]:
    """(calibration, auto-accept threshold) of a text model's sidecar block "calibration"; (None, None) without one."""
    from prodcat.checkpoint import CheckpointError

    block = meta.get("calibration")
    if not block:
        return None, None
    counts = np.asarray(block.get("prior_counts") or [], dtype=np.float64)
    if len(counts) != int(meta["num_classes"]):
        raise CheckpointError(f"{where}: calibration.prior_counts has {len(counts)} leaves, the text model "
                              f"{meta['num_classes']}; re-run `prodcat text-head --overwrite`")  # fmt: skip
    try:
        calibration = ProductCalibration(float(block["tau"]), log_prior(counts), float(block["temperature"]))
    except (KeyError, TypeError, ValueError) as error:
        message = f"{where}: bad calibration block ({error}); re-run `prodcat text-head --overwrite`"
        raise CheckpointError(message) from None
    threshold = block.get("threshold")
    return calibration, None if threshold is None else float(threshold)


def fuse_stored(
    predictor: Any, ids: np.ndarray, product_index: np.ndarray, features: np.ndarray, log_probs: np.ndarray
) -> np.ndarray:
    """Fuse stored products (ids, their rows' features) with the words W/ocr/words.parquet holds for them; the
    picture scores unchanged (and a warning) when `prodcat ocr` has not run."""
    model = predictor.text_model
    try:
        texts = read_texts(predictor.extract_config.workdir, model.text_config.min_confidence)
    except FileNotFoundError as error:
        log.warning("text model not used: %s", error)
        return log_probs
    counts = np.maximum(np.bincount(product_index, minlength=len(ids)), 1)[:, None]
    mean = sum_by_product(features.reshape(len(features), -1), product_index, len(ids)) / counts
    found = [texts.get(int(pid), "") for pid in ids]
    log.info("text model (%s): %d of %d products have words read", model.kind, sum(map(bool, found)), len(ids))
    return model.fuse(log_probs, mean, found)
