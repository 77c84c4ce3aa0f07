"""examples.png of `prodcat ocr`: a few pictures with the boxes and words read on them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prodcat.utils import atomic_open

__all__ = ["draw_examples"]


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
    `read_picture(row)` gives the decoded picture of a plan row (the stage's reader: this module stays below it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = _chosen(pictures, count)
    columns = max(1, min(3, len(rows)))
    lines = max(1, -(-len(rows) // columns))
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 4.6 * lines), squeeze=False)
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
    figure.tight_layout()
    with atomic_open(path) as handle:
        figure.savefig(handle, format="png", dpi=110)
    plt.close(figure)
    return path
