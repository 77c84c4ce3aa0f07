"""examples.png of `prodcat ocr`: a few pictures with the boxes and words read on them, drawn from W/ocr/'s tables.

The OCR stage writes tables only; the CLI's `ocr` (or anyone after it) calls `draw_ocr_examples`, which reads the
pictures through the stage's own plan and reader and redraws when the tables are newer than the figure.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prodcat.report import figures

__all__ = ["draw_ocr_examples", "draw_examples", "EXAMPLES_FIGURE"]

EXAMPLES_FIGURE = "examples.png"


def _chosen(pictures: pa.Table, count: int) -> list[int]:
    """Rows to draw: pictures with words first (most words first), then others, so the figure shows reading."""
    ok = pc.equal(pictures["status"], "ok").to_numpy(zero_copy_only=False)
    found = pictures["words"].to_numpy()
    with_text = np.flatnonzero(ok)
    with_text = with_text[np.argsort(-found[with_text], kind="stable")]
    others = np.flatnonzero(~ok)[:count]
    return [int(row) for row in np.concatenate([with_text, others])[:count]]


def draw_examples(
    path: Path,
    read_picture: Callable[[int], Any],
    pictures: pa.Table,
    words: pa.Table,
    count: int = 6,
    min_confidence: float = 0.5,
) -> Path:
    """Draw up to `count` pictures with their word boxes and words (titles: the confident ones); returns the PNG.
    `read_picture(row)` gives the decoded picture of a row of `pictures` (the OCR plan's order)."""
    from matplotlib.patches import Rectangle

    rows = _chosen(pictures, count)
    columns = max(1, min(3, len(rows)))
    lines = max(1, -(-len(rows) // columns))
    size = (4.2 * columns, 4.6 * lines)
    with figures.png_figure(path, lines, columns, figsize=size, squeeze=False) as (figure, axes):
        for ax in axes.ravel():
            ax.axis("off")
        products = words["product_id"].to_numpy()
        indices = words["image_index"].to_numpy()
        for ax, row in zip(axes.ravel(), rows, strict=False):
            product, index = int(pictures["product_id"][row].as_py()), int(pictures["image_index"][row].as_py())
            status = pictures["status"][row].as_py()
            try:
                ax.imshow(read_picture(row))
            except Exception:  # noqa: BLE001 - an unreadable picture still gets its panel and status
                ax.text(0.5, 0.5, "unreadable", ha="center", transform=ax.transAxes)
            mine = words.filter(pa.array((products == product) & (indices == index)))
            sure = []
            fields = ("left", "top", "right", "bottom", "word", "confidence")
            rows_read = zip(*(mine[k].to_pylist() for k in fields), strict=True)
            for left, top, right, bottom, text, confidence in rows_read:
                colour = "red" if confidence >= min_confidence else "grey"
                ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, color=colour, linewidth=1))
                ax.text(left, top - 1, text, color=colour, fontsize=6, va="bottom")
                sure += [text] if confidence >= min_confidence else []
            ax.set_title(f"{product}/{index} {status}\n{' '.join(sure)[:60]}", fontsize=7)
        figure.suptitle(f"What OCR read (red: confidence >= {min_confidence}, grey: below)", fontsize=10)
    return path


def draw_ocr_examples(workdir: str | Path, count: int | None = None, force: bool = False) -> Path | None:
    """W/ocr/examples.png from W/ocr/pictures.parquet and words.parquet (`count` pictures, default the run's
    `examples` setting), where missing or older than the tables; None when there is nothing to draw."""
    from prodcat.config import OcrConfig, load_config
    from prodcat.ocr.stage import ocr_dir, plan_pictures, read_picture

    folder = ocr_dir(workdir)
    source, target = folder / "pictures.parquet", folder / EXAMPLES_FIGURE
    if not source.is_file() or not (folder / "config.json").is_file():
        return None
    config = load_config(OcrConfig, folder / "config.json")
    count = config.examples if count is None else count
    fresh = target.is_file() and target.stat().st_mtime_ns >= source.stat().st_mtime_ns
    if count < 1 or (fresh and not force):
        return None
    plan = plan_pictures(workdir, config.splits, config.limit)
    cache: dict = {}
    pictures, words = pq.read_table(source), pq.read_table(folder / "words.parquet")
    return draw_examples(target, lambda row: read_picture(plan, row, cache), pictures, words, count)
