"""`prodcat report`: one self-contained HTML page a person opens from disk -> `W/reports/index.html`.

The answer first (a headline box: best run, holdout accuracy with n and interval, baseline, auto-accept), then data
exploration, training curves of every run, the loss x optimizer comparison and the negative-sample sweep with their
conclusions in words, evaluation of every evaluated run (per-category table, reliability diagram, pictures of the
confused pairs, hier vs flat, every lever in one table), a gallery of holdout products, OCR, and a link to the scale
rehearsal's page when there is one. Figures and pictures are embedded (base64 data URIs), so index.html alone can be
copied or mailed. A section whose inputs are missing says so instead of failing.

The stages write numbers only; before reading them the report draws what is missing or older than its numbers
(`prodcat.report.runs`, `prodcat.report.experiments`).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
from pathlib import Path
from typing import Any

import numpy as np

from prodcat.paths import WorkPaths
from prodcat.report import experiments, insights
from prodcat.report.experiments import EXPERIMENTS
from prodcat.report.levers import bench_rows, levers_table_html
from prodcat.report.markup import CSS, SORT_SCRIPT, Section, cards, esc, interval, missing, natural_key, num, pct, table
from prodcat.report.markup import figure as _embedded_figure
from prodcat.report.ocr import ocr_section
from prodcat.report.runs import draw_run
from prodcat.report.thumbnails import THUMBNAIL_SIZE, thumbnails
from prodcat.utils import atomic_write_text, get_logger, read_json

__all__ = ["build_report", "Section", "GALLERY_RIGHT", "GALLERY_WRONG", "THUMBNAIL_SIZE"]

GALLERY_RIGHT = 12
GALLERY_WRONG = 12
_AGGREGATIONS = ("mean_prob", "mean_logprob", "vote")
log = get_logger("prodcat.report")

Evaluated = tuple[Path, dict[str, Any]]  # a run folder and its eval/metrics.json
# Short local names for the shared helpers (prodcat.report.markup).
_e, _pct, _num, _interval, _table, _cards, _missing = esc, pct, num, interval, table, cards, missing


def _figure(path: Path, caption: str = "") -> str:
    return _embedded_figure(path, caption)


def _figures(parts: list[str]) -> str:
    """Figures at their natural size, wrapping: small ones side by side, multi-panel ones on a row of their own."""
    return f'<div class="figures">{"".join(parts)}</div>' if any(parts) else ""


def _read(path: Path) -> Any | None:
    """JSON content, or None when the file is absent or unreadable (a section then says what is missing)."""
    try:
        return read_json(path)
    except (OSError, ValueError) as error:
        if path.exists():
            log.warning("report: cannot read %s: %s", path, error)
        return None


# -- data exploration --------------------------------------------------------------------------------------------------
def _exploration(paths: WorkPaths) -> Section:
    folder = paths.report("explore")
    summary = _read(folder / "summary.json")
    if summary is None:
        return Section(
            "explore",
            "Data exploration",
            _missing("No exploration yet: run <code>prodcat explore --workdir W</code>."),
            False,
        )
    categories = summary.get("categories", {})
    coverage = summary.get("coverage", {})
    splits = summary.get("splits", {})
    shares = coverage.get("leaves_for_share", {})
    mean_images = summary.get("images_per_product", {}).get("labelled", {}).get("mean")

    def present(level: str) -> str:
        block = categories.get(level, {})
        return f"{_num(block.get('present'))} / {_num(block.get('taxonomy'))}"

    cards = [
        ("products", _num(summary.get("products"))),
        ("images", _num(summary.get("images"))),
        *((f"{name} products", _num(part.get("products"))) for name, part in splits.items()),
        ("level-1 categories (with products / all)", present("level1")),
        ("level-2 categories", present("level2")),
        ("leaf categories", present("level3")),
        ("images per product (mean)", _num(mean_images)),
        ("majority-class accuracy", _pct(coverage.get("majority_baseline_accuracy"))),
        ("leaves holding 50% / 90% of products", f"{_num(shares.get('0.5'))} / {_num(shares.get('0.9'))}"),
        ("Zipf exponent", _num(coverage.get("zipf_exponent"))),
    ]
    pngs = [name for name in summary.get("files", {}).values() if str(name).endswith(".png")]
    figures = [_figure(folder / name, Path(name).stem.replace("_", " ")) for name in pngs]
    parts = [
        _cards(cards),
        _ranked_table("Largest categories", summary.get("largest", [])),
        _ranked_table("Smallest categories (with products)", summary.get("smallest", [])),
        _figures(figures),
    ]
    if (folder / "index.html").is_file():
        parts.append(
            '<p>More detail: <a href="explore/index.html">explore/index.html</a> (a separate page in the same '
            "reports folder).</p>"
        )
    return Section("explore", "Data exploration", "".join(parts))


def _ranked_table(title: str, ranked: list[dict]) -> str:
    if not ranked:
        return ""
    rows = [
        (
            _num(r.get("rank")),
            _e(r.get("level1", "")),
            _e(r.get("level2", "")),
            _e(r.get("level3", "")),
            _num(r.get("products")),
            _pct(r.get("share"), 2),
        )
        for r in ranked
    ]
    return f"<h3>{_e(title)}</h3>" + _table(("#", "level 1", "level 2", "level 3", "products", "share"), rows)


# -- training runs -----------------------------------------------------------------------------------------------------
def _runs(paths: WorkPaths) -> list[Path]:
    if not paths.runs.is_dir():
        return []
    found = (p for p in paths.runs.iterdir() if p.is_dir() and (p / "config.json").is_file())
    return sorted(found, key=lambda p: natural_key(p.name))  # sweep-k2 before sweep-k16


def _run_label(config: dict[str, Any]) -> str:
    text = f"{config.get('head', '?')} head, {config.get('loss', '?')}"
    if config.get("loss") == "sampled":
        text += f" ({config.get('num_sampled')} {config.get('sampler', '')} negatives)"
    return text + (f", {config['optimizer']}" if config.get("optimizer") else "")


def _sort_name(name: str) -> str:
    """A text sort key that orders embedded numbers by value (zero-padded), for the page's sortable tables."""
    return "".join(f"{part:08d}" if isinstance(part, int) else part for part in natural_key(name))


