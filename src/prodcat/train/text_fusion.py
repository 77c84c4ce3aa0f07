"""Words read on a product's covers, fused with its picture features: two ways, both trained here, one kept.

- `late`: a text head (linear over the hashed text vector) beside the run's picture head; the product's
  log-probabilities are picture + w * text (products with no words read keep the picture's), w chosen on val.
- `concat`: one linear product head over [standardised mean picture features ; hashed text vector] (a product-level
  input), trained here on the train split's products.

`prodcat text-head --run R` trains both with the run's seed and AdamW, picks the better on val (`--fusion auto`),
and saves it into R/text/ in the checkpoint format of prodcat runs (safetensors + JSON sidecar with sha256, no
pickle); R/text/fusion.json holds val and holdout numbers of picture-only, late, concat and a picture-only product
head (the concat head without text: the comparison that changes one thing). The kept model's fused scores get
their own calibration (tau, T, auto-accept threshold) chosen on val (`prodcat.train.text_calibration`), stored in
its sidecar, with ECE before / after on holdout in fusion.json. The Predictor loads R/text/ when it is there
(`load_text_model`), applies that calibration, and reads the words on the pictures itself (text-likely ones,
Tesseract).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prodcat.config import ConfigError, FusionConfig  # FusionConfig re-exported for its users
from prodcat.ocr.text_features import TextFeatureConfig
from prodcat.predict.text_model import (  # the prediction side, re-exported for the trainer's users
    TEXT_DIR,
    FusedLinear,
    ProductSet,
    TextModel,
    _forward,
    _inputs,
    head_log_probs,
    late_fuse,
    load_text_model,
    read_texts,
)
from prodcat.utils import get_logger, write_json

__all__ = [
    "FusionConfig",
    "ProductSet",
    "FusedLinear",
    "TextModel",
    "TEXT_DIR",
    "product_set",
    "fit_head",
    "choose_late_weight",
    "train_text_model",
    "load_text_model",
    "text_leaf_mask",
]

log = get_logger("prodcat.train.text_fusion")


# -- data ------------------------------------------------------------------------------------------------------------
def _split_products(store: Any, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(store rows sorted by product, product index of each row, product ids, product labels)."""
    rows = store.split_indices(split)
    if not len(rows):
        raise ConfigError(f"{store.path}: no valid {split!r} pictures in the feature store")
    product = store.column("product_id")[rows]
    order = np.argsort(product, kind="stable")
    rows, product = rows[order], product[order]
    ids, index = np.unique(product, return_inverse=True)
    labels = np.zeros(len(ids), dtype=np.int64)
    labels[index] = store.column("label")[rows]
    return rows, index, ids, labels


def product_set(predictor: Any, split: str, texts: dict[int, str]) -> ProductSet:
    """The products of `split` from the run's feature store, with the words of `texts` (product -> text)."""
    from prodcat.features.store import FeatureStore
    from prodcat.paths import WorkPaths
    from prodcat.predict.aggregation import aggregate_products
    from prodcat.predict.aggregation import sum_by_product as _sum_by_product

    store = FeatureStore.open(WorkPaths(predictor.extract_config.workdir).feature_store(predictor.store_name))
    rows, index, ids, labels = _split_products(store, split)
    features = store.read(rows).reshape(len(rows), -1)
    log_probs = predictor.log_probs_from_features(store.read(rows))
    counts = np.maximum(np.bincount(index, minlength=len(ids)), 1)[:, None]
    return ProductSet(
        product_id=ids,
        label=labels,
        picture_log_probs=aggregate_products(log_probs, index, len(ids), predictor.aggregation),
        picture_mean=(_sum_by_product(features, index, len(ids)) / counts).astype(np.float32),
        texts=[texts.get(int(pid), "") for pid in ids],
    )


# -- training --------------------------------------------------------------------------------------------------------


