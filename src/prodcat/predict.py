"""The Predictor: load a run, classify images, products or whole BSON files.

It is the single path used by `prodcat evaluate`, `prodcat predict` (Kaggle submission) and the HTTP server, so
the three can never disagree: same backbone and weights as the feature store the head was trained on, same
preprocessing (carried by the backbone spec), same product aggregation (chosen on validation by evaluate).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from prodcat.config import ExtractConfig, TrainConfig, config_from_dict, load_config
from prodcat.data.taxonomy import Taxonomy
from prodcat.features.extract import stored_features
from prodcat.paths import WorkPaths
from prodcat.utils import atomic_write_text, get_logger, progress, read_json

if TYPE_CHECKING:
    from prodcat.twins import TwinChoice, TwinIndex, TwinMatch

__all__ = ["CategoryScore", "ProductPrediction", "Predictor", "aggregate_products", "predict_bson", "AGGREGATIONS"]

AGGREGATIONS = ("mean_prob", "mean_logprob", "vote")
log = get_logger("prodcat.predict")


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


def aggregate_products(log_probs: np.ndarray, product_index: np.ndarray, num_products: int, method: str) -> np.ndarray:
    """Combine image log-probabilities (N, C) into product log-probabilities (P, C).

    mean_prob: average of probabilities (3rd place on Kaggle); mean_logprob: normalised geometric mean;
    vote: share of images whose top-1 is each class, ties broken by mean probability.
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; choose one of {AGGREGATIONS}")
    product_index = np.asarray(product_index, dtype=np.int64)
    counts = np.maximum(np.bincount(product_index, minlength=num_products), 1).astype(np.float64)[:, None]
    if method == "mean_logprob":
        return _log_normalise(_sum_by_product(log_probs.astype(np.float64), product_index, num_products) / counts)
    mean = _sum_by_product(np.exp(log_probs.astype(np.float64)), product_index, num_products) / counts
    if method == "mean_prob":
        return np.log(np.clip(mean, 1e-30, None))
    votes = np.zeros_like(mean)
    np.add.at(votes, (product_index, log_probs.argmax(axis=1)), 1.0)  # N scalar adds: cheap
    # Votes dominate; the mean probability (< 1) only breaks ties. Still a distribution after renormalising.
    return _log_normalise(np.log(votes / counts + 1e-3 * mean + 1e-30))


def _sum_by_product(values: np.ndarray, product_index: np.ndarray, num_products: int) -> np.ndarray:
    """Row sums per product: one sort + np.add.reduceat (np.add.at over (N, C) rows is ~50x slower)."""
    out = np.zeros((num_products, values.shape[1]), dtype=values.dtype)
    if len(product_index) == 0:
        return out
    order = np.argsort(product_index, kind="stable")
    sorted_index = product_index[order]
    starts = np.flatnonzero(np.r_[True, sorted_index[1:] != sorted_index[:-1]])
    out[sorted_index[starts]] = np.add.reduceat(values[order], starts, axis=0)
    return out


