"""The Predictor: load a run, classify images, products or whole BSON files.

It is the single path used by `prodcat evaluate`, `prodcat predict` (Kaggle submission) and the HTTP server, so
the three can never disagree: same backbone and weights as the feature store the head was trained on, same
preprocessing (carried by the backbone spec), same product aggregation (chosen on validation by evaluate).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from prodcat.config import ExtractConfig
from prodcat.data.taxonomy import Taxonomy
from prodcat.predict.aggregation import AGGREGATIONS, aggregate_products
from prodcat.predict.aggregation import sum_by_product as _sum_by_product
from prodcat.predict.run import Run, load_run, read_choices
from prodcat.utils import get_logger

if TYPE_CHECKING:
    from prodcat.features.extractor import FeatureExtractor
    from prodcat.predict.calibration import ProductCalibration
    from prodcat.predict.prototypes import Prototypes
    from prodcat.predict.twins import TwinChoice, TwinIndex, TwinMatch

__all__ = [
    "CategoryScore",
    "ProductPrediction",
    "Predictor",
    "aggregate_products",
    "AGGREGATIONS",
    "PRODUCT_HEAD",
]

PRODUCT_HEAD = "product_head"  # a run whose head reads whole products: the head itself combines the pictures
log = get_logger("prodcat.predict.predictor")


@dataclasses.dataclass
class CategoryScore:
    label: int
    category_id: int
    probability: float
    level1: str
    level2: str
    level3: str


@dataclasses.dataclass
class ProductPrediction:
    top: list[CategoryScore]
    images: list[list[CategoryScore]]
    accepted: bool
    threshold: float | None
    aggregation: str
    training_matches: TwinMatch | None = None  # photos byte-identical to training pictures (None: no match)
    ocr_words: list[list[str]] | None = None  # words read on each picture (None: the run has no text model)


class Predictor:
    """A trained head plus the backbone that made its features."""

    def __init__(
        self,
        model: torch.nn.Module,
        taxonomy: Taxonomy,
        extract_config: ExtractConfig,
        meta: dict[str, Any],
        run_dir: Path,
        device: torch.device | None = None,
        store_name: str | None = None,
        run: Run | None = None,
    ) -> None:
        self.model = model.eval()
        self.taxonomy = taxonomy
        self.extract_config = extract_config
        self.meta = meta
        self.run_dir = Path(run_dir)
        self.run = run  # the loaded run folder (None for a Predictor built by hand, as the tests do)
        self.device = device or torch.device("cpu")
        self._extractor: FeatureExtractor | None = None
        choices = run.choices if run is not None else read_choices(self.run_dir)  # made on val by evaluate
        self.reads_products = bool(getattr(model, "reads_products", False))
        default = PRODUCT_HEAD if self.reads_products else "mean_prob"
        self.aggregation: str = choices.aggregation or default
        self.store_name = store_name or extract_config.name  # the feature store the head was trained on
        self.accept_threshold: float | None = choices.threshold
        # Logit adjustment (tau) and temperature (T) chosen on val; the threshold above is on calibrated probabilities.
        self.calibration = choices.calibration
        self.twin_choice: TwinChoice | None = _twin_choice(choices.twins)  # None: not chosen on val yet
        self._twins: TwinIndex | None | bool = False  # False: not built yet
        self._prototypes: Prototypes | None = None
        self._prototype_signature: tuple[int, int] | None = None
        self.refresh_prototypes()
        from prodcat.predict.text_model import load_text_model

        self.text_model = load_text_model(self.run_dir)  # R/text/ (prodcat text-head); None: pictures alone

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device | None = None, which: str = "best") -> Predictor:
        """Everything from the run folder alone (`load_run`): weights, taxonomy, extraction config, val choices."""
        from prodcat.checkpoint import load_checkpoint

        run = load_run(run_dir)
        model, meta = load_checkpoint(run.path, which=which, taxonomy=run.taxonomy)
        target = torch.device(device) if device is not None else torch.device("cpu")
        return cls(model.to(target), run.taxonomy, run.extract_config, meta, run.path, target, run.store_name, run)

    # -- features ------------------------------------------------------------------------------------------------
    def _feature_path(self) -> FeatureExtractor:
        """The extraction's FeatureExtractor, built on first use (evaluate on cached features never needs it); warns
        when its engine is not the one the store was made with."""
        if self._extractor is None:
            from prodcat.features.extractor import FeatureExtractor

            self._extractor = FeatureExtractor.from_config(self.extract_config, device=self.device)
            self._extractor.warn_if_engine_differs(self.extract_config.engine, self.store_name)
        return self._extractor

    def image_features(self, images: Sequence[torch.Tensor], batch_size: int = 64) -> np.ndarray:
        """Backbone features of decoded uint8 (3, H, W) images, exactly as extraction stores them (the same
        extractor: preprocessing, engine choice, TTA, channels, float16 rounding), as float32."""
        extractor = self._feature_path()
        starts = range(0, len(images), batch_size)
        chunks = [extractor(list(images[start : start + batch_size])) for start in starts]
        return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0,), np.float32)

    @torch.inference_mode()
    def head_log_probs(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """The head's own full-softmax log-probabilities (N, C) of cached picture features (a product head reads each
        picture as a one-picture product); no added categories."""
        out = []
        for start in range(0, len(features), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(features[start : start + batch_size], dtype=np.float32))
            out.append(self.model(batch.to(self.device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.taxonomy.num_classes), np.float32)

    def log_probs_from_features(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Log-probabilities of cached picture features: (N, C), or (N, C + new) with added categories."""
        log_probs = self.head_log_probs(features, batch_size)
        prototypes = self.prototypes
        return log_probs if prototypes is None else prototypes.combine(log_probs, prototypes.scores(features))

    @property
    def aggregations(self) -> tuple[str, ...]:
        """Ways this run can combine a product's pictures: a product head adds its own to the per-picture three."""
        return (*AGGREGATIONS, PRODUCT_HEAD) if self.reads_products else AGGREGATIONS

    def product_log_probs_from_features(
        self,
        features: np.ndarray,
        product_index: np.ndarray,
        num_products: int,
        method: str | None = None,
        log_probs: np.ndarray | None = None,
    ) -> np.ndarray:
        """(P, C[+new]) product log-probabilities of picture features; `method` defaults to the run's aggregation.
        `log_probs`: the pictures' log-probabilities when already computed (per-picture aggregations reuse them)."""
        method = method or self.aggregation
        if method != PRODUCT_HEAD:
            if log_probs is None:
                log_probs = self.log_probs_from_features(features)
            return aggregate_products(log_probs, product_index, num_products, method)
        if not self.reads_products:
            raise ValueError(f"aggregation {PRODUCT_HEAD!r} needs a product head; this run's head reads pictures")
        return self._product_head_log_probs(features, np.asarray(product_index, dtype=np.int64), num_products)

    @torch.inference_mode()
    def _product_head_log_probs(self, features: np.ndarray, product_index: np.ndarray, num_products: int) -> np.ndarray:
        from prodcat.features.products import PAD, group_index

        slots = group_index(product_index, num_products)
        mask = slots != PAD
        batch = np.zeros((*slots.shape, *features.shape[1:]), dtype=np.float32)
        batch[mask] = features[slots[mask]]
        out = []
        for start in range(0, num_products, 1024):
            chunk = torch.from_numpy(batch[start : start + 1024]).to(self.device)
            chunk_mask = torch.from_numpy(mask[start : start + 1024]).to(self.device)
            out.append(self.model(chunk, chunk_mask).float().cpu().numpy())
        log_probs = np.concatenate(out) if out else np.zeros((0, self.taxonomy.num_classes), np.float32)
        prototypes = self.prototypes
        if prototypes is None:
            return log_probs
        # A product's prototype logit: the mean of its pictures' (the head's own columns are already per product).
        counts = np.maximum(np.bincount(product_index, minlength=num_products), 1)[:, None]
        scores = _sum_by_product(prototypes.scores(features).astype(np.float64), product_index, num_products) / counts
        return prototypes.combine(log_probs, scores)

    # -- added categories (prototypes) ------------------------------------------------------------------------------
    @property
    def prototypes(self) -> Prototypes | None:
        """The run's added categories, reloaded when prototypes.json changes (so a server knows a new one at once)."""
        self.refresh_prototypes()
        return self._prototypes

    def refresh_prototypes(self) -> None:
        from prodcat.predict.prototypes import Prototypes

        signature = Prototypes.signature(self.run_dir)
        if signature != self._prototype_signature:
            self._prototypes = Prototypes.load(self.run_dir) if signature is not None else None
            self._prototype_signature = signature

    @property
    def num_outputs(self) -> int:
        """Categories a prediction can name: the taxonomy's plus the added ones."""
        prototypes = self.prototypes
        return self.taxonomy.num_classes if prototypes is None else prototypes.output_size(self.taxonomy.num_classes)

    def category_ids(self, labels: np.ndarray) -> np.ndarray:
        """Category ids of output labels, added categories included."""
        table = np.asarray(self.taxonomy.category_ids, dtype=np.int64)
        prototypes = self.prototypes
        if prototypes is not None:
            table = np.concatenate([table, np.full(self.num_outputs - len(table), -1, dtype=np.int64)])
            table[prototypes.labels] = [c["category_id"] for c in prototypes.categories]
        return table[np.asarray(labels, dtype=np.int64)]

    # -- calibration: the text model's own while it fuses the scores ------------------------------------------------
    def _fused_calibration(self) -> Any:
        text = getattr(self, "text_model", None)  # read in __init__ before the text model is loaded
        return text if text is not None and text.calibration is not None else None

    @property
    def calibration(self) -> ProductCalibration:
        """What `adjust` and `temper` apply: the text model's (chosen on val's fused scores) while one is in use,
        else evaluate's (chosen on val's picture scores). Assigning sets evaluate's."""
        fused = self._fused_calibration()
        return self._calibration if fused is None else fused.calibration

    @calibration.setter
    def calibration(self, value: ProductCalibration) -> None:
        self._calibration = value

    @property
    def accept_threshold(self) -> float | None:
        """The auto-accept threshold chosen on val with the calibration above (None: no product is auto-accepted)."""
        fused = self._fused_calibration()
        return self._accept_threshold if fused is None else fused.accept_threshold

    @accept_threshold.setter
    def accept_threshold(self, value: float | None) -> None:
        self._accept_threshold = value

    def adjust(self, product_log_probs: np.ndarray) -> np.ndarray:
        """The val-chosen logit adjustment; added categories' columns get no prior (a neutral 0 in log prior)."""
        extra = product_log_probs.shape[1] - self.taxonomy.num_classes
        if extra <= 0 or self.calibration.tau == 0.0:
            return self.calibration.adjust(product_log_probs)
        from prodcat.predict.calibration import adjust_logits

        prior = np.r_[np.asarray(self.calibration.prior_log, dtype=np.float64), np.zeros(extra)]
        return adjust_logits(product_log_probs, prior, self.calibration.tau)

    def image_log_probs(self, images: Sequence[torch.Tensor]) -> np.ndarray:
        return self.log_probs_from_features(self.image_features(images))

    # -- training twins --------------------------------------------------------------------------------------------
    @property
    def twins(self) -> TwinIndex | None:
        """Hashes of the train split's pictures -> their products' labels: RUN/twins.parquet, else the workdir's
        catalog (None without catalog/pictures.parquet); built on first use."""
        if self._twins is False:
            from prodcat.predict.twins import TwinIndex, load_twin_table

            self._twins = load_twin_table(self.run_dir)  # written with the twins choice: the run's own
            if self._twins is None:  # not chosen yet: the workdir's catalog, as long as it is there
                try:
                    self._twins = TwinIndex.from_workdir(self.extract_config.workdir, ("train",))
                except FileNotFoundError as error:  # no train catalog beside the run: no twins, say why once
                    log.info("no training twins: %s", error)
                    self._twins = None
        return self._twins  # type: ignore[return-value]

    @property
    def has_twins(self) -> bool:
        return self.twins is not None

    def _with_twins(
        self, product_log_probs: np.ndarray, hashes: Sequence[Sequence[bytes] | None]
    ) -> tuple[np.ndarray, list[TwinMatch | None]]:
        """Fold the twins' labels into product log-probabilities as chosen on val; the matches of each product."""
        from prodcat.predict.twins import TwinChoice, apply_twins, digest_words

        index = self.twins
        if index is None:
            return product_log_probs, [None] * len(hashes)
        choice = self.twin_choice or TwinChoice()
        digests = [list(product or []) for product in hashes]
        product_index = np.repeat(np.arange(len(digests)), [len(d) for d in digests])
        votes = index.votes(product_index, digest_words([d for product in digests for d in product]))
        matches = [index.match(digest_words(d), choice.name) if d else None for d in digests]
        return apply_twins(product_log_probs, votes, choice), matches

    # -- products ------------------------------------------------------------------------------------------------
    def scores(self, log_probs: np.ndarray, top_k: int) -> list[list[CategoryScore]]:
        top_k = min(top_k, log_probs.shape[1])
        order = np.argsort(-log_probs, axis=1)[:, :top_k]
        result = []
        for row, labels in enumerate(order):
            result.append([self._score(int(label), float(np.exp(log_probs[row, label]))) for label in labels])
        return result

    def _score(self, label: int, probability: float) -> CategoryScore:
        prototypes = self._prototypes
        added = [] if prototypes is None else [c for c in prototypes.categories if c["label"] == label]
        if added:
            level1, level2, level3 = added[0]["names"]
            return CategoryScore(label, int(added[0]["category_id"]), probability, level1, level2, level3)
        level1, level2, level3 = self.taxonomy.names(label)
        return CategoryScore(label, int(self.taxonomy.category_ids[label]), probability, level1, level2, level3)

    def predict_products(
        self,
        products: Sequence[Sequence[torch.Tensor]],
        top_k: int = 5,
        hashes: Sequence[Sequence[bytes] | None] | None = None,
    ) -> list[ProductPrediction]:
        """One batched forward for all images of all products; then per-product aggregation. `hashes`: the
        xxh3_128 digests of each product's raw photo bytes, to look up training twins."""
        images = [image for product in products for image in product]
        product_index = np.repeat(np.arange(len(products)), [len(product) for product in products])
        features = None
        if self.reads_products or self.prototypes is not None or self.text_model is not None:  # need the features
            features = self.image_features(images)
            image_log_probs = self.log_probs_from_features(features)
            product_log_probs = self.product_log_probs_from_features(
                features, product_index, len(products), log_probs=image_log_probs
            )
        else:
            image_log_probs = self.image_log_probs(images)
            product_log_probs = aggregate_products(image_log_probs, product_index, len(products), self.aggregation)
        words: list[list[list[str]]] | None = None
        if self.text_model is not None and features is not None and len(images):
            product_log_probs, words = self._with_text(images, features, product_index, product_log_probs)
        product_log_probs = self.adjust(product_log_probs)
        matches: list[TwinMatch | None] = [None] * len(products)
        if hashes is not None:
            product_log_probs, matches = self._with_twins(product_log_probs, hashes)
        product_log_probs = self.calibration.temper(product_log_probs)  # last: probabilities change, ranking not
        image_scores = self.scores(image_log_probs, top_k)
        predictions = []
        for index, top in enumerate(self.scores(product_log_probs, top_k)):
            accepted = self.accept_threshold is not None and top[0].probability >= self.accept_threshold
            per_image = [image_scores[i] for i in np.flatnonzero(product_index == index)]
            predictions.append(
                ProductPrediction(
                    top,
                    per_image,
                    bool(accepted),
                    self.accept_threshold,
                    self.aggregation,
                    matches[index],
                    None if words is None else words[index],
                )
            )
        return predictions

    def _with_text(
        self, images: Sequence[torch.Tensor], features: np.ndarray, product_index: np.ndarray, log_probs: np.ndarray
    ) -> tuple[np.ndarray, list[list[list[str]]]]:
        """OCR the text-likely pictures and fuse their words with the picture scores (prodcat.predict.text_model)."""
        read = self.text_model.read(images)
        words = [[read[i] for i in np.flatnonzero(product_index == p)] for p in range(len(log_probs))]
        counts = np.maximum(np.bincount(product_index, minlength=len(log_probs)), 1)[:, None]
        mean = _sum_by_product(features.reshape(len(images), -1), product_index, len(log_probs)) / counts
        texts = [" ".join(w for picture in product for w in picture) for product in words]
        return self.text_model.fuse(log_probs, mean, texts), words

    def predict_product(
        self, images: Sequence[torch.Tensor], top_k: int = 5, hashes: Sequence[bytes] | None = None
    ) -> ProductPrediction:
        return self.predict_products([images], top_k, None if hashes is None else [hashes])[0]


def _twin_choice(data: dict[str, Any] | None) -> TwinChoice | None:
    """The twins choice evaluate made on val (RUN/eval/twins.json), None before one was made."""
    if data is None:
        return None
    from prodcat.predict.twins import TwinChoice  # pyarrow and the picture tables: only where twins are used

    return TwinChoice.from_json(data)