def fit_head(
    train: ProductSet, val: ProductSet, config: FusionConfig, picture: bool, text: bool, seed: int
) -> tuple[FusedLinear, dict[str, Any]]:
    """Train a FusedLinear on `train` products with AdamW; keep the epoch with the best val product top-1."""
    text_config = TextFeatureConfig(n_features=config.n_features, min_confidence=config.min_confidence)
    tc = text_config if text else None
    train_picture, train_text = _inputs(train, tc, picture)
    val_picture, val_text = _inputs(val, tc, picture)
    torch.manual_seed(seed)
    model = FusedLinear(train.picture_mean.shape[1] if picture else 0, config.n_features if text else 0,
                        train.picture_log_probs.shape[1])  # fmt: skip
    if picture:
        model.mean.copy_(train_picture.mean(0))
        model.scale.copy_(train_picture.std(0).clamp_min(1e-3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    labels = torch.from_numpy(train.label)
    generator = np.random.default_rng(seed)
    best, best_state, best_epoch = -1.0, None, 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = generator.permutation(len(train.label))
        for start in range(0, len(order), config.batch_size):
            rows = order[start : start + config.batch_size]
            loss = nn.functional.nll_loss(_forward(model, train_picture, train_text, rows), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            top1 = float((_forward(model, val_picture, val_text, np.arange(len(val.label))).argmax(1).numpy()
                          == val.label).mean())  # fmt: skip
        if top1 > best:
            best, best_epoch = top1, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval(), {"val_top1": best, "epoch": best_epoch, "epochs": config.epochs}


def choose_late_weight(
    picture: np.ndarray, text: np.ndarray, has_text: np.ndarray, label: np.ndarray, weights: Sequence[float]
) -> tuple[float, dict[str, float]]:
    """The weight with the best product top-1 on these (val) products; ties go to the smaller weight."""
    scores = {float(w): float((late_fuse(picture, text, has_text, w).argmax(1) == label).mean()) for w in weights}
    best = max(scores.values())
    return min(w for w, s in scores.items() if s == best), scores


# -- measuring -------------------------------------------------------------------------------------------------------
def text_leaf_mask(taxonomy: Any) -> np.ndarray:
    """(C,) True for leaves of the text-heavy departments (books, music, films, games; the real names)."""
    from prodcat.data.synthetic.covers import TEXT_DEPARTMENTS

    return np.array([taxonomy.names(label)[0] in TEXT_DEPARTMENTS for label in range(taxonomy.num_classes)])


def _top1(log_probs: np.ndarray, data: ProductSet, text_leaves: np.ndarray) -> dict[str, Any]:
    from prodcat.evaluate.evaluation import proportion_ci

    hit = log_probs.argmax(1) == data.label
    on_text = text_leaves[data.label]
    block: dict[str, Any] = {}
    for name, mask in (("all", np.ones(len(hit), bool)), ("text_leaves", on_text), ("with_words", data.has_text)):
        n, right = int(mask.sum()), int(hit[mask].sum())
        block[name] = {"top1": right / n if n else None, "top1_ci95": proportion_ci(right, n) if n else None, "n": n}
    return block


# -- the whole fit ---------------------------------------------------------------------------------------------------
def _fit_all(predictor: Any, config: FusionConfig, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train late (text head) and concat heads and the picture-only product head; numbers on val and holdout."""
    texts = read_texts(predictor.extract_config.workdir, config.min_confidence)
    sets = {split: product_set(predictor, split, texts) for split in ("train", "val", "holdout")}
    text_config = TextFeatureConfig(n_features=config.n_features, min_confidence=config.min_confidence)
    train_with_text = _subset(sets["train"], sets["train"].has_text)
    val_with_text = _subset(sets["val"], sets["val"].has_text)
    if not len(train_with_text.label) or not len(val_with_text.label):
        raise ConfigError("no train or val product has words read: run `prodcat ocr` on train and val first")
    text_head, text_fit = fit_head(train_with_text, val_with_text, config, picture=False, text=True, seed=seed)
    concat, concat_fit = fit_head(sets["train"], sets["val"], config, picture=True, text=True, seed=seed)
    picture_head, picture_fit = fit_head(sets["train"], sets["val"], config, picture=True, text=False, seed=seed)
    val = sets["val"]
    weight, weight_scores = choose_late_weight(val.picture_log_probs, head_log_probs(text_head, val, text_config),
                                               val.has_text, val.label, config.late_weights)  # fmt: skip
    leaves = text_leaf_mask(predictor.taxonomy)
    metrics: dict[str, Any] = {}
    scores: dict[str, dict[str, np.ndarray]] = {}
    for split in ("val", "holdout"):
        data = sets[split]
        scores[split] = fused = {
            "late": late_fuse(data.picture_log_probs, head_log_probs(text_head, data, text_config), data.has_text,
                              weight),
            "concat": head_log_probs(concat, data, text_config),
        }  # fmt: skip
        metrics[split] = {
            "picture": _top1(data.picture_log_probs, data, leaves),
            **{kind: _top1(log_probs, data, leaves) for kind, log_probs in fused.items()},
            "picture_product_head": _top1(head_log_probs(picture_head, data, text_config), data, leaves),
            "products_with_words": int(data.has_text.sum()),
        }
    fits = {"text_head": text_fit, "concat": concat_fit, "picture_product_head": picture_fit,
            "late_weight": weight, "late_weight_val_top1": weight_scores}  # fmt: skip
    return {"late": text_head, "concat": concat}, {
        "metrics": metrics,
        "fits": fits,
        "sets": sets,
        "fused": scores,
    }


def _examples(data: ProductSet, picture: np.ndarray, fused: np.ndarray, count: int = 9) -> list[dict[str, Any]]:
    """Holdout products with words read for the report: those the text changed first, then a few others."""
    before, after = picture.argmax(1), fused.argmax(1)
    with_words = np.flatnonzero(data.has_text)
    changed = with_words[before[with_words] != after[with_words]]
    same = with_words[before[with_words] == after[with_words]]
    chosen = np.concatenate([changed[: count - min(3, len(same))], same[:3]])[:count]
    return [
        {"product_id": int(data.product_id[i]), "label": int(data.label[i]), "words": data.texts[i],
         "picture_top": int(before[i]), "fused_top": int(after[i])}
        for i in chosen
    ]  # fmt: skip


def _subset(data: ProductSet, mask: np.ndarray) -> ProductSet:
    where = np.flatnonzero(mask)
    return ProductSet(data.product_id[where], data.label[where], data.picture_log_probs[where],
                      data.picture_mean[where], [data.texts[i] for i in where])  # fmt: skip


def train_text_model(config: FusionConfig) -> dict[str, Any]:
    """Fit both fusions beside the run, keep the better on val (or the one asked for) in R/text/; the summary."""
    from prodcat.predict.predictor import Predictor

    run_dir = Path(config.run)
    target = run_dir / TEXT_DIR
    if target.exists() and not config.overwrite:
        raise ConfigError(f"{target} exists: pass --overwrite to train the text model again")
    predictor = Predictor.load(run_dir)
    predictor.text_model = None  # the picture head alone
    seed = config.seed if config.seed is not None else int(predictor.meta.get("config", {}).get("seed", 0))
    models, found = _fit_all(predictor, config, seed)
    val = found["metrics"]["val"]
    kind = config.fusion
    if kind == "auto":  # selection on val; holdout numbers only reported
        kind = "concat" if val["concat"]["all"]["top1"] > val["late"]["all"]["top1"] else "late"
    sets, fused = found["sets"], found["fused"]
    sidecar, calibration = _calibrate(predictor, run_dir, sets, {split: fused[split][kind] for split in fused})
    holdout = sets["holdout"]
    summary = {"run": str(run_dir), "seed": seed, "kept": kind, "chosen_on": "val", **found["fits"],
               **found["metrics"], "calibration": calibration, "config": dataclasses.asdict(config),
               "examples": _examples(holdout, holdout.picture_log_probs, fused["holdout"][kind])}  # fmt: skip
    _save(target, models[kind], kind, found["fits"]["late_weight"], config, predictor, seed, sidecar)
    write_json(target / "fusion.json", summary)
    log.info("text model (%s, chosen on val) -> %s", kind, target)
    return summary


def _calibrate(
    predictor: Any, run_dir: Path, sets: dict[str, ProductSet], scores: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """tau, T and the threshold of the kept fusion's scores, chosen on val; their effect on holdout. Returns the
    sidecar block (what the Predictor applies) and the summary block (fusion.json)."""
    from prodcat.train import text_calibration

    settings, settings_from = text_calibration.eval_settings(run_dir)
    counts = text_calibration.train_prior_counts(predictor)
    calibration, chosen = text_calibration.fit_fused_calibration(scores["val"], sets["val"].label, counts, settings)
    picture = (predictor.calibration, predictor.accept_threshold)  # evaluate's: the text model is off here
    source = ("evaluate's, fitted on val picture scores" if (run_dir / "eval" / "metrics.json").is_file()
              else "none: the run was not evaluated")  # fmt: skip
    fused = (calibration, chosen["confidence"]["threshold"])
    held = text_calibration.holdout_calibration(scores["holdout"], sets["holdout"].label, picture, fused,
                                                settings.bootstrap_resamples, picture_source=source)  # fmt: skip
    threshold = "none reaches the target" if fused[1] is None else f"{fused[1]:.4f}"
    log.info("fused scores calibrated on val (n=%d): tau %g, T %.3f, auto-accept threshold %s; holdout (n=%d) ECE "
             "%.4f with the picture calibration (%s) -> %.4f with this one", chosen["n"], calibration.tau,
             calibration.temperature, threshold, held["n"], held["before"]["ece"], source,
             held["after"]["ece"])  # fmt: skip
    summary = {**chosen, "settings": settings_from, "holdout": held}
    return text_calibration.sidecar_block(calibration, chosen, counts), summary


def _save(target: Path, model: FusedLinear, kind: str, weight: float, config: FusionConfig, predictor: Any,
          seed: int, calibration: dict[str, Any]) -> None:  # fmt: skip
    from prodcat.checkpoint import save_checkpoint

    meta = {
        "step": 0, "config": dataclasses.asdict(config), "kind": kind, "late_weight": weight, "seed": seed,
        "in_shape": [model.picture_dim, model.n_features], "num_classes": int(predictor.taxonomy.num_classes),
        "taxonomy": "../taxonomy.parquet",  # the picture run's copy: one taxonomy for both heads
        "text_features": dataclasses.asdict(TextFeatureConfig(config.n_features, min_confidence=config.min_confidence)),
        "calibration": calibration,  # chosen on val's fused scores: the Predictor applies it with this model
    }  # fmt: skip
    save_checkpoint(target, "best", model, None, meta)


# -- loading and predicting -----------------------------------------------------------------------------------------