def _training(paths: WorkPaths) -> Section:
    runs = _runs(paths)
    if not runs:
        return Section(
            "training", "Training runs", _missing("No runs yet: run <code>prodcat train --workdir W</code>."), False
        )
    rows, figures = [], []
    for run in runs:
        found = insights.open_run(run)  # the training config as predict and serve read it
        config = dataclasses.asdict(found.train_config) if found is not None else {}
        summary = _read(run / "summary.json") or {}
        best, final = summary.get("best") or {}, summary.get("final") or {}
        rows.append(
            (
                (_e(run.name), _sort_name(run.name)),
                _e(_run_label(config)),
                _e(config.get("store", config.get("features", ""))),  # "features": runs before the rename
                (f"{_num(summary.get('step'))} / {_num(summary.get('total_steps'))}", summary.get("step") or 0),
                _num(summary.get("epoch")),
                (_pct(best.get("value")), best.get("value") or 0),
                (_pct(final.get("val_top1")), final.get("val_top1") or 0),
                _num(final.get("val_loss")),
                _num(summary.get("seconds"), 3),
            )
        )
        figures.append(_figure(run / "curves.png", f"{run.name}: {_run_label(config)}"))
    table = _table(
        (
            "run",
            "model",
            "feature store",
            "steps",
            "epochs",
            "best val top-1 (image)",
            "final val top-1",
            "final val loss",
            "seconds",
        ),
        rows,
        "runs",
        sortable=True,
    )
    body = (
        "<p>Click a header to sort. Best val top-1 is picked on val (optimistic); the held-out numbers are in the "
        "headline and the evaluation.</p>" + table
    )
    figures = [part for part in figures if part]
    if figures:
        opened = " open" if len(figures) <= 4 else ""
        body += (
            f"<details{opened}><summary>Training curves of {len(figures)} run(s): loss and validation "
            f"accuracy against steps and seconds</summary>{_figures(figures)}</details>"
        )
    else:
        body += _missing("No curves.png in any run yet.")
    return Section("training", "Training runs", body)


