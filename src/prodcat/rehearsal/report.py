"""The "at scale" report section: stage table, results per loss and accuracy-vs-time curves (W/reports/at_scale/)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from prodcat.report.markup import esc, figure, page, table
from prodcat.utils import atomic_write_text, write_json

__all__ = ["write_at_scale", "check_submission", "arm_summary"]


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return esc(str(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """The report's table helper over cells formatted here (n/a for missing, thousands separators)."""
    return table(header, [[_cell(value) for value in row] for row in rows], "numbers")


def arm_summary(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (head, loss): holdout product top-1 over seeds (mean, spread; n/a for one seed) and cost."""
    arms: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs.values():
        arms.setdefault((run.get("head", "linear"), run["loss"]), []).append(run)
    out = []
    for (head, loss), members in arms.items():
        top1 = [m["holdout"]["product_top1"] for m in members if "holdout" in m]
        first = members[0].get("holdout", {})
        out.append({
            "head": head, "loss": loss, "seeds": len(members),
            "holdout_product_top1": statistics.mean(top1) if top1 else None,
            "seed_spread": [min(top1), max(top1)] if len(top1) > 1 else None,
            "seed0_ci95": first.get("product_top1_ci95"), "seed0_macro": first.get("product_macro"),
            "seed0_head_medium_tail": [first.get("frequency", {}).get(g) for g in ("head", "medium", "tail")],
            "n_products": first.get("products"),
            "train_seconds": statistics.mean(m["train"]["train_seconds"] for m in members),
            "epoch_seconds": statistics.mean(m["train"]["epoch_seconds"] for m in members),
            "epoch_basis": members[0]["train"]["epoch_seconds_basis"],
        })  # fmt: skip
    return out


def _curves(runs: dict[str, dict[str, Any]], path: Path) -> bool:
    """Val top-1 against training seconds, one line per run (seeds after 0 lighter), drawn by prodcat.report."""
    from prodcat.report.runs import plot_time_curves

    run_dirs = {name: Path(run["train"]["run"]) for name, run in runs.items()}
    faded = [name for name, run in runs.items() if run.get("seed", 0) != 0]
    return plot_time_curves(path, run_dirs, faded, title="accuracy vs time at scale (synthetic data)")


def write_at_scale(workdir: str | Path, payload: dict[str, Any]) -> Path:
    """W/reports/at_scale/index.html (+ curves.png, summary.json): the section the main report can link or embed."""
    out = Path(workdir) / "reports" / "at_scale"
    runs = payload.get("results", {}).get("runs", {})
    arms = arm_summary(runs)
    has_curves = _curves(runs, out / "curves.png")
    stages = [[s["name"], s["seconds"], s["peak_rss_mb"], s["disk_growth_mb"], s["written_mb"], s["items"], s["unit"],
               s["throughput"]] for s in payload["stages"]]  # fmt: skip
    results = [[a["head"], a["loss"], a["seeds"], a["holdout_product_top1"],
                "n/a" if a["seed_spread"] is None else f"{a['seed_spread'][0]:.3f}-{a['seed_spread'][1]:.3f}",
                "n/a" if not a["seed0_ci95"] else f"{a['seed0_ci95'][0]:.3f}-{a['seed0_ci95'][1]:.3f}",
                a["seed0_macro"], *a["seed0_head_medium_tail"], a["n_products"], a["train_seconds"],
                a["epoch_seconds"], a["epoch_basis"]] for a in arms]  # fmt: skip
    parts = [
        f"<h2>At scale ({esc(payload['kind'])})</h2>",
        f"<p>{esc(payload['note'])} Machine: {esc(json.dumps(payload.get('machine_before', {})))}</p>",
        "<h3>Stages</h3>",
        _table(["stage", "seconds", "peak RSS MB", "disk growth MB", "written MB", "items", "unit", "items/s"], stages),
        "<h3>Losses (selected on val, reported on holdout)</h3>",
        _table(
            [
                "head",
                "loss",
                "seeds",
                "holdout product top-1 (mean)",
                "seed spread (min-max)",
                "seed 0 95% CI",
                "seed 0 macro",
                "head",
                "medium",
                "tail",
                "n products",
                "train s",
                "epoch s",
                "epoch basis",
            ],
            results,
        ),  # fmt: skip
    ]
    if has_curves:
        parts.append(
            "<h3>Accuracy vs time</h3>" + figure(out / "curves.png", "val top-1 vs training seconds", embed=False)
        )
    atomic_write_text(out / "index.html", page("prodcat at scale", "\n".join(parts)))
    write_json(out / "summary.json", {"arms": arms, "stages": payload["stages"]})
    return out / "index.html"


def check_submission(workdir: str | Path, path: str | Path) -> dict[str, Any]:
    """Exactly one row per test product of the catalog, in catalog order, every category in the taxonomy."""
    import pyarrow.csv as pcsv

    from prodcat.data.catalog import load_catalog
    from prodcat.data.taxonomy import Taxonomy
    from prodcat.paths import WorkPaths

    table = pcsv.read_csv(path)
    expected = load_catalog(workdir, "test")["product_id"].to_numpy()
    ids = table["_id"].to_numpy()
    known = np.isin(table["category_id"].to_numpy(), Taxonomy.load(WorkPaths(workdir).taxonomy).category_ids)
    ok = table.column_names == ["_id", "category_id"] and np.array_equal(ids, expected) and bool(known.all())
    if not ok:
        raise ValueError(f"{path}: not one row per test product in catalog order with known categories")
    return {"rows": int(table.num_rows), "in_catalog_order": True, "categories_known": True}
