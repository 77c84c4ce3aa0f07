"""Every lever in one table: the run's own rows and the benchmark rows, each saying where it was measured; the
packaged benchmark copy matches benchmarks/results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prodcat.report.levers import HEADERS, bench_rows, levers_table_html, levers_table_markdown

REPO = Path(__file__).resolve().parents[2]
LEVERS = ("product head", "flip test-time augmentation", "OCR", "EfficientNet-Lite1", "TF-faithful", "prototypes")


def _run_metrics() -> dict:
    row = {
        "lever": "temperature scaling",
        "detail": "T = 0.54 (after tau)",
        "top1": {"before": 0.8, "after": 0.8, "change": 0.0, "change_ci95": [0.0, 0.0]},
        "macro": None,
        "ece": {"before": 0.27, "after": 0.07, "change": -0.2, "change_ci95": [-0.22, -0.13]},
        "verdict": "helps (ece)",
        "cost": {"time": "0.01 s on val"},
    }
    return {"run": "compare-softmax-adamw-s0", "levers": {"split": "holdout", "n": 354, "rows": [row], "notes": []}}


def test_bench_rows_name_split_n_seeds_synthetic_data_and_source() -> None:
    rows = bench_rows()
    assert [next(name for name in LEVERS if name in row["lever"]) for row in rows] == list(LEVERS)
    for row in rows:
        assert row["source"].startswith("benchmarks/results/") and row["source"].endswith(".json")
        assert row["split"].startswith(("holdout", "val")) and row["n"] and row["seeds"] == 3
        assert "synthetic" in row["data"]


@pytest.mark.parametrize("row", bench_rows(), ids=lambda row: Path(row["source"]).stem)
def test_packaged_bench_rows_match_their_source(row: dict) -> None:
    source = REPO / row["source"]
    if not source.is_file():
        pytest.skip(f"{source} is not in this checkout")
    measured = json.loads(source.read_text(encoding="utf-8"))
    # A re-measured benchmark changes its value or date: update its row in src/prodcat/report/levers_bench.json.
    assert (row["value"], row["when"]) == (measured["value"], measured.get("when")), row["source"]


def test_one_table_holds_the_run_s_levers_and_the_bench_levers() -> None:
    metrics = _run_metrics()
    page = levers_table_html(metrics, note="Demo data is synthetic.", bench=bench_rows())
    assert page.count("<table") == 1 and page.count("<tr>") == 1 + 1 + len(bench_rows())
    assert "measured on (split, n, seeds, data, source)" in page
    assert "this run (compare-softmax-adamw-s0): holdout, n = 354, 1 seed" in page
    for row in bench_rows():
        assert row["source"] in page
    assert "holdout, n = 116, 3 seeds; synthetic demo: 600 products / 20 leaves" in page  # flip TTA
    assert "Demo data is synthetic." in page and "Nothing here says what a lever does on Cdiscount" in page
    # Without the run's levers the bench rows still show, with a line saying how to get the run's own.
    assert "re-run `prodcat evaluate`" in levers_table_html({}, bench=bench_rows())
    assert "<table" not in levers_table_html({})


def test_markdown_keeps_the_run_s_own_levers() -> None:
    markdown = levers_table_markdown(_run_metrics())
    assert markdown.count("\n| ") == 3 and "| temperature scaling |" in markdown  # header, rule, one row
    assert markdown.splitlines()[2] == "| " + " | ".join(HEADERS) + " |"