# -- compare and sweep -------------------------------------------------------------------------------------------------
def _experiment(paths: WorkPaths, name: str, title: str, command: str) -> Section:
    """A folder written by `prodcat.train.experiments` (`<name>.json`; `<name>.png` drawn from it by
    `prodcat.report.experiments`): conclusions, table and figure."""
    folder = paths.report(name)
    data = _read(folder / f"{name}.json")
    figure = _figure(folder / f"{name}.png", title)
    if not isinstance(data, dict) and not figure:
        return Section(name, title, _missing(f"Not run yet: <code>{_e(command)}</code>."), False)
    body = ""
    if isinstance(data, dict) and name == "compare":
        body = experiments.compare_body(data, _num_classes(paths))
    elif isinstance(data, dict):
        body = experiments.sweep_body(data)
    return Section(name, title, body + _figures([figure]))


def _num_classes(paths: WorkPaths) -> int | None:
    from prodcat.data.taxonomy import Taxonomy

    try:
        return Taxonomy.load(paths.taxonomy).num_classes if paths.taxonomy.is_file() else None
    except (OSError, ValueError):
        return None


def _with_ci(block: dict[str, Any], key: str) -> str:
    """value [lo, hi] of a metrics.json block ("value" alone for files from before intervals were written)."""
    interval = block.get(f"{key}_ci95")
    return _pct(block.get(key)) + (f" {_interval(interval)}" if interval else "")


# -- evaluation --------------------------------------------------------------------------------------------------------
def _evaluated(paths: WorkPaths) -> list[tuple[Path, dict[str, Any]]]:
    result = []
    for run in _runs(paths):
        metrics = insights.run_part(insights.open_run(run), "metrics")
        if isinstance(metrics, dict) and "product" in metrics and "image" in metrics:
            result.append((run, metrics))
    return result


def _selection_score(metrics: dict[str, Any]) -> float:
    """Product top-1 on val of the kept aggregation: runs are ranked where they were selected, never on the holdout.

    Files from before the holdout split carry only the evaluated split's number.
    """
    product = metrics["product"]
    on_val = metrics.get("selection", {}).get("aggregation_top1", {}).get(product.get("aggregation"))
    return float(on_val if on_val is not None else product.get("top1", 0.0))


def _best(evaluated: list[tuple[Path, dict[str, Any]]]) -> tuple[Path, dict[str, Any]] | None:
    return max(evaluated, key=lambda item: _selection_score(item[1]), default=None)


def _protocol(metrics: dict[str, Any]) -> str:
    """ "selected on val, reported on holdout, n = ..." (older files: the split they were evaluated on)."""
    if metrics.get("protocol"):
        return str(metrics["protocol"])
    return f"evaluated on {metrics.get('split', '?')}, n = {metrics.get('products', '?')} products (no holdout)"


def _evaluation(
    paths: WorkPaths, evaluated: list[Evaluated], best: insights.BestRun | None, synthetic: str | None = None
) -> Section:
    if not evaluated or best is None:
        return Section(
            "evaluation",
            "Evaluation",
            _missing("No evaluated run yet: run <code>prodcat evaluate --run W/runs/NAME</code>."),
            False,
        )
    best_run, best_metrics = best.run, best.metrics
    parts = [
        "<p>Every choice (checkpoint, product aggregation, auto-accept threshold, best run) is made on "
        "<b>val</b>; the numbers are reported on the split each row names (the <b>holdout</b> unless marked "
        "<i>optimistic</i>), each with its n and a 95% interval over products [lo, hi]. "
        "Seed spread: n/a (one seed per run; compare and sweep show spreads). "
        "Product predictions combine a product's images; <b>bold</b> marks the aggregation each run keeps. "
        "Macro = mean per-leaf recall over the leaves in the split. Levels and severity are at product level: "
        "<i>near miss</i> = wrong leaf but right level-2 group, <i>right dept.</i> = right level 1.</p>",
        _evaluation_table(evaluated),
        _hier_vs_flat(evaluated),
        f"<h3>Best run (by product top-1 on val): {_e(best_run.name)}</h3>",
        _headline(best_metrics),
        _confidence_text(best_metrics),
        "<h3>Levers: what each one changes (every lever in one table: this run's on the holdout, chosen on val; "
        "the rest from their own benchmarks)</h3>",
        levers_table_html(best_metrics, note=synthetic, bench=bench_rows()),
        _frequency_table(best_metrics),
        insights.per_category_table(best),
        insights.reliability_section(paths, best),
        _confusion_table(best_metrics),
        insights.confused_pairs(paths, best),
    ]
    for run, _metrics in evaluated:
        figures = _eval_figures(run)
        if figures:
            opened = " open" if run == best_run else ""
            parts.append(f"<details{opened}><summary>Figures of {_e(run.name)}</summary>{_figures(figures)}</details>")
    return Section("evaluation", "Evaluation", "".join(parts))


