"""Kaggle submission: every product of a test BSON file through the one Predictor, one CSV row per `_id`."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prodcat.config import PredictConfig
from prodcat.paths import WorkPaths
from prodcat.utils import atomic_write_text, get_logger, progress

if TYPE_CHECKING:
    pass

from prodcat.predict.predictor import Predictor

__all__ = ["predict_bson"]

log = get_logger("prodcat.predict.submission")


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


def predict_bson(
    run_dir: str | Path, bson_path: str | Path, out: str | Path, batch_size: int = PredictConfig.batch_size
) -> dict:
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
    from prodcat.predict.twins import TwinChoice, choose_twins, load_twin_choice

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
    features = store.read(valid)
    ids, product_index = np.unique(store.column("product_id")[valid], return_inverse=True)
    product_log_probs = predictor.product_log_probs_from_features(features, product_index, len(ids))
    if predictor.text_model is not None:  # the words `prodcat ocr` read on these test pictures
        from prodcat.predict.text_model import fuse_stored

        product_log_probs = fuse_stored(predictor, ids, product_index, features, product_log_probs)
    product_log_probs = predictor.adjust(product_log_probs)  # top-1 only: temperature cannot change it
    product_log_probs, twin_products = _store_twins(predictor, store, valid, product_index, product_log_probs)
    best = dict(zip(ids.tolist(), predictor.category_ids(product_log_probs.argmax(axis=1)).tolist(), strict=True))
    return np.array([best.get(int(pid), -1) for pid in product_ids], dtype=np.int64), twin_products


def _store_twins(
    predictor: Predictor, store: Any, rows: np.ndarray, product_index: np.ndarray, product_log_probs: np.ndarray
) -> tuple[np.ndarray, int]:
    """Twin evidence for stored test rows, their hashes read from catalog/pictures.parquet."""
    from prodcat.predict.twins import TwinChoice, apply_twins, row_words

    index = predictor.twins
    if index is None:
        return product_log_probs, 0
    words, found = row_words(predictor.extract_config.workdir, store, rows)
    votes = index.votes(product_index[found], words[found])
    choice = predictor.twin_choice or TwinChoice()
    return apply_twins(product_log_probs, votes, choice), int(len(np.unique(votes.product)))
