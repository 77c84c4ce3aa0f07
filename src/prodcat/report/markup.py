"""The one set of HTML and table helpers every report page shares: escaping, numbers, spreads, tables (HTML, sortable,
and Markdown), cards, embedded figures, the page's style sheet and a standalone page around a body.

Figures are embedded as base64 PNG data URIs, so a page is one file that can be copied or mailed alone.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import re
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "esc",
    "pct",
    "share",
    "num",
    "interval",
    "points",
    "spread",
    "table",
    "markdown_table",
    "page",
    "CSS",
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


def share(value: Any) -> str:
    """A share of a whole in percent with 2 decimals, 2 significant digits below 0.01% so it never reads as 0."""
    if value is None:
        return "–"
    value = float(value)
    return f"{value:.2%}" if value == 0 or value >= 1e-4 else f"{100 * value:.2g}%"


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


def spread(block: dict[str, Any], key: str) -> str:
    """'76.4% ± 0.8 [72.0, 80.5]': mean ± seed std in points, then the 95% interval `<key>_ci95` when there is one.

    One seed (or no std) shows "± n/a": a spread of 0 would read as no spread at all.
    """
    mean, std, seeds = block.get(f"{key}_mean"), block.get(f"{key}_std"), block.get("seeds")
    one_seed = std is None or (seeds is not None and int(seeds) < 2)
    text = pct(mean) + (" ± n/a" if one_seed else f" ± {100 * std:.1f}")
    bounds = block.get(f"{key}_ci95")
    return text + (f" {interval(bounds)}" if bounds else "")


def natural_key(text: str) -> list[Any]:
    """Sort key that orders embedded numbers by value: sweep-k2 < sweep-k8 < sweep-k16."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


Cell = str | tuple[str, Any]  # HTML, or (HTML, sort value) for a sortable table


def _cell(cell: Cell, numeric: bool = False) -> str:
    kind = ' class="n"' if numeric else ""
    if isinstance(cell, tuple):
        content, key = cell
        return f'<td{kind} data-sort="{esc(key)}">{content}</td>'
    return f"<td{kind}>{cell}</td>"


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Cell]],
    classes: str = "",
    sortable: bool = False,
    numeric: Collection[int] = (),
) -> str:
    """Headers are escaped here; cells arrive as HTML (escape text with `esc` before).

    `sortable` tables sort by a click on a header (SORT_SCRIPT), by each cell's data-sort value when it has one;
    the columns in `numeric` are right-aligned figures.
    """
    title = ' title="click to sort"' if sortable else ""
    head = "".join(f"<th{title}>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(_cell(cell, index in numeric) for index, cell in enumerate(row)) + "</tr>" for row in rows
    )
    kind = f"{classes} sortable".strip() if sortable else classes
    table_html = f'<table class="{kind}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return f'<div class="scroll">{table_html}</div>'


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table of plain-text cells ('|' escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(row) for row in rows)]) + "\n"


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


def figure(path: Path, caption: str = "", embed: bool = True) -> str:
    """A figure at its natural size (scaled down to the page width), only when the file exists: embedded, or linked
    by its file name (`embed=False`, for a page kept in the figure's folder)."""
    if not path.is_file():
        return ""
    text = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    width = min(_width(path), MAX_FIGURE_WIDTH)
    source = png_data_uri(path) if embed else esc(path.name)
    image = f'<img src="{source}" width="{width}" alt="{esc(caption or path.stem)}"{"" if embed else " loading=lazy"}>'
    return f'<figure style="width:{width}px">{image}{text}</figure>'


