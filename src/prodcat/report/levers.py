"""The levers table of an evaluated run (`metrics["levers"]` of RUN/eval/metrics.json) as HTML and Markdown.

Plain strings, no state: report/html.py includes `levers_table_html(metrics)`; evaluate writes
`levers_table_markdown(metrics)` to RUN/eval/levers.md (and a README can paste it).
"""

from __future__ import annotations

import html
from typing import Any

__all__ = ["HEADERS", "levers_rows", "levers_table_html", "levers_table_markdown"]

HEADERS = (
    "lever",
    "chosen on val",
    "Δ product top-1 [95% CI]",
    "Δ macro accuracy [95% CI]",
    "Δ ECE [95% CI]",
    "verdict",
    "extra cost (time; memory)",
)


def _change(entry: dict[str, Any] | None) -> str:
    """'+1.2 pts [-0.4, +2.8]' (percentage points); 'n/a' when the lever does not give this number."""
    if not entry:
        return "n/a"
    text = f"{100 * entry['change']:+.2f} pts"
    interval = entry.get("change_ci95")
    if interval:
        text += f" [{100 * interval[0]:+.2f}, {100 * interval[1]:+.2f}]"
    return text + f" ({100 * entry['before']:.2f} → {100 * entry['after']:.2f})"


def _cost(cost: dict[str, str]) -> str:
    parts = [cost[key] for key in ("time", "memory", "inference") if cost.get(key)]
    return "; ".join(parts) or "n/a"


def levers_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """The table's cells as plain text, one list per lever (in HEADERS order)."""
    rows = []
    for row in (metrics.get("levers") or {}).get("rows", []):
        detail = row.get("detail", "")
        if row.get("note"):
            detail += f" ({row['note']})"
        rows.append(
            [
                row["lever"],
                detail,
                _change(row.get("top1")),
                _change(row.get("macro")),
                _change(row.get("ece")),
                row.get("verdict", ""),
                _cost(row.get("cost") or {}),
            ]
        )
    return rows


def _caption(metrics: dict[str, Any], note: str | None) -> str:
    block = metrics.get("levers") or {}
    parts = [
        f"Levers on {block.get('split', '?')} (n = {block.get('n', 0):,} products), each against "
        f"{block.get('baseline', '')}.",
        f"Changes in percentage points (before → after); {block.get('interval', '')}; ECE: {block.get('ece', '')};",
        f"seed spread {block.get('seed_spread', 'n/a')}. A lever whose interval holds 0 is reported as 'no clear",
        "change', one that goes the wrong way as 'hurts'.",
    ]
    return " ".join(parts + ([note] if note else []))


def levers_table_html(metrics: dict[str, Any], note: str | None = None) -> str:
    """A self-contained <table> (with caption and notes) of every lever; an explanatory <p> when there is none.
    `note` joins the caption (e.g. "Demo data is synthetic ...")."""
    rows = levers_rows(metrics)
    if not rows:
        return (
            "<p>No levers table: this run was evaluated before evaluate measured levers; re-run `prodcat evaluate`.</p>"
        )
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    notes = "".join(
        f"<p class='note'>{html.escape(note)}</p>" for note in (metrics.get("levers") or {}).get("notes", [])
    )
    return (
        f'<table class="levers"><caption>{html.escape(_caption(metrics, note))}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}"
    )


def levers_table_markdown(metrics: dict[str, Any], note: str | None = None) -> str:
    """The same table in Markdown, caption and notes as paragraphs."""
    rows = levers_rows(metrics)

    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    table = [line(HEADERS), line(["---"] * len(HEADERS)), *(line(row) for row in rows)]
    notes = (metrics.get("levers") or {}).get("notes", [])
    return "\n".join([_caption(metrics, note), "", *table, "", *notes]) + "\n"
