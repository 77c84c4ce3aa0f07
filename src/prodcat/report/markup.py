"""The small HTML helpers every report page shares: escaping, numbers, tables (sortable), cards, embedded figures.

Figures are embedded as base64 PNG data URIs, so a page is one file that can be copied or mailed alone.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "esc",
    "pct",
    "num",
    "interval",
    "points",
    "table",
    "cards",
    "missing",
    "figure",
    "png_data_uri",
    "natural_key",
    "SORT_SCRIPT",
    "MAX_FIGURE_WIDTH",
    "Section",
]

MAX_FIGURE_WIDTH = 1176  # px: the page's content width; wider figures are scaled down, narrower ones shown 1:1


@dataclasses.dataclass
class Section:
    """One part of the page: anchor id, title, body HTML, and whether its inputs were there."""

    id: str
    title: str
    body: str
    available: bool = True


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def pct(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * float(value):.{digits}f}%"


def num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    return f"{float(value):.{digits}g}" if isinstance(value, float) else esc(value)


def interval(bounds: Sequence[float] | None) -> str:
    """A 95% interval as "[lo, hi]" in percent; "–" when absent."""
    if not bounds:
        return "–"
    lo, hi = bounds
    return f"[{100 * float(lo):.1f}, {100 * float(hi):.1f}]"


def points(difference: float) -> str:
    """An accuracy difference in percentage points, unsigned ("1.4 points")."""
    value = abs(100 * difference)
    return f"{value:.1f} point{'' if f'{value:.1f}' == '1.0' else 's'}"


def natural_key(text: str) -> list[Any]:
    """Sort key that orders embedded numbers by value: sweep-k2 < sweep-k8 < sweep-k16."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


Cell = str | tuple[str, Any]  # HTML, or (HTML, sort value) for a sortable table


def _cell(cell: Cell) -> str:
    if isinstance(cell, tuple):
        content, key = cell
        return f'<td data-sort="{esc(key)}">{content}</td>'
    return f"<td>{cell}</td>"


def table(headers: Sequence[str], rows: Iterable[Sequence[Cell]], classes: str = "", sortable: bool = False) -> str:
    """Headers are escaped here; cells arrive as HTML (escape text with `esc` before).

    `sortable` tables sort by a click on a header (SORT_SCRIPT), by each cell's data-sort value when it has one.
    """
    title = ' title="click to sort"' if sortable else ""
    head = "".join(f"<th{title}>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(cell) for cell in row) + "</tr>" for row in rows)
    kind = f"{classes} sortable".strip() if sortable else classes
    table_html = f'<table class="{kind}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return f'<div class="scroll">{table_html}</div>'


# Click a header: sort by that column (numbers by value, text alphabetically); click again to reverse.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach((table) => {
  table.querySelectorAll("th").forEach((th, column) => th.addEventListener("click", () => {
    const body = table.tBodies[0];
    const down = th.dataset.order !== "desc";
    table.querySelectorAll("th").forEach((other) => delete other.dataset.order);
    th.dataset.order = down ? "desc" : "asc";
    const value = (row) => {
      const cell = row.cells[column];
      const text = cell.dataset.sort ?? cell.textContent.trim();
      const number = parseFloat(text.replace(/[%,]/g, ""));
      return Number.isNaN(number) ? text.toLowerCase() : number;
    };
    const rows = Array.from(body.rows).sort((a, b) => {
      const x = value(a), y = value(b);
      const order = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
      return down ? -order : order;
    });
    body.append(...rows);
  }));
});
"""


def cards(items: Iterable[tuple[str, str]]) -> str:
    cells = "".join(
        f'<div class="card"><div class="value">{value}</div><div class="label">{esc(label)}</div></div>'
        for label, value in items
    )
    return f'<div class="cards">{cells}</div>'


def missing(text: str) -> str:
    return f'<p class="missing">{text}</p>'


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _width(path: Path) -> int:
    from PIL import Image

    try:
        with Image.open(path) as image:  # reads the header only
            return int(image.width)
    except OSError:
        return MAX_FIGURE_WIDTH


def figure(path: Path, caption: str = "") -> str:
    """An embedded figure at its natural size (scaled down to the page width), only when the file exists."""
    if not path.is_file():
        return ""
    text = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    width = min(_width(path), MAX_FIGURE_WIDTH)
    image = f'<img src="{png_data_uri(path)}" width="{width}" alt="{esc(caption or path.stem)}">'
    return f'<figure style="width:{width}px">{image}{text}</figure>'