def _evaluation_table(evaluated: list[tuple[Path, dict[str, Any]]]) -> str:
    rows = []
    for run, m in evaluated:
        product, taxonomy = m["product"], m.get("taxonomy", {}).get("product", {})
        severity = taxonomy.get("severity", {})
        methods = product.get("methods", {})
        per_method = []
        for method in _AGGREGATIONS:
            value = _pct(methods.get(method, {}).get("top1"))
            per_method.append(f"<b>{value}</b>" if method == product.get("aggregation") else value)
        confidence = m.get("confidence", {})
        split = _e(m.get("split", "?")) + (" <i>optimistic</i>" if m.get("optimistic", True) else "")
        rows.append(
            (
                _e(run.name),
                _e(f"{m.get('head', '?')} / {m.get('loss', '?')}"),
                f"{split}, n = {_num(product.get('n', m.get('products')))}",
                _with_ci(product, "top1"),
                _with_ci(product, "macro"),
                _with_ci(m["image"], "top1"),
                _with_ci(m["image"], "macro"),
                *per_method,
                _pct(taxonomy.get("level1")),
                _pct(taxonomy.get("level2")),
                _pct(severity.get("same_level2")),
                _pct(severity.get("same_level1")),
                f"{_num(confidence.get('threshold'))} → {_pct(confidence.get('coverage'))}",
            )
        )
    headers = (
        "run",
        "head / loss",
        "reported on (products)",
        "product top-1 [95% CI]",
        "product macro [95% CI]",
        "image top-1 [95% CI]",
        "image macro [95% CI]",
        "product mean_prob",
        "product mean_logprob",
        "product vote",
        "level-1 acc.",
        "level-2 acc.",
        "errors: near miss",
        "errors: right dept.",
        "threshold (val) → coverage",
    )
    return _table(headers, rows, "numbers")


def _headline(metrics: dict[str, Any]) -> str:
    """The best run's headline numbers, each labelled with its split, n and interval."""
    product, image = metrics["product"], metrics["image"]
    return (
        f"<p><b>{_e(_protocol(metrics))}</b>: product top-1 <b>{_with_ci(product, 'top1')}</b>, "
        f"product macro {_with_ci(product, 'macro')}, image top-1 {_with_ci(image, 'top1')} "
        f"(n = {_num(image.get('n', metrics.get('images')))} images), image macro {_with_ci(image, 'macro')}; "
        f"seed spread n/a (one seed). Intervals: {_e(metrics.get('interval', 'none recorded'))}.</p>"
    )


def _frequency_table(metrics: dict[str, Any]) -> str:
    frequency = metrics.get("taxonomy", {}).get("frequency", {})
    thresholds = frequency.get("thresholds")
    rows = [
        (
            _e(name),
            _num(group.get("categories")),
            f"{_num(group.get('train_pictures_min'))}–{_num(group.get('train_pictures_max'))}"
            if group.get("categories")
            else "–",
            _pct(group.get("train_pictures_share")),
            _num(group.get("products")),
            _with_ci(group, "product_top1"),
            _pct(group.get("product_macro")),
        )
        for name, group in frequency.items()
        if name != "thresholds" and isinstance(group, dict)
    ]
    if not rows:
        return ""
    rule = f" Groups: {_e(thresholds['rule'])}." if thresholds else ""
    return (
        f"<h3>Head, medium and tail categories</h3><p>Leaves grouped by their train-split pictures.{rule} "
        f"Accuracy on {_e(metrics.get('split', '?'))}.</p>"
        + _table(
            (
                "group",
                "leaves",
                "train pictures per leaf",
                "share of train pictures",
                "products",
                "product top-1 [95% CI]",
                "product macro",
            ),
            rows,
            "numbers",
        )
    )


