"""The report's OCR section: what `prodcat ocr` read, what the text adds to the pictures (holdout, seeds), examples.

`ocr_section(workdir)` returns a `Section` for report/html.py's page. Inputs (each optional; the section says what
is missing): W/ocr/summary.json (the stage), R/text/fusion.json of every run with a text model (`prodcat
text-head`), and the words-right benchmark JSON (benchmarks/results/ocr_words_right.json).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prodcat.paths import WorkPaths
from prodcat.report.markup import Section
from prodcat.report.markup import esc as _e
from prodcat.report.markup import table as _table
from prodcat.utils import read_json

__all__ = ["ocr_section", "fusion_rows", "WORDS_RIGHT_JSON"]

WORDS_RIGHT_JSON = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "ocr_words_right.json"
_ARMS = (
    ("picture", "pictures only (the run's head, its aggregation)"),
    ("picture_product_head", "pictures only, product head (concat without text)"),
    ("late", "pictures + text, late fusion (weight on val)"),
    ("concat", "pictures + text, concatenation into one head"),
)
_CALIBRATION_ARMS = (
    ("uncalibrated", "fused scores, no calibration"),
    ("before", "fused scores, the run's picture calibration (as served before)"),
    ("after", "fused scores, their own calibration (served now)"),
)


def _json(path: Path) -> Any | None:
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _fusions(workdir: Path, runs: Sequence[Path] | None) -> list[dict[str, Any]]:
    runs = runs if runs is not None else sorted(WorkPaths(workdir).runs.glob("*"))
    found = [_json(Path(run) / "text" / "fusion.json") for run in runs]
    return [item for item in found if item]


def _spread(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f} ± n/a"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def fusion_rows(fusions: list[dict[str, Any]], split: str = "holdout") -> list[dict[str, Any]]:
    """Per arm: mean ± sd over the runs (seeds) of product top-1, overall and on the text-heavy leaves, with the
    first run's 95% interval over products and n."""
    rows = []
    for key, name in _ARMS:
        row: dict[str, Any] = {"arm": key, "name": name, "seeds": len(fusions)}
        for part in ("all", "text_leaves"):
            blocks = [f[split][key][part] for f in fusions if f.get(split, {}).get(key)]
            row[part] = _spread([b["top1"] for b in blocks if b["top1"] is not None])
            row[f"{part}_ci95"] = blocks[0]["top1_ci95"] if blocks else None
            row[f"{part}_n"] = blocks[0]["n"] if blocks else None
        rows.append(row)
    return rows


def _interval(interval: Sequence[float] | None) -> str:
    return "–" if not interval else f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def _fusion_table(fusions: list[dict[str, Any]]) -> str:
    rows = fusion_rows(fusions)
    cells = [
        [_e(r["name"]), _e(r["all"]), _interval(r["all_ci95"]), _e(r["all_n"]), _e(r["text_leaves"]),
         _interval(r["text_leaves_ci95"]), _e(r["text_leaves_n"])]
        for r in rows
    ]  # fmt: skip
    kept = sorted({f["kept"] for f in fusions})
    weights = ", ".join(f"{f['late_weight']:g}" for f in fusions)
    headers = ["arm", "top-1 all", "95% CI (seed 0)", "n", "top-1 text leaves", "95% CI (seed 0)", "n"]
    return (
        f"<p>Product top-1 on <b>holdout</b> (nothing tuned there), mean ± sd over {len(fusions)} seed(s); intervals "
        f"over products of the first seed. Text leaves: LIBRAIRIE, MUSIQUE, DVD - BLU-RAY, JEUX VIDEO. Late-fusion "
        f"weight chosen on val per seed: {_e(weights)}; fusion kept for serving (better on val): {_e(', '.join(kept))}."
        f"</p>{_table(headers, cells)}"
    )


def _calibration_table(fusions: list[dict[str, Any]]) -> str:
    """ECE of the kept fusion's holdout probabilities before / after its own calibration (R/text/fusion.json)."""
    blocks = [f["calibration"] for f in fusions if (f.get("calibration") or {}).get("holdout")]
    if not blocks:
        return ""
    held = [b["holdout"] for b in blocks]
    cells = [
        [_e(name), _e(_spread([h[key]["ece"] for h in held])),
         _e("–" if key == "uncalibrated" else _spread([h[key]["coverage"] for h in held])), _e(held[0]["n"])]
        for key, name in _CALIBRATION_ARMS
    ]  # fmt: skip
    change = held[0]["change"]["ece"]
    return (
        f"<p>Calibration of the fused product probabilities on <b>holdout</b>: ECE ({held[0]['bins']} equal-width "
        f"bins), mean ± sd over {len(held)} seed(s). The fused calibration (tau, T, auto-accept threshold) is chosen "
        f"on val's fused scores (n = {blocks[0]['n']}). Seed 0's ECE change {change['change']:+.4f}, 95% paired "
        f"bootstrap {_interval(change['change_ci95'])}.</p>"
        + _table(["probabilities", "ECE", "auto-accept coverage", "n"], cells)
    )


