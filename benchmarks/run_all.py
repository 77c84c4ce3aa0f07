"""`make bench`: run every benchmarks/bench_*.py in turn, then print a table of all results.

Each benchmark measures its ratio side by side in one run and writes benchmarks/results/<name>.json
(method: ../shared/BENCHMARKS.md). Pass --quick for a smoke run with tiny sizes, or names to run a subset:
    python benchmarks/run_all.py [--quick] [ingest forward ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# GPU-only benchmarks run through benchmarks/gpu_extract.sh on a lent GPU machine, never here. The accuracy
# experiments of issue 14 (backbone table, flip TTA, product head, new categories, Lite0 fidelity), several minutes
# each and no speed goal among them, are run on their own: `python benchmarks/bench_NAME.py`.
SKIP = {
    "bench_gpu_extract",
    "bench_backbones",
    "bench_tta",
    "bench_product_head",
    "bench_new_categories",
    "bench_lite0_fidelity",
}


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    wanted = {name for name in argv if not name.startswith("--")}
    scripts = [p for p in sorted(HERE.glob("bench_*.py")) if p.stem not in SKIP]
    if wanted:
        scripts = [p for p in scripts if p.stem.removeprefix("bench_") in wanted]
    started = time.time()
    failures = []
    for script in scripts:
        print(f"\n=== {script.stem}", flush=True)
        code = subprocess.call([sys.executable, str(script), *(["--quick"] if quick else [])])
        if code:
            failures.append(script.stem)
    print_table(started)
    if failures:
        print(f"benchmarks that crashed: {', '.join(failures)}")
    return 1 if failures else 0


def _number(value: object) -> str:
    """A result's value as the table shows it (a few results hold a word, e.g. the fusion a run kept)."""
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def print_table(since: float) -> None:
    rows = []
    for path in sorted((HERE / "results").glob("*.json")):
        result = json.loads(path.read_text())
        fresh = path.stat().st_mtime >= since
        goal = "" if result.get("goal") is None else f"{result['direction']} {result['goal']}"
        status = "ok" if result.get("ok") else "MISS"
        rows.append(
            (
                result["name"],
                f"{_number(result['value'])} {result['unit']}",
                goal,
                status,
                result.get("machine", {}).get("device", "?"),
                "this run" if fresh else result.get("when", ""),
            )
        )
    widths = [
        max(len(str(row[i])) for row in rows + [("name", "value", "goal", "ok", "device", "when")]) for i in range(6)
    ]
    header = ("name", "value", "goal", "ok", "device", "when")
    print()
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