def _hier_vs_flat(evaluated: list[tuple[Path, dict[str, Any]]]) -> str:
    hier = _best([item for item in evaluated if item[1].get("head") == "hier"])
    flat = _best([item for item in evaluated if item[1].get("head") != "hier"])
    if hier is None or flat is None:
        return ""
    protocols = " / ".join(_e(text) for text in dict.fromkeys((_protocol(hier[1]), _protocol(flat[1]))))
    rows = []
    for label, getter in (
        ("image top-1", lambda m: m["image"].get("top1")),
        ("product top-1", lambda m: m["product"].get("top1")),
        ("product level-1 accuracy", lambda m: m.get("taxonomy", {}).get("product", {}).get("level1")),
        ("product level-2 accuracy", lambda m: m.get("taxonomy", {}).get("product", {}).get("level2")),
        (
            "errors inside the right level 2",
            lambda m: m.get("taxonomy", {}).get("product", {}).get("severity", {}).get("same_level2"),
        ),
        (
            "errors inside the right level 1",
            lambda m: m.get("taxonomy", {}).get("product", {}).get("severity", {}).get("same_level1"),
        ),
        ("level-1 head's own accuracy (product)", lambda m: m.get("hier", {}).get("level1_head", {}).get("product")),
        ("level-2 head's own accuracy (product)", lambda m: m.get("hier", {}).get("level2_head", {}).get("product")),
    ):
        a, b = getter(hier[1]), getter(flat[1])
        delta = "–" if a is None or b is None else f"{100 * (a - b):+.1f} pts"
        rows.append((_e(label), _pct(a), _pct(b), delta))
    return (
        f"<h3>Hierarchical vs flat head</h3><p>Best hierarchical run <b>{_e(hier[0].name)}</b> against the best "
        f"flat run <b>{_e(flat[0].name)}</b> (chosen by product top-1 on val); numbers {protocols}.</p>"
        + _table(("metric", hier[0].name, flat[0].name, "difference"), rows, "metrics")
    )


def _confidence_text(metrics: dict[str, Any]) -> str:
    confidence = metrics.get("confidence", {})
    target = _pct(confidence.get("target_accuracy"), 0)
    if confidence.get("threshold") is None:
        return f"<p>Auto-accept: {_e(confidence.get('note') or 'no threshold reaches the target accuracy')}.</p>"
    if "chosen_on" not in confidence:  # a file from before the holdout split
        return (
            f"<p>Auto-accept: products whose top probability is at least <b>{_num(confidence['threshold'])}</b> "
            f"are {target} correct and make up <b>{_pct(confidence.get('coverage'))}</b> of the products; "
            "the rest go to a person.</p>"
        )
    split = _e(metrics.get("split", "?"))
    return (
        f"<p>Auto-accept: the threshold <b>{_num(confidence['threshold'])}</b> on the top product probability "
        f"is the lowest that reaches {target} accuracy on {_e(confidence['chosen_on'])}. On {split} it accepts "
        f"<b>{_pct(confidence.get('coverage'))}</b> of the products (n = {_num(confidence.get('accepted'))}), "
        f"<b>{_pct(confidence.get('accuracy'))}</b> {_interval(confidence.get('accuracy_ci95'))} of them "
        "correct; the rest go to a person.</p>"
    )


def _confusion_table(metrics: dict[str, Any]) -> str:
    pairs = metrics.get("taxonomy", {}).get("confusions", [])
    if not pairs:
        return ""

    def path(category: dict[str, Any]) -> str:
        return (
            f"{_e(category.get('level1', ''))} › {_e(category.get('level2', ''))} › "
            f"<b>{_e(category.get('level3', ''))}</b>"
        )

    rows = [
        (
            path(pair["true"]),
            path(pair["predicted"]),
            _num(pair["count"]),
            _pct(pair.get("share_of_true")),
            "near miss" if pair.get("same_level2") else "right dept." if pair.get("same_level1") else "other dept.",
        )
        for pair in pairs
    ]
    return "<h3>Most confused category pairs (products)</h3>" + _table(
        ("true category", "predicted as", "products", "of the true category", "kind"), rows, "confusions"
    )


def _eval_figures(run: Path) -> list[str]:
    sources = sorted((run / "eval").glob("*.png"))
    return [_figure(source, f"{run.name}: {source.stem.replace('_', ' ')}") for source in sources]


