"""The levers table: every lever in one table, as HTML (the report) and Markdown (RUN/eval/levers.md).

Two kinds of rows. A run's own levers (`metrics["levers"]` of RUN/eval/metrics.json, measured by `prodcat evaluate`
on its reported split: temperature, logit adjustment, twins, runs one change apart) and the levers that need their
own extraction, head or data (product head, flip TTA, OCR, other backbones, prototypes), measured by their own
scripts and copied from benchmarks/results into `levers_bench.json` beside this file, each row naming its source
JSON, split, n, seeds and data (synthetic). `levers_table_html(metrics, bench=bench_rows())` shows both.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prodcat.report.markup import esc, markdown_table, table

__all__ = ["HEADERS", "BENCH_FILE", "bench_rows", "levers_rows", "levers_table_html", "levers_table_markdown"]

HEADERS = (
    "lever",
    "chosen on val",
    "Δ product top-1 [95% CI]",
    "Δ macro accuracy [95% CI]",
    "Δ ECE [95% CI]",
    "verdict",
    "extra cost (time; memory)",
)
MEASURED_ON = "measured on (split, n, seeds, data, source)"
BENCH_FILE = Path(__file__).with_name("levers_bench.json")


@functools.cache
def bench_rows() -> tuple[dict[str, Any], ...]:
    """The levers measured by their own scripts (packaged copy of benchmarks/results); () if the copy is absent."""
    try:
        return tuple(json.loads(BENCH_FILE.read_text(encoding="utf-8"))["rows"])
    except (OSError, ValueError, KeyError):
        return ()


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
    """The run's levers as plain-text cells, one list per lever (in HEADERS order)."""
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


def _run_measured_on(metrics: dict[str, Any]) -> str:
    block, run = metrics.get("levers") or {}, metrics.get("run", "the best run")
    return f"this run ({run}): {block.get('split', '?')}, n = {block.get('n', 0):,}, 1 seed"


def _bench_cells(row: dict[str, Any]) -> list[str]:
    n = row.get("n")
    measured = (
        f"{row.get('split', '?')}, n = {n:,}" if isinstance(n, int) else f"{row.get('split', '?')}, n = {n}"
    ) + f", {row.get('seeds', '?')} seeds; {row.get('data', '')}; {row.get('source', '')}"
    cells = [row.get(key, "") for key in ("lever", "detail", "top1", "macro", "ece", "verdict", "cost")]
    return [str(cell) for cell in cells] + [measured]


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


BENCH_CAPTION = (
    "Rows measured by their own scripts (they need their own extraction, head or data) on synthetic demo sets of "
    "other sizes: each names its split, n, seeds and source JSON; changes in percentage points against the "
    "default (Lite0, linear head, mean-of-pictures aggregation, no TTA, pictures only). Nothing here says what a "
    "lever does on Cdiscount's photos."
)


def levers_table_html(metrics: dict[str, Any], note: str | None = None, bench: Sequence[dict[str, Any]] = ()) -> str:
    """Every lever in one table: the run's own rows, then `bench` rows (e.g. `bench_rows()`), each saying where it
    was measured; an explanatory <p> instead of the run's rows when it has none. `note` joins the caption (e.g.
    "Demo data is synthetic ...")."""
    rows = [[*cells, _run_measured_on(metrics)] for cells in levers_rows(metrics)]
    parts = []
    if rows:
        parts.append(f'<p class="caption">{esc(_caption(metrics, note))}</p>')
    else:
        parts.append(
            "<p>No levers of this run: it was evaluated before evaluate measured levers; re-run `prodcat evaluate`.</p>"
        )
    if bench:
        parts.append(f'<p class="caption">{esc(BENCH_CAPTION)}</p>')
        rows += [_bench_cells(row) for row in bench]
    if not rows:
        return "".join(parts)
    cells = [[esc(cell) for cell in row] for row in rows]
    notes = "".join(f"<p class='note'>{esc(text)}</p>" for text in (metrics.get("levers") or {}).get("notes", []))
    return "".join(parts) + table((*HEADERS, MEASURED_ON), cells, "levers") + notes


def levers_table_markdown(metrics: dict[str, Any], note: str | None = None) -> str:
    """The run's own levers in Markdown, caption and notes as paragraphs (RUN/eval/levers.md)."""
    notes = (metrics.get("levers") or {}).get("notes", [])
    return "\n".join([_caption(metrics, note), "", markdown_table(HEADERS, levers_rows(metrics)), *notes]) + "\n"
