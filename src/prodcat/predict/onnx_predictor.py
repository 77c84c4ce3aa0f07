"""The Predictor's contract run from an exported file: `OnnxPredictor.load("model.onnx")` (plus its OUT.json sidecar).

`predict_products` answers like `Predictor.predict_products` (top-K leaves of each product, each picture's own,
the auto-accept decision) from the ONNX graph of `prodcat export` alone: no run folder, checkpoint or feature store
is read, so the pair can be copied to a machine with ONNX Runtime and serve there (`prodcat serve --onnx`). One
graph call per product (the graph aggregates the pictures of one product). What the graph leaves out (OCR words,
training twins) is left out here too: `text_model` is None and `has_twins` False, and `hashes` is accepted and
ignored, so the server neither reads words nor hashes uploads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prodcat.config import ExtractConfig, config_from_dict
from prodcat.data.taxonomy import Taxonomy
from prodcat.errors import UserError
from prodcat.predict.export import OUTPUTS, SIDECAR_FORMAT, onnx_session, sidecar_path
from prodcat.predict.predictor import CategoryScore, ProductPrediction
from prodcat.utils import read_json

__all__ = ["OnnxPredictor", "read_sidecar"]


def read_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    """The sidecar of an exported file, checked (present, readable, this format, the ONNX file's sha256)."""
    import hashlib

    onnx_path, path = Path(onnx_path), sidecar_path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path}: no such file; write one with `prodcat export --run RUN --out {onnx_path}`")
    try:
        sidecar = read_json(path)
    except (OSError, ValueError) as error:
        raise UserError(
            f"{path}: the sidecar of {onnx_path.name} is missing or unreadable ({error}); export again "
            "with `prodcat export`"
        ) from None
    if sidecar.get("format") != SIDECAR_FORMAT:
        raise UserError(
            f"{path}: sidecar format {sidecar.get('format')!r}, this prodcat reads {SIDECAR_FORMAT}; "
            "export again with this version"
        )
    with open(onnx_path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    if digest != sidecar.get("sha256", {}).get("onnx"):
        raise UserError(
            f"{onnx_path}: sha256 differs from the one {path.name} recorded (changed or damaged since "
            "the export); export again"
        )
    return sidecar


class OnnxPredictor:
    """`predict_products` / `predict_product` of the Predictor, from an exported graph and its sidecar."""

    def __init__(self, session: Any, sidecar: dict[str, Any], path: Path | None = None) -> None:
        self.session, self.sidecar, self.path = session, sidecar, path
        rows = sidecar["taxonomy"]["rows"]
        self.taxonomy = Taxonomy.from_rows([tuple(row[:4]) for row in rows], {row[0]: row[4] for row in rows})
        if [int(c) for c in self.taxonomy.category_ids] != [row[0] for row in rows]:
            raise UserError(f"{path}: the sidecar's taxonomy is not in label order; export again")
        self.added = {int(c["label"]): c for c in sidecar.get("added_categories", [])}
        self.accept_threshold: float | None = sidecar.get("accept_threshold")
        self.aggregation: str = sidecar["aggregation"]["name"]
        self.top_k = int(sidecar["top_k"])
        self.input_size = tuple(int(s) for s in sidecar["preprocessing"]["input_size"][1:])  # the server's decode size
        self.extract_config = config_from_dict(ExtractConfig, sidecar["extract_config"])
        # The source run (its name for the server's /health; its eval/metrics.json when that folder is here too).
        self.run_dir = Path(sidecar["source_run"]["path"])
        self.device = "onnxruntime-cpu"
        self.text_model = None  # words are not a graph input (see the sidecar's left_out)
        self.has_twins = False
        self._resize: Any = None

    @classmethod
    def load(cls, onnx_path: str | Path, threads: int | None = None) -> OnnxPredictor:
        sidecar = read_sidecar(onnx_path)
        return cls(onnx_session(onnx_path, threads), sidecar, Path(onnx_path))

    def _pictures(self, images: Sequence[torch.Tensor], where: int) -> np.ndarray:
        """One product's decoded uint8 (3, H, W) pictures as the graph's (N, H, W, 3) input, at the input size."""
        if len(images) == 0:
            raise ValueError(f"product {where} has no pictures; the graph needs at least one")
        for index, image in enumerate(images):
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(
                    f"product {where}, image {index}: expected uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}"
                )
        # Resized here, by the Predictor's own Preprocessor, rather than in the graph: torchvision's uint8 resize is
        # fixed-point, the graph's float (1-2 apart on ~2% of the values), and served answers should be the
        # Predictor's. Pictures at the input size (all of Cdiscount's) pass as they are.
        resized = [
            image if tuple(image.shape[1:]) == self.input_size else self._resizer().resize(image) for image in images
        ]
        return np.ascontiguousarray(torch.stack(resized).permute(0, 2, 3, 1).numpy())

    def _resizer(self) -> Any:
        if self._resize is None:
            from prodcat.features.backbones import BackboneSpec, Preprocessor

            pre = self.sidecar["preprocessing"]
            spec = BackboneSpec(
                name=self.extract_config.backbone,
                timm_name=self.extract_config.backbone,
                input_size=tuple(pre["input_size"]),
                mean=tuple(pre["mean"]),
                std=tuple(pre["std"]),
                interpolation=pre["interpolation"],
            )
            self._resize = Preprocessor(spec)
        return self._resize

    def _score(self, label: int, probability: float) -> CategoryScore:
        added = self.added.get(label)
        if added is not None:
            return CategoryScore(label, int(added["category_id"]), probability, *added["names"])
        return CategoryScore(label, int(self.taxonomy.category_ids[label]), probability, *self.taxonomy.names(label))

    def _scores(self, labels: np.ndarray, probabilities: np.ndarray, top_k: int) -> list[CategoryScore]:
        return [
            self._score(int(label), float(p)) for label, p in zip(labels[:top_k], probabilities[:top_k], strict=True)
        ]

    def predict_products(
        self,
        products: Sequence[Sequence[torch.Tensor]],
        top_k: int = 5,
        hashes: Sequence[Sequence[bytes] | None] | None = None,
    ) -> list[ProductPrediction]:
        """One graph call per product; at most the exported top-K (sidecar `top_k`) leaves each. `hashes` is
        ignored: training twins are not in the graph."""
        top_k = min(int(top_k), self.top_k)
        predictions = []
        for where, product in enumerate(products):
            labels, probabilities, _, picture_labels, picture_probabilities = self.session.run(
                list(OUTPUTS), {"pictures": self._pictures(product, where)}
            )
            top = self._scores(labels, probabilities, top_k)
            per_image = [
                self._scores(row, p, top_k) for row, p in zip(picture_labels, picture_probabilities, strict=True)
            ]
            accepted = self.accept_threshold is not None and top[0].probability >= self.accept_threshold
            predictions.append(
                ProductPrediction(top, per_image, bool(accepted), self.accept_threshold, self.aggregation)
            )
        return predictions

    def predict_product(
        self, images: Sequence[torch.Tensor], top_k: int = 5, hashes: Sequence[bytes] | None = None
    ) -> ProductPrediction:
        return self.predict_products([images], top_k)[0]