# -- gallery -----------------------------------------------------------------------------------------------------------
def _gallery(paths: WorkPaths, best: insights.BestRun | None) -> Section:
    split = best.split if best else "evaluated"
    title = f"Gallery of {split} products"
    if best is None or best.predictions is None or best.taxonomy is None:
        return Section("gallery", title, _missing("No predictions.parquet in any evaluated run yet."), False)
    picked = _pick(best.predictions)
    pictures, note = thumbnails(paths, picked["product_id"].astype(int).tolist())
    cards = "".join(
        _product_card(row, best.taxonomy, pictures.get(int(row.product_id), []))
        for row in picked.itertuples(index=False)
    )
    intro = (
        f"<p>{GALLERY_RIGHT} right and {GALLERY_WRONG} wrong {_e(split)} products of <b>{_e(best.run.name)}</b> "
        "(chosen at random, wrong ones shown first), with the true category and the top-3 predictions."
        f"{' ' + _e(note) if note else ''}</p>"
    )
    return Section("gallery", title, intro + f'<div class="gallery">{cards}</div>')


def _pick(table: Any) -> Any:
    rng = np.random.default_rng(0)
    parts = []
    for correct, count in ((False, GALLERY_WRONG), (True, GALLERY_RIGHT)):
        rows = np.flatnonzero(table["correct"].to_numpy() == correct)
        chosen = np.sort(rng.choice(rows, size=min(count, len(rows)), replace=False)) if len(rows) else rows
        parts.append(table.iloc[chosen])
    import pandas as pd

    return pd.concat(parts)


def _names(taxonomy: Any, label: int) -> str:
    if not 0 <= label < taxonomy.num_classes:
        return "–"
    level1, level2, level3 = taxonomy.names(label)
    return f'<span class="path">{_e(level1)} › {_e(level2)} ›</span> <b>{_e(level3)}</b>'


def _product_card(row: Any, taxonomy: Any, thumbnails: list[str]) -> str:
    correct = bool(row.correct)
    images = (
        "".join(
            f'<img src="{url}" alt="picture {i + 1} of product {int(row.product_id)}">'
            for i, url in enumerate(thumbnails)
        )
        or '<div class="noimg">no thumbnail</div>'
    )
    predictions = []
    for rank in (1, 2, 3):
        label, prob = int(getattr(row, f"top{rank}_label")), float(getattr(row, f"top{rank}_prob"))
        if label < 0:
            continue
        mark = ' class="hit"' if label == int(row.label) else ""
        width = max(0.0, min(100.0, 100 * prob))
        predictions.append(
            f'<li{mark}><span class="prob">{_pct(prob)}<span class="meter"><span style="width:{width:.0f}%">'
            f"</span></span></span><span>{_names(taxonomy, label)}</span></li>"
        )
    verdict = "right" if correct else "wrong"
    return (
        f'<div class="product {verdict}"><div class="verdict">{"✓ right" if correct else "✗ wrong"} · '
        f"product {int(row.product_id)} · {int(row.num_images)} image(s)</div>"
        f'<div class="thumbs">{images}</div><div class="truth">true: {_names(taxonomy, int(row.label))}</div>'
        f'<ol class="preds">{"".join(predictions)}</ol></div>'
    )


# -- at scale --------------------------------------------------------------------------------------------------------
AT_SCALE = "at_scale"  # W/reports/at_scale/: the scale rehearsal's page (prodcat.rehearsal.report, docs/scale.md)


def _at_scale(paths: WorkPaths) -> Section:
    """A link to the rehearsal's "at scale" page when this work directory holds one, with its losses in short."""
    title = "At scale"
    folder = paths.reports / AT_SCALE
    if not (folder / "index.html").is_file():
        return Section(
            "scale",
            title,
            _missing(
                "No scale rehearsal in this work directory: <code>make rehearsal</code> (or <code>prodcat "
                "rehearsal --workdir W</code>) runs the pipeline at 5,270 leaves and writes "
                "<code>W/reports/at_scale/index.html</code>, linked here; docs/scale.md says what it runs."
            ),
            False,
        )
    summary = _read(folder / "summary.json") or {}
    rows = [
        (
            _e(arm.get("head", "?")),
            _e(arm.get("loss", "?")),
            _num(arm.get("seeds")),
            _pct(arm.get("holdout_product_top1")),
            "n/a" if not arm.get("seed_spread") else f"{_pct(arm['seed_spread'][0])}–{_pct(arm['seed_spread'][1])}",
            _interval(arm.get("seed0_ci95")),
            _num(arm.get("n_products")),
            _num(arm.get("train_seconds"), 4),
        )
        for arm in summary.get("arms", [])
    ]
    headers = ("head", "loss", "seeds", "holdout product top-1 (mean)", "seed range", "seed 0 95% CI", "n products")
    body = (
        f'<p>The scale rehearsal\'s own page: <a href="{AT_SCALE}/index.html">{AT_SCALE}/index.html</a> (stage '
        "times, peak memory, disk, throughput, and accuracy against training seconds). Its data is synthetic: the "
        "numbers describe prodcat's cost and behaviour at the real shape, never Cdiscount accuracy. Selected on "
        "val, reported on the holdout.</p>"
    )
    if rows:
        body += _table((*headers, "train seconds"), rows, "numbers")
    return Section("scale", title, body)