def page(title: str, body: str) -> str:
    """A standalone page (the report's style sheet, `body` as HTML) for the pages beside the report."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>{body}</main>\n"
        f"<script>{SORT_SCRIPT}</script>\n</body>\n</html>\n"
    )


# The report's style sheet; every page beside it (compare, sweep, explore) uses it too.
CSS = """
:root { --ink: #1f2328; --muted: #5b636e; --line: #d9dde3; --bg: #f6f7f9; --right: #1a7f37; --wrong: #c2410c; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--ink); background: white; }
header { background: #0f2a44; color: white; padding: 22px 32px 14px; }
header h1 { margin: 0 0 4px; font-size: 24px; }
header p { margin: 0; color: #c8d3df; font-size: 13px; }
nav { display: flex; flex-wrap: wrap; gap: 6px 18px; margin-top: 12px; }
nav a { color: #ffffff; text-decoration: none; font-size: 14px; border-bottom: 1px solid transparent; }
nav a:hover { border-bottom-color: white; }
nav a.off { color: #8da2b8; }
main { max-width: 1240px; margin: 0 auto; padding: 8px 32px 48px; }
section { border-bottom: 1px solid var(--line); padding: 18px 0 26px; }
h2 { font-size: 21px; margin: 10px 0 12px; }
h3 { font-size: 16px; margin: 22px 0 8px; }
p.missing { color: var(--muted); font-style: italic; background: var(--bg); padding: 10px 14px; border-radius: 6px; }
code { background: var(--bg); padding: 1px 5px; border-radius: 4px; font-size: 13px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 10px; margin: 6px 0 10px; }
.card { background: var(--bg); border-radius: 8px; padding: 10px 12px; }
.card .value { font-size: 20px; font-weight: 650; }
.card .label { color: var(--muted); font-size: 12.5px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13.5px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: var(--bg); font-weight: 600; vertical-align: bottom; }
table.numbers { font-size: 13px; }
table.metrics td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.numbers th { max-width: 120px; }
table.numbers td:first-child, table.numbers td:not(:nth-child(2)), table.runs td:not(:nth-child(2)),
table.confusions td:nth-child(n+3) { white-space: nowrap; }
table.numbers td:not(:first-child):not(:nth-child(2)) { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:hover { background: #fafbfc; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.levers { font-size: 12.5px; }
table.levers td { min-width: 96px; }
table.levers td:last-child { min-width: 260px; }
.figures { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; margin: 8px 0; }
figure { margin: 0; max-width: 100%; }
figure img { width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
table.sortable th { cursor: pointer; }
table.sortable th[data-order="desc"]::after { content: " ▼"; }
table.sortable th[data-order="asc"]::after { content: " ▲"; }
.headline { background: #eef4fb; border: 1px solid #c4d6ea; border-radius: 10px; padding: 14px 18px; }
.headline p { margin: 4px 0 8px; }
.headline .answer { font-size: 16px; }
.headline .cards { grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); }
.headline .card { background: white; }
.headline .card .value { font-size: 26px; }
.card small { display: block; font-size: 12.5px; font-weight: 400; color: var(--muted); }
.headline .accept { font-size: 15px; }
.synthetic { background: #fff4e5; border-left: 4px solid #e69f00; padding: 6px 10px; border-radius: 4px; }
.protocol { color: var(--muted); font-size: 12.5px; }
.conclusions { background: var(--bg); border-radius: 8px; padding: 4px 16px; margin: 6px 0 12px; }
.conclusions h3 { margin-top: 10px; }
.conclusions li { margin: 4px 0; }
table.grid-table td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
.pairs { display: grid; grid-template-columns: 1fr; gap: 12px; }
.pair { border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; display: grid;
        grid-template-columns: 1fr 1fr; gap: 4px 12px; font-size: 13px; }
.pair-title { grid-column: 1 / -1; font-weight: 600; }
.muted { color: var(--muted); font-weight: 400; }
figcaption { color: var(--muted); font-size: 12.5px; margin-top: 2px; }
details { margin: 10px 0; }
summary { cursor: pointer; font-weight: 600; margin-bottom: 8px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr)); gap: 12px; }
.product { border: 1px solid var(--line); border-left: 5px solid var(--line); border-radius: 6px; padding: 8px 10px;
           font-size: 13px; }
.product.right { border-left-color: var(--right); }
.product.wrong { border-left-color: var(--wrong); }
.verdict { font-weight: 600; font-size: 12.5px; margin-bottom: 6px; }
.right .verdict { color: var(--right); }
.wrong .verdict { color: var(--wrong); }
.thumbs { display: flex; gap: 4px; flex-wrap: wrap; margin-bottom: 6px; min-height: 40px; }
.thumbs img { width: 120px; height: 120px; object-fit: cover; border-radius: 4px; border: 1px solid var(--line); }
.noimg { color: var(--muted); font-style: italic; }
.truth { margin-bottom: 4px; }
.path { color: var(--muted); }
ol.preds { margin: 0; padding-left: 0; list-style: none; }
ol.preds li { display: grid; grid-template-columns: 50px 1fr; gap: 6px; padding: 2px 4px; border-radius: 3px; }
ol.preds .prob { font-variant-numeric: tabular-nums; font-size: 12px; padding-top: 1px; }
ol.preds .meter { display: block; height: 4px; background: #e3e8ee; border-radius: 2px; margin-top: 2px; }
ol.preds .meter span { display: block; height: 4px; background: #0072b2; border-radius: 2px; }
ol.preds li.hit { background: #e8f5ec; }
footer { color: var(--muted); font-size: 12px; text-align: center; padding: 16px; }
"""
