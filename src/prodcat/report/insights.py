"""What the report says about the best run: the headline box, per-category precision / recall, the reliability
diagram and pictures of the most confused category pairs. All from the run's `eval/metrics.json` and
`eval/predictions.parquet` (one row per product of the reported split, the holdout unless marked otherwise).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from prodcat.errors import UserError
from prodcat.paths import WorkPaths
from prodcat.predict.run import Run, load_run
from prodcat.report.markup import cards, esc, figure, interval, num, pct, table
from prodcat.utils import get_logger

__all__ = [
    "BestRun",
    "open_run",
    "run_part",
    "headline_box",
    "majority_baseline",
    "per_category_table",
    "reliability_section",
    "confused_pairs",
    "MAX_CATEGORY_ROWS",
    "CONFUSED_PAIRS_SHOWN",
]

MAX_CATEGORY_ROWS = 1000  # of 5,270 leaves: the largest by support; the page stays a few MB
CONFUSED_PAIRS_SHOWN = 6
EXAMPLES_PER_SIDE = 3
log = get_logger("prodcat.report")


def open_run(path: Path) -> Run | None:
    """The run folder (prodcat.predict.run, as predict and serve read it), None when it is not a readable run."""
    try:
        return load_run(path)
    except UserError as error:
        log.warning("report: %s", error)
        return None


def run_part(run: Run | None, name: str) -> Any | None:
    """`run.<name>` (train_config, metrics, taxonomy, ...), None when it cannot be read: the page then says what is
    missing instead of failing."""
    if run is None:
        return None
    try:
        return getattr(run, name)
    except UserError as error:
        log.warning("report: %s", error)
        return None


@dataclasses.dataclass
class BestRun:
    """The run chosen on val, its metrics, and (when present) its product predictions and taxonomy."""

    run: Path
    metrics: dict[str, Any]
    predictions: Any | None = None  # pandas DataFrame of eval/predictions.parquet
    taxonomy: Any | None = None

    @classmethod
    def load(cls, run: Path, metrics: dict[str, Any]) -> BestRun:
        import pyarrow.parquet as pq

        best = cls(run, metrics)
        table_path = run / "eval" / "predictions.parquet"
        try:
            if table_path.is_file():
                best.predictions = pq.read_table(table_path).to_pandas()
        except (OSError, ValueError) as error:
            log.warning("report: %s: %s", run, error)
        best.taxonomy = run_part(open_run(run), "taxonomy")  # the run's copy (the workdir's for older runs)
        return best

    @property
    def split(self) -> str:
        return str(self.metrics.get("split", "?"))


def majority_baseline(best: BestRun) -> float | None:
    """Accuracy of always answering the most frequent training leaf, on the reported split."""
    if best.predictions is None or best.taxonomy is None or not best.taxonomy.train_counts.any():
        return None
    majority = int(np.argmax(best.taxonomy.train_counts))
    return float((best.predictions["label"].to_numpy() == majority).mean())


def _threshold(value: float) -> str:
    return f"{value:.3g}"


def auto_accept_sentence(metrics: dict[str, Any]) -> str:
    """ "Products whose top probability is >= 0.95 are 95% correct: 54% of products; the rest go to a person"."""
    confidence, split = metrics.get("confidence", {}), esc(metrics.get("split", "?"))
    if confidence.get("threshold") is None:
        return f"Auto-accept: {esc(confidence.get('note') or 'no threshold reaches the target accuracy')}."
    threshold = _threshold(confidence["threshold"])
    chosen = (
        f" (threshold chosen on {esc(confidence['chosen_on'])} as the lowest reaching "
        f"{pct(confidence.get('target_accuracy'), 0)} there)"
        if confidence.get("chosen_on")
        else ""
    )
    if confidence.get("accuracy") is None:
        return f"Auto-accept at top probability ≥ {threshold}: no {split} product reaches it{chosen}."
    return (
        f"Products whose top probability is ≥ <b>{threshold}</b> are <b>{pct(confidence['accuracy'])}</b> correct "
        f"{interval(confidence.get('accuracy_ci95'))} on {split}: <b>{pct(confidence.get('coverage'), 0)}</b> of "
        f"products (n = {num(confidence.get('accepted'))}); the rest go to a person{chosen}."
    )


def _run_text(run: Path, metrics: dict[str, Any]) -> str:
    found = open_run(run)
    config = dataclasses.asdict(found.train_config) if found is not None else {}
    parts = [f"{metrics.get('head', config.get('head', '?'))} head", str(metrics.get("loss", config.get("loss", "?")))]
    if config.get("optimizer"):
        parts.append(str(config["optimizer"]))
    return ", ".join(parts)


def headline_box(best: BestRun | None, synthetic_note: str | None) -> str:
    """The answer first: best run, holdout product and picture top-1 with n and interval, macro, baseline."""
    if best is None:
        return ""
    metrics = best.metrics
    product, image, split = metrics["product"], metrics["image"], esc(best.split)
    optimistic = "" if best.split == "holdout" else " <b>(optimistic: not the holdout)</b>"
    items = [
        (
            f"product top-1 on {best.split}",
            f"{pct(product.get('top1'))}<small>{interval(product.get('top1_ci95'))} · "
            f"n = {num(product.get('n', metrics.get('products')))} products</small>",
        ),
        (
            f"picture top-1 on {best.split}",
            f"{pct(image.get('top1'))}<small>{interval(image.get('top1_ci95'))} · "
            f"n = {num(image.get('n', metrics.get('images')))} pictures</small>",
        ),
        (
            "product macro accuracy (mean over leaves)",
            f"{pct(product.get('macro'))}<small>{interval(product.get('macro_ci95'))}</small>",
        ),
        (
            "majority-class baseline (most frequent train leaf)",
            f"{pct(majority_baseline(best))}<small>on {split}</small>",
        ),
    ]
    synthetic = f'<p class="synthetic">{esc(synthetic_note)}</p>' if synthetic_note else ""
    return (
        '<div class="headline" id="headline-box">'
        f'<p class="answer">Best run <b>{esc(best.run.name)}</b> ({esc(_run_text(best.run, metrics))}), chosen by '
        f"product top-1 on val; numbers on <b>{split}</b>{optimistic}, 95% intervals over products [lo, hi].</p>"
        f'{cards(items)}<p class="accept">{auto_accept_sentence(metrics)}</p>{synthetic}'
        f'<p class="protocol">{esc(metrics.get("protocol", ""))}</p></div>'
    )


def per_category_table(best: BestRun) -> str:
    """Precision, recall and support per leaf on the reported split, sortable; the largest leaves when many."""
    frame, taxonomy = best.predictions, best.taxonomy
    if frame is None or taxonomy is None:
        return ""
    label, predicted = frame["label"].to_numpy(), frame["top1_label"].to_numpy()
    size = taxonomy.num_classes
    support = np.bincount(label, minlength=size)
    predicted_count = np.bincount(predicted[predicted >= 0], minlength=size)
    hits = np.bincount(label[label == predicted], minlength=size)
    shown = np.flatnonzero(support > 0)
    shown = shown[np.argsort(-support[shown], kind="stable")][:MAX_CATEGORY_ROWS]
    rows = []
    for leaf in shown.tolist():
        recall = hits[leaf] / support[leaf]
        precision = hits[leaf] / predicted_count[leaf] if predicted_count[leaf] else None
        f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
        level1, level2, level3 = taxonomy.names(leaf)
        rows.append(
            (
                esc(level1),
                esc(level2),
                f"<b>{esc(level3)}</b>",
                (num(int(taxonomy.train_counts[leaf])), int(taxonomy.train_counts[leaf])),
                (num(int(support[leaf])), int(support[leaf])),
                (pct(recall), recall),
                (pct(precision), -1 if precision is None else precision),
                (pct(f1), f1),
            )
        )
    cut = (
        f" The {len(shown):,} leaves with most products of {int((support > 0).sum()):,}."
        if len(shown) < (support > 0).sum()
        else ""
    )
    headers = ("level 1", "level 2", "leaf", "train products", f"{best.split} products", "recall", "precision", "F1")
    return (
        f"<h3>Per category ({esc(best.split)}, products)</h3><p>Recall = right among the leaf's products; precision "
        f"= right among the products predicted as it (– when none was); support = its {esc(best.split)} products. "
        f"Click a header to sort.{cut}</p>"
        f"<details{' open' if len(shown) <= 30 else ''}><summary>{len(shown):,} categories</summary>"
        f"{table(headers, rows, 'numbers', sortable=True)}</details>"
    )


def reliability_section(paths: WorkPaths, best: BestRun) -> str:
    """Reliability diagram of the product top probability on the reported split (+ calibration, when evaluated)."""
    from prodcat.report.figures import plot_reliability

    frame = best.predictions
    if frame is None or "top1_prob" not in frame:
        return ""
    out = paths.reports / "assets" / "reliability.png"
    confidence = frame["top1_prob"].to_numpy(dtype=np.float64)
    correct = frame["correct"].to_numpy()
    binned = plot_reliability(
        out, confidence, correct, label=best.run.name, title=f"{best.run.name}: reliability on {best.split}"
    )
    text = (
        f"<h3>Reliability ({esc(best.split)}, n = {len(frame):,} products)</h3><p>Products binned by their top "
        "probability: a calibrated model's accuracy in each bin equals its mean probability (the diagonal). "
        f"Expected calibration error {100 * binned['ece']:.1f} points (10 equal-width bins).</p>"
    )
    return text + figure(out, "accuracy against top probability") + _calibration(best.metrics)


def _calibration(metrics: dict[str, Any]) -> str:
    """Whatever scalar numbers evaluation recorded under `calibration` (written by a calibration step)."""
    block = metrics.get("calibration")
    if not isinstance(block, dict):
        return ""
    rows = []
    for key, value in block.items():
        if isinstance(value, dict):
            rows += [(esc(f"{key} · {k}"), num(v, 4)) for k, v in value.items() if isinstance(v, int | float | str)]
        elif isinstance(value, int | float | str):
            rows.append((esc(key), num(value, 4)))
    return "<h3>Calibration</h3>" + table(("what", "value"), rows, "metrics") if rows else ""


def _train_examples(paths: WorkPaths, labels: list[int]) -> dict[int, list[int]]:
    """Up to EXAMPLES_PER_SIDE training products of each leaf (what the predicted category looks like)."""
    from prodcat.data.catalog import load_catalog

    try:
        catalog = load_catalog(paths.root, "train", split="train").select(["product_id", "label"]).to_pandas()
    except (OSError, KeyError) as error:
        log.warning("report: %s", error)
        return {}
    chosen = catalog[catalog["label"].isin(labels)].groupby("label").head(EXAMPLES_PER_SIDE)
    return {int(k): group["product_id"].astype(int).tolist() for k, group in chosen.groupby("label")}


def confused_pairs(paths: WorkPaths, best: BestRun) -> str:
    """For the most confused pairs: pictures of the products that went wrong and of the category they went to."""
    from prodcat.report.thumbnails import thumbnails

    pairs = best.metrics.get("taxonomy", {}).get("confusions", [])[:CONFUSED_PAIRS_SHOWN]
    frame = best.predictions
    if not pairs or frame is None:
        return ""
    wrong = {}
    for pair in pairs:
        true_label, predicted = int(pair["true"]["label"]), int(pair["predicted"]["label"])
        mask = (frame["label"] == true_label) & (frame["top1_label"] == predicted)
        wrong[(true_label, predicted)] = frame.loc[mask, "product_id"].astype(int).tolist()[:EXAMPLES_PER_SIDE]
    examples = _train_examples(paths, [int(pair["predicted"]["label"]) for pair in pairs])
    wanted = [i for ids in wrong.values() for i in ids] + [i for ids in examples.values() for i in ids]
    pictures, note = thumbnails(paths, wanted, limit=1)
    if not pictures:
        return f"<p>{esc(note)}</p>" if note else ""
    blocks = []
    for pair in pairs:
        key = (int(pair["true"]["label"]), int(pair["predicted"]["label"]))
        blocks.append(
            '<div class="pair">'
            f'<div class="pair-title">{esc(pair["true"]["level3"])} → {esc(pair["predicted"]["level3"])} '
            f'<span class="muted">({num(pair["count"])} product{"" if pair["count"] == 1 else "s"})</span></div>'
            f'<div class="side"><div class="muted">{esc(best.split)} products of '
            f"<b>{esc(pair['true']['level3'])}</b> predicted as the other</div>{_strip(key[0], wrong[key], pictures)}"
            f'</div><div class="side"><div class="muted">training products of <b>'
            f"{esc(pair['predicted']['level3'])}</b></div>{_strip(key[1], examples.get(key[1], []), pictures)}"
            "</div></div>"
        )
    return (
        "<h3>Pictures of the most confused pairs</h3><p>First picture of each product.</p>"
        f'<div class="pairs">{"".join(blocks)}</div>'
    )


def _strip(label: int, product_ids: list[int], pictures: dict[int, list[str]]) -> str:
    images = "".join(
        f'<img src="{pictures[i][0]}" alt="product {i} (leaf {label})" title="product {i}">'
        for i in product_ids
        if pictures.get(i)
    )
    return f'<div class="thumbs">{images or "<span class=noimg>no picture</span>"}</div>'