def _stage_table(summary: dict[str, Any] | None, words_right: dict[str, Any] | None) -> str:
    rows = []
    if summary:
        rate = summary.get("pictures_per_s")
        rows += [
            ["pictures considered", _e(f"{summary['pictures']:,}"), _e(f"--select {summary['select']}")],
            ["share read by OCR", _e(f"{summary['share_read']:.1%}"), "the rest skipped by the text-presence test"],
            ["pictures read with text", _e(f"{summary['share_with_text']:.1%}"), "of those read"],
            ["pictures/s", _e("–" if rate is None else f"{rate:.1f}"),
             _e(f"{summary['workers']} worker(s), {summary['engine']}; per picture incl. decode and selection")],
            ["Cdiscount's 12.4 M pictures", _e(f"{summary.get('cdiscount_hours') or 0:.1f} h"),
             "at this rate and selection share"],
        ]  # fmt: skip
    if words_right:
        chosen = words_right.get("details", {}).get("chosen", "tesseract")
        right = words_right.get("details", {}).get("words_right", {}).get(chosen, {})
        page = right.get("skimage_page", {})
        how = f"{page.get('found')}/{page.get('words')} words ({chosen}; benchmarks/bench_ocr.py)"
        rows.append(["words right, skimage page()", _e(f"{page.get('words_right', 0):.3f}"), _e(how)])
        rows.append(["words right, all real + rendered", _e(f"{words_right.get('value', 0):.3f}"), "bench_ocr.py"])
    return _table(["OCR", "value", "how"], rows) if rows else ""


def _thumbnail(workdir: Path, product_id: int) -> str:
    """The product's first picture as an inline PNG (96 px), from the train catalog's BSON."""
    from PIL import Image

    from prodcat.data.bson_index import BsonReader
    from prodcat.data.catalog import catalog_source, load_catalog

    try:
        table = load_catalog(workdir, "train", split=None)
        ids = table["product_id"].to_numpy()
        row = int(np.flatnonzero(ids == product_id)[0])
        with BsonReader(catalog_source(workdir, "train")) as reader:
            data = reader.pictures(int(table["offset"][row].as_py()), int(table["length"][row].as_py()))[0]
        image = Image.open(io.BytesIO(data)).convert("RGB")
        image.thumbnail((96, 96))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    except Exception:  # noqa: BLE001 - a missing picture leaves its cell empty, the section stands
        return ""
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}" alt="cover {product_id}">'


def _examples(workdir: Path, fusion: dict[str, Any]) -> str:
    from prodcat.data.taxonomy import Taxonomy

    examples = fusion.get("examples") or []
    try:
        taxonomy = Taxonomy.load(WorkPaths(workdir).taxonomy)
    except (OSError, ValueError):
        return ""
    name = " / ".join

    def leaf(label: int) -> str:
        return _e(name(taxonomy.names(label)[1:]))

    rows = [
        [_thumbnail(workdir, e["product_id"]), _e(e["words"]), leaf(e["picture_top"]), leaf(e["fused_top"]),
         leaf(e["label"])]
        for e in examples
    ]  # fmt: skip
    headers = ["cover", "words read", "prediction, pictures only", f"with text ({fusion['kept']})", "truth"]
    return f"<h3>Holdout examples (seed {fusion['seed']})</h3>" + _table(headers, rows) if rows else ""


def ocr_section(
    workdir: str | Path, runs: Sequence[Path] | None = None, words_right: Path = WORDS_RIGHT_JSON
) -> Section:
    """The OCR + fusion section; `runs` default to every run of W with a text model."""
    workdir = Path(workdir)
    summary = _json(workdir / "ocr" / "summary.json")
    fusions = _fusions(workdir, runs)
    parts = [_stage_table(summary, _json(words_right))]
    if fusions:
        parts += [_fusion_table(fusions), _calibration_table(fusions), _examples(workdir, fusions[0])]
    else:
        parts.append('<p class="missing">No run has a text model yet: <code>prodcat text-head --run W/runs/R</code> '
                     "after <code>prodcat ocr --select text_likely</code>.</p>")  # fmt: skip
    note = "<p>Demo data is synthetic: these numbers show the pipeline at work, not Cdiscount.</p>"
    return Section("ocr", "Reading the covers (OCR + text fusion)", note + "".join(parts), bool(summary or fusions))
