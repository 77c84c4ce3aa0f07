"""Issue 14, lever 1: a learned product head (`gated_product`) against the per-picture linear head + the best of
mean_prob / mean_logprob / vote (chosen on val), product top-1 on the holdout. Demo data is synthetic: say so.

Same loss (full softmax), optimizer (adamw), lr, weight decay, epochs, batch size and seeds for both arms; the only
change is the head. The linear head's batches are pictures, the product head's are products (its step count is
lower by the mean pictures per product: same epochs over the same pictures); `--budget steps` instead gives the
product head as many optimizer steps as the linear head of the same seed took (max_steps). Each run is evaluated by
`prodcat evaluate` (choices on val, numbers on holdout); the product head's number is its own `product_head`
aggregation (image top-1 for it: single pictures fed through it as one-picture products).

    python benchmarks/bench_product_head.py [--quick] [--workdir W] [--seeds 3] [--budget epochs|steps]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402
from _demo_store import FEATURES, SYNTHETIC, demo_store  # noqa: E402
from prodcat.config import EvalConfig, TrainConfig  # noqa: E402
from prodcat.evaluate.evaluation import evaluate, proportion_ci  # noqa: E402
from prodcat.predict.predictor import PRODUCT_HEAD  # noqa: E402
from prodcat.train.loop import run_summary, train  # noqa: E402

SETTINGS = {"full": {"epochs": 12.0, "batch_size": 128}, "quick": {"epochs": 4.0, "batch_size": 64}}


def _arm(workdir: Path, head: str, seed: int, settings: dict[str, Any], max_steps: int | None = None) -> dict:
    suffix = "" if max_steps is None else f"-steps{max_steps}"
    config = TrainConfig(
        workdir=str(workdir), store=FEATURES, head=head, loss="softmax", optimizer="adamw", seed=seed,
        run_name=f"bench14-{head}-s{seed}{suffix}", overwrite=True, device="cpu", eval_every=50, max_steps=max_steps,
        **settings,
    )  # fmt: skip
    started = time.perf_counter()
    run = train(config)
    seconds = time.perf_counter() - started
    metrics = evaluate(EvalConfig(run=str(run), split="holdout", bootstrap_resamples=200))
    product = metrics["product"]
    n = product["n"]
    if head == "linear":
        method, chosen_by = product["aggregation"], "best of mean_prob/mean_logprob/vote on val"
    else:
        method, chosen_by = PRODUCT_HEAD, "the product head itself"
    top1 = product["methods"][method]["top1"]
    hits = round(top1 * n)
    return {
        "head": head, "seed": seed, "aggregation": method, "aggregation_chosen_by": chosen_by,
        "product_top1": top1, "product_top1_ci95": proportion_ci(hits, n), "n_products": n,
        "evaluate_choice": product["aggregation"],
        "methods_top1": {m: b["top1"] for m, b in product["methods"].items()},
        "image_top1": metrics["image"]["top1"], "train_seconds": run_summary(run)["train_seconds"],
        "wall_seconds": seconds, "steps": run_summary(run)["step"],
    }  # fmt: skip


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f} ± n/a (one seed)"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} (sd over {len(values)} seeds)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="reuse (or build) this demo work directory")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", choices=("epochs", "steps"), default="epochs")
    args = parser.parse_args()
    torch.set_num_threads(2)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench14-"))
    demo_store(workdir, args.quick)
    settings = SETTINGS["quick" if args.quick else "full"]
    runs = []
    for seed in range(args.seeds):
        runs.append(_arm(workdir, "linear", seed, settings))
        steps = runs[-1]["steps"] if args.budget == "steps" else None
        runs.append(_arm(workdir, "gated_product", seed, settings, max_steps=steps))
    by_head = {h: [r for r in runs if r["head"] == h] for h in ("linear", "gated_product")}
    deltas = [g["product_top1"] - lin["product_top1"] for lin, g in zip(by_head["linear"], by_head["gated_product"])]
    for head, rows in by_head.items():
        for row in rows:
            lo, hi = row["product_top1_ci95"]
            print(f"{head:<14} seed {row['seed']}: product top-1 {row['product_top1']:.4f} [{lo:.4f}, {hi:.4f}] "
                  f"(holdout, n = {row['n_products']}; {row['aggregation']})")  # fmt: skip
        print(f"{head:<14} {_spread([r['product_top1'] for r in rows])}")
    print(f"product head - linear: {_spread(deltas)}  [{SYNTHETIC}]")
    details = {
        "note": SYNTHETIC, "split": "holdout", "selection_split": "val", "settings": settings, "budget": args.budget,
        "same_for_both": "softmax, adamw, default lr/weight decay, epochs, batch size, seeds; only the head differs",
        "runs": runs, "delta_per_seed": deltas,
        "linear": _spread([r["product_top1"] for r in by_head["linear"]]),
        "gated_product": _spread([r["product_top1"] for r in by_head["gated_product"]]),
    }  # fmt: skip
    if not args.quick:
        name = "product_head_minus_linear_top1" + ("" if args.budget == "epochs" else "_equal_steps")
        write_result(name, statistics.mean(deltas), "product top-1", None, ">=", details)


if __name__ == "__main__":
    main()