# -- the page ----------------------------------------------------------------------------------------------------------


def _synthetic_note(paths: WorkPaths) -> str | None:
    """The demo's data is synthetic: `prodcat demo` leaves reports/demo_summary.json and says so in its notes."""
    if (paths.reports / "demo_summary.json").is_file():
        return (
            "Demo data is synthetic (rendered objects standing in for product photos, names drawn from the real "
            "taxonomy): the numbers show the pipeline at work, not what it reaches on Cdiscount."
        )
    for name in ("compare", "sweep"):
        data = _read(paths.report(name) / f"{name}.json")
        for note in (data or {}).get("notes", []) if isinstance(data, dict) else []:
            if "synthetic" in str(note).lower():
                return str(note)
    return None


def _headline_section(best: insights.BestRun | None, synthetic: str | None) -> Section:
    if best is None:
        text = _missing("No evaluated run yet: the answer appears here once <code>prodcat evaluate</code> has run.")
        note = f'<p class="synthetic">{_e(synthetic)}</p>' if synthetic else ""
        return Section("answer", "The answer", text + note, False)
    return Section("answer", "The answer", insights.headline_box(best, synthetic))


def _page(workdir: Path, sections: list[Section]) -> str:
    nav = "".join(f'<a href="#{s.id}"{"" if s.available else " class=off"}>{_e(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.id}"><h2>{_e(s.title)}</h2>{s.body}</section>' for s in sections)
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>prodcat report</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>prodcat: product categorisation report</h1><p>work directory {_e(workdir)} · "
        f"generated {_e(stamp)} · one self-contained file (figures embedded)</p><nav>{nav}</nav></header>\n"
        f"<main>{body}</main>\n<footer>prodcat</footer>\n<script>{SORT_SCRIPT}</script>\n</body>\n</html>\n"
    )


def build_report(workdir: str | Path) -> Path:
    """Write `W/reports/index.html` (self-contained) from whatever the work directory holds; returns its path."""
    paths = WorkPaths(workdir)
    paths.reports.mkdir(parents=True, exist_ok=True)
    drawn = _draw_stale(paths)
    evaluated = _evaluated(paths)
    chosen = _best(evaluated)
    best = None if chosen is None else insights.BestRun.load(*chosen)
    synthetic = _synthetic_note(paths)
    sections = [
        _headline_section(best, synthetic),
        _exploration(paths),
        _training(paths),
        _experiment(paths, "compare", "Loss x optimizer", "prodcat compare --workdir W"),
        _experiment(paths, "sweep", "Number of sampled negatives", "prodcat sweep --workdir W"),
        _evaluation(paths, evaluated, best, synthetic),
        _gallery(paths, best),
        ocr_section(paths.root),
        _at_scale(paths),
    ]
    out = paths.reports / "index.html"
    atomic_write_text(out, _page(paths.root, sections))
    log.info("report -> %s (%s; %d figures and tables redrawn)", out,
             ", ".join(s.id for s in sections if s.available) or "no inputs yet", drawn)  # fmt: skip
    return out


def _draw_stale(paths: WorkPaths) -> int:
    """What the stages left as plain numbers, drawn where missing or older than them: every run's curves and
    evaluation figures, the compare and sweep figures and pages. Returns how many files were written."""
    jobs = [functools.partial(draw_run, run) for run in _runs(paths)]
    num_classes = _num_classes(paths)
    jobs += [functools.partial(experiments.render_experiment, paths.report(name), num_classes) for name in EXPERIMENTS]
    written = 0
    for job in jobs:
        try:
            written += len(job())
        except (KeyError, TypeError, ValueError, OSError) as error:  # an odd file costs its figure, not the page
            log.warning("report: cannot draw from %s: %s: %s", job.args[0], type(error).__name__, error)
    return written