def _log_normalise(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(axis=1, keepdims=True)
    return scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))


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
    ) -> None:
        self.model = model.eval()
        self.taxonomy = taxonomy
        self.extract_config = extract_config
        self.meta = meta
        self.run_dir = Path(run_dir)
        self.device = device or torch.device("cpu")
        self._backbone: tuple[Any, Any, Any] | None = None
        evaluation = self.run_dir / "eval" / "metrics.json"
        metrics = read_json(evaluation) if evaluation.is_file() else {}
        self.aggregation: str = metrics.get("product", {}).get("aggregation", "mean_prob")
        self.store_name = store_name or extract_config.store_name  # the feature store the head was trained on
        self.accept_threshold: float | None = metrics.get("confidence", {}).get("threshold")
        from prodcat.calibration import load_calibration

        # Logit adjustment (tau) and temperature (T) chosen on val; the threshold above is on calibrated probabilities.
        self.calibration = load_calibration(self.run_dir, metrics)
        from prodcat.twins import load_twin_choice

        self.twin_choice: TwinChoice | None = load_twin_choice(self.run_dir)  # None: not chosen on val yet
        self._twins: TwinIndex | None | bool = False  # False: not built yet

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device | None = None, which: str = "best") -> Predictor:
        from prodcat.checkpoint import load_checkpoint

        run_dir = Path(run_dir)
        model, meta = load_checkpoint(run_dir, which=which)
        train_config = (
            config_from_dict(TrainConfig, meta["config"])
            if "config" in meta
            else load_config(TrainConfig, run_dir / "config.json")
        )
        paths = WorkPaths(train_config.workdir)
        store_config = paths.feature_store(train_config.features) / "config.json"
        extract_config = load_config(ExtractConfig, store_config)
        taxonomy = Taxonomy.load(paths.taxonomy)
        target = torch.device(device) if device is not None else torch.device("cpu")
        return cls(model.to(target), taxonomy, extract_config, meta, run_dir, target, store_name=train_config.features)

    # -- features ------------------------------------------------------------------------------------------------
    def _feature_path(self) -> tuple[Any, Any, Any]:
        """Backbone, preprocessor and runner, built on first use (evaluate on cached features never needs them)."""
        if self._backbone is None:
            from prodcat.features.backbones import Preprocessor, create_backbone
            from prodcat.features.inference import InferenceRunner

            config = self.extract_config
            backbone = create_backbone(config.backbone, weights=config.weights, random_init=config.random_init)
            runner = InferenceRunner(backbone, precision=config.precision, device=self.device)
            self._backbone = (backbone, Preprocessor(backbone.spec), runner)
        return self._backbone

    def image_features(self, images: Sequence[torch.Tensor], batch_size: int = 64) -> np.ndarray:
        """Backbone features of decoded uint8 (3, H, W) images, exactly as extraction stores them."""
        _, preprocess, runner = self._feature_path()
        spatial = self.extract_config.features == "spatial"
        chunks = []
        for start in range(0, len(images), batch_size):
            # uint8 batch, normalised on the runner's device: the same path as extraction, so features match.
            batch = preprocess.pack(list(images[start : start + batch_size]))
            # The store's TTA too (its config.json; "none" before TTA existed): served rows equal stored ones.
            out = runner(batch, spatial=spatial, tta=self.extract_config.tta)
            # Exactly what the store keeps (channels, float16 rounding), so served and evaluated scores match.
            stored = stored_features(out, self.extract_config.features, self.extract_config.spatial_channels)
            chunks.append(torch.from_numpy(stored).to(torch.float32).numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)

    @torch.inference_mode()
    def log_probs_from_features(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Full-softmax log-probabilities (N, C) of cached features."""
        out = []
        for start in range(0, len(features), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(features[start : start + batch_size], dtype=np.float32))
            out.append(self.model(batch.to(self.device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.taxonomy.num_classes), np.float32)

    def image_log_probs(self, images: Sequence[torch.Tensor]) -> np.ndarray:
        return self.log_probs_from_features(self.image_features(images))

    # -- training twins --------------------------------------------------------------------------------------------
    @property
    def twins(self) -> TwinIndex | None:
        """Hashes of the train split's pictures -> their products' labels (None without catalog/pictures.parquet);
        built on first use."""
        if self._twins is False:
            from prodcat.twins import TwinIndex

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
        from prodcat.twins import TwinChoice, apply_twins, digest_words

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
        image_log_probs = self.image_log_probs(images)
        product_log_probs = aggregate_products(image_log_probs, product_index, len(products), self.aggregation)
        product_log_probs = self.calibration.adjust(product_log_probs)
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
                    top, per_image, bool(accepted), self.accept_threshold, self.aggregation, matches[index]
                )
            )
        return predictions

    def predict_product(
        self, images: Sequence[torch.Tensor], top_k: int = 5, hashes: Sequence[bytes] | None = None
    ) -> ProductPrediction:
        return self.predict_products([images], top_k, None if hashes is None else [hashes])[0]


_Batch = tuple[np.ndarray, list[list[Any]], list[list[bytes]], int]


def _submission_rows(bson_path: Path) -> Any:
    """The products of a test file that get a submission row: every document whose `_id` is readable (damaged
    ones too: they get the fallback category), in file order, one per `_id` (Kaggle scores one row per test `_id`;
    the first document with an id wins, each repeat is logged). Returns the index restricted to those rows."""
    from prodcat.data.bson_index import index_bson

    index = index_bson(bson_path, keep_damaged=True)
    for problem in index.problems:
        outcome = "no row: its _id is unreadable" if problem.product_id is None else "the product keeps its row"
        log.warning("%s (%s)", problem, outcome)
    _, first = np.unique(index.product_id, return_index=True)
    keep = np.zeros(len(index), dtype=bool)
    keep[first] = True
    for row in np.flatnonzero(~keep):
        log.warning("%s at byte %d: duplicate _id %d; the submission keeps the first document's row",
                    bson_path, int(index.offset[row]), int(index.product_id[row]))  # fmt: skip
    if not keep.all():
        for column in ("product_id", "offset", "length", "num_images", "category_id"):
            setattr(index, column, getattr(index, column)[keep])
    return index


def _iter_product_batches(bson_path: Path, batch_size: int, index: Any = None) -> Iterator[_Batch]:
    """(product ids, decoded images per product, picture digests per product, failed images) in file order, about
    batch_size images at a time; `index`: the rows to read (default: `_submission_rows`)."""
    from prodcat.data.bson_index import BsonReader
    from prodcat.data.images import decode_image
    from prodcat.features.extract import picture_digest

    index = _submission_rows(bson_path) if index is None else index
    with BsonReader(bson_path) as reader:
        ids, products, digests, count, failed = [], [], [], 0, 0
        for product_id, offset, length in zip(index.product_id, index.offset, index.length, strict=True):
            decoded = []
            try:
                pictures = reader.pictures(int(offset), int(length))
            except Exception as error:  # noqa: BLE001 - damage inside the document: the product still gets a row
                log.warning("product %d: %s", int(product_id), error)
                pictures = []
            for picture in pictures:
                try:
                    decoded.append(decode_image(picture))
                except Exception:  # noqa: BLE001 - any undecodable picture is skipped and counted
                    failed += 1
            ids.append(int(product_id))
            products.append(decoded)
            digests.append([picture_digest(picture) for picture in pictures])
            count += len(decoded)
            if count >= batch_size:
                yield np.asarray(ids), products, digests, failed
                ids, products, digests, count, failed = [], [], [], 0, 0
        if ids:
            yield np.asarray(ids), products, digests, failed


def predict_bson(run_dir: str | Path, bson_path: str | Path, out: str | Path, batch_size: int = 64) -> dict:
    """Kaggle submission `_id,category_id`: one row per readable `_id` of the file, in file order (a repeated
    `_id` keeps its first document's row; see `_submission_rows`).

    A product whose images all fail to decode, or whose document is damaged past its `_id`, gets the most frequent
    training category (label 0).
    """
    predictor = Predictor.load(run_dir)
    _ensure_twin_choice(predictor)
    fallback_category = int(predictor.taxonomy.category_ids[0])
    index = _submission_rows(Path(bson_path))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["_id", "category_id"])
    from_store = _from_store(predictor, Path(bson_path), index.product_id)
    if from_store is not None:
        cached, twin_products = from_store
        for product_id, category in zip(index.product_id, cached, strict=True):
            writer.writerow([int(product_id), int(category) if category >= 0 else fallback_category])
        atomic_write_text(out, buffer.getvalue())
        fallback = int(np.sum(cached < 0))
        _warn_fallback(fallback, fallback_category)
        return {
            "products": len(cached),
            "fallback_products": fallback,
            "failed_images": None,
            "source": "store",
            **_twin_summary(predictor, twin_products),
        }
    summary = {"products": 0, "fallback_products": 0, "failed_images": 0, "source": "backbone"}
    twin_products = 0
    bar = progress(total=len(index), desc="predict", unit="product")
    for ids, products, digests, failed in _iter_product_batches(Path(bson_path), batch_size, index):
        with_images = [i for i, product in enumerate(products) if product]
        categories = np.full(len(ids), fallback_category, dtype=np.int64)
        if with_images:
            predictions = predictor.predict_products(
                [products[i] for i in with_images], top_k=1, hashes=[digests[i] for i in with_images]
            )
            categories[with_images] = [p.top[0].category_id for p in predictions]
            twin_products += sum(p.training_matches is not None for p in predictions)
        for product_id, category in zip(ids, categories, strict=True):
            writer.writerow([int(product_id), int(category)])
        summary["products"] += len(ids)
        summary["fallback_products"] += len(ids) - len(with_images)
        summary["failed_images"] += failed
        bar.update(len(ids))
    bar.close()
    atomic_write_text(out, buffer.getvalue())
    _warn_fallback(summary["fallback_products"], fallback_category)
    return {**summary, **_twin_summary(predictor, twin_products)}


def _ensure_twin_choice(predictor: Predictor) -> None:
    """With twins but no choice yet (evaluate has not run), make it on val now, as evaluate would."""
    if predictor.twin_choice is not None or not predictor.has_twins:
        return
    from prodcat.twins import TwinChoice, choose_twins, load_twin_choice

    try:
        chosen = choose_twins(predictor, "val")
        predictor.twin_choice = load_twin_choice(predictor.run_dir)
        log.info("twins: chose %s on val (%d of %d products matched)", chosen["name"], chosen["matched_products"],
                 chosen["products"])  # fmt: skip
    except (ValueError, FileNotFoundError) as error:  # no val split in the store: report twins, change nothing
        log.info("twins: no val choice possible (%s); predictions ignore them", error)
        predictor.twin_choice = TwinChoice()


def _twin_summary(predictor: Predictor, matched_products: int) -> dict[str, Any]:
    choice = predictor.twin_choice
    return {"twin_matched_products": int(matched_products), "twins": choice.name if choice else "none"}


def _warn_fallback(count: int, category: int) -> None:
    if count:
        log.warning("%d products had no decodable image and got the most frequent category %d", count, category)


def _from_store(predictor: Predictor, bson_path: Path, product_ids: np.ndarray) -> tuple[np.ndarray, int] | None:
    """Category per product from the run's feature store when it already holds every product of this file, and
    how many products had training twins.

    Returns -1 for products whose images were all masked as undecodable; None when the store cannot serve.
    """
    from prodcat.data.catalog import catalog_source
    from prodcat.features.store import FeatureStore

    workdir = Path(predictor.extract_config.workdir)
    try:
        if catalog_source(workdir, "test").resolve() != bson_path.resolve():
            return None
        store = FeatureStore.open(WorkPaths(workdir).feature_store(predictor.store_name))
    except Exception:  # noqa: BLE001 - no test catalog / store: compute features with the backbone instead
        return None
    rows = store.split_indices("test", valid_only=False)
    stored_ids = store.column("product_id")[rows]
    if not np.array_equal(np.unique(stored_ids), np.unique(product_ids)):
        return None
    valid = rows[store.column("valid")[rows]]
    log_probs = predictor.log_probs_from_features(store.read(valid))
    ids, product_index = np.unique(store.column("product_id")[valid], return_inverse=True)
    product_log_probs = aggregate_products(log_probs, product_index, len(ids), predictor.aggregation)
    product_log_probs = predictor.calibration.adjust(product_log_probs)  # top-1 only: temperature cannot change it
    product_log_probs, twin_products = _store_twins(predictor, store, valid, product_index, product_log_probs)
    best = dict(
        zip(ids.tolist(), predictor.taxonomy.category_ids[product_log_probs.argmax(axis=1)].tolist(), strict=True)
    )
    return np.array([best.get(int(pid), -1) for pid in product_ids], dtype=np.int64), twin_products


def _store_twins(
    predictor: Predictor, store: Any, rows: np.ndarray, product_index: np.ndarray, product_log_probs: np.ndarray
) -> tuple[np.ndarray, int]:
    """Twin evidence for stored test rows, their hashes read from catalog/pictures.parquet."""
    from prodcat.twins import TwinChoice, apply_twins, row_words

    index = predictor.twins
    if index is None:
        return product_log_probs, 0
    words, found = row_words(predictor.extract_config.workdir, store, rows)
    votes = index.votes(product_index[found], words[found])
    choice = predictor.twin_choice or TwinChoice()
    return apply_twins(product_log_probs, votes, choice), int(len(np.unique(votes.product)))
