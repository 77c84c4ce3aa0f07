"""Full softmax vs sampled softmax: one training step on random features, D = 1280, batch 1024 (CPU, 2 threads).

A step is forward + backward + optimizer step, through the real API (`build_classifier("linear", ...)`, identity
head, and `build_optimizer`). Both sides use the Adam family: the full softmax gets dense AdamW (torch's fused
kernel) over the (C, 1280) output layer; the sampled softmax (K = 1024 shared negatives, log-uniform, unique) gets
sparse row gradients and `RowWiseAdamW`, which touches only the batch's true rows and the K sampled rows. Phase
times (forward+backward, optimizer) are recorded inside the timed steps and reported beside the totals.

Results:
- softmax_speedup_5k / _50k / _500k: full step time / sampled step time at C = 5,270 / 50,000 / 500,000.
- full_softmax_vs_flop_floor: full step time / time of the same three plain matmuls
  ((B,D)x(D,C) forward, (B,C)x(C,D) and (C,B)x(B,D) backward); the worst ratio over the three sizes.
- sampled_1m_classes: C = 1,000,000, sampled loss + row-wise optimizer, a few dozen steps in a fresh process;
  value = its peak RSS in GB (goal <= 16), steps/s in details.

    python benchmarks/bench_softmax.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Shared, oversubscribed CPUs: with libgomp's default spin-then-wait barriers, a 2-thread op whose second thread
# was descheduled waits out the time slice (a 256-element log took 4 ms here instead of 24 us). PASSIVE makes idle
# threads sleep; it applies to both sides of every ratio alike and must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from prodcat.model import build_classifier, build_optimizer  # noqa: E402
from prodcat.model.samplers import LogUniformSampler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_samples, write_result  # noqa: E402

FULL = {"dim": 1280, "batch": 1024, "num_sampled": 1024, "sizes": (5270, 50_000, 500_000), "one_million": 1_000_000}
QUICK = {"dim": 256, "batch": 256, "num_sampled": 256, "sizes": (2000, 20_000), "one_million": 100_000}
REPEATS = {5270: 7, 50_000: 5, 500_000: 3}
SPEEDUP_NAMES = ("softmax_speedup_5k", "softmax_speedup_50k", "softmax_speedup_500k")
GOALS = {"softmax_speedup_5k": 4.0, "softmax_speedup_500k": 50.0}
FLOOR_GOAL = 1.5
MEMORY_GOAL_GB = 16.0


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


class Trainer:
    """One model + optimizer; `step()` runs a training step and records its phase times."""

    def __init__(self, loss: str, num_classes: int, dim: int, num_sampled: int, weight: torch.Tensor | None) -> None:
        torch.manual_seed(0)
        self.model = build_classifier(
            "linear", loss, (dim,), num_classes, dropout=0.0, num_sampled=num_sampled, sampler="log_uniform"
        )
        if weight is not None:  # share the big weight between both sides: one 2.6 GB copy at C = 500k, not two
            self.model.output.weight = weight
        # Named explicitly: the row-wise optimizer (sparse rows) is what makes 1 M classes fit; full softmax gets
        # torch's fused dense AdamW. This measures speed and memory, not accuracy.
        optimizer = "rowwise_adamw" if loss == "sampled" else "adamw"
        self.optimizer = build_optimizer(self.model, optimizer, lr=1e-3, weight_decay=1e-4)
        self.phases: dict[str, list[float]] = {"forward_backward": [], "optimizer": []}

    def step(self, features: torch.Tensor, targets: torch.Tensor) -> float:
        start = time.perf_counter()
        loss = self.model.loss(features, {"leaf": targets})
        loss.backward()
        middle = time.perf_counter()
        self.optimizer.step()
        # set_to_none frees the (C, D) gradient now, so the other side's timing does not run with it resident.
        self.optimizer.zero_grad(set_to_none=True)
        features.grad = None
        self.phases["forward_backward"].append(middle - start)
        self.phases["optimizer"].append(time.perf_counter() - middle)
        return float(loss.detach())


def _floor(features: torch.Tensor, weight: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            logits = torch.mm(features, weight.t())
            torch.mm(logits, weight)
            torch.mm(logits.t(), features)

    return run


def measure_size(num_classes: int, config: dict[str, Any], repeats: int) -> dict[str, Any]:
    dim, batch = config["dim"], config["batch"]
    generator = torch.Generator().manual_seed(1)
    # requires_grad: as below a trainable head, backward computes d(loss)/d(embedding) too (the floor's 3rd matmul).
    features = torch.randn(batch, dim, generator=generator).requires_grad_(True)
    targets = LogUniformSampler(num_classes, unique=False).sample(batch, generator).ids
    full = Trainer("softmax", num_classes, dim, config["num_sampled"], None)
    sampled = Trainer("sampled", num_classes, dim, config["num_sampled"], full.model.output.weight)
    samples = interleaved_samples(
        {
            "full": lambda: full.step(features, targets),
            "floor": _floor(features.detach(), full.model.output.weight.detach()),
            "sampled": lambda: sampled.step(features, targets),
        },
        repeats,
    )
    times = {name: statistics.median(values) for name, values in samples.items()}
    details = {
        "num_classes": num_classes,
        "dim": dim,
        "batch": batch,
        "num_sampled": config["num_sampled"],
        "repeats": repeats,
        "embedding_requires_grad": True,
        "full_step_s": times["full"],
        "sampled_step_s": times["sampled"],
        "matmul_floor_s": times["floor"],
        "full_forward_backward_s": statistics.median(full.phases["forward_backward"][1:]),
        "full_adamw_step_s": statistics.median(full.phases["optimizer"][1:]),
        "sampled_forward_backward_s": statistics.median(sampled.phases["forward_backward"][1:]),
        "sampled_rowwise_step_s": statistics.median(sampled.phases["optimizer"][1:]),
        "full_step_spread_s": [min(samples["full"]), max(samples["full"])],
        "sampled_step_spread_s": [min(samples["sampled"]), max(samples["sampled"])],
        "speedup": times["full"] / times["sampled"],
        "full_vs_floor": times["full"] / times["floor"],
    }
    print(
        f"C={num_classes:>9,}: full {times['full']:.4f} s (fwd+bwd {details['full_forward_backward_s']:.4f}, "
        f"AdamW {details['full_adamw_step_s']:.4f}), matmul floor {times['floor']:.4f} s, sampled "
        f"{times['sampled']:.4f} s (row-wise step {details['sampled_rowwise_step_s']:.4f}) -> speedup "
        f"{details['speedup']:.1f}x, full/floor {details['full_vs_floor']:.3f}",
        flush=True,
    )
    return details


def one_million(num_classes: int, config: dict[str, Any], steps: int) -> dict[str, Any]:
    """Train the sampled loss with the row-wise optimizer; run in a fresh process so ru_maxrss is its own."""
    dim, batch = config["dim"], config["batch"]
    generator = torch.Generator().manual_seed(2)
    rows = 8 * batch  # a small fixed training set: the loss must go down as it is memorised
    features = torch.randn(rows, dim, generator=generator).half()  # as the feature store keeps them
    targets = LogUniformSampler(num_classes, unique=False).sample(rows, generator).ids
    start = time.perf_counter()
    trainer = Trainer("sampled", num_classes, dim, config["num_sampled"], None)
    for group in trainer.optimizer.param_groups:
        group["lr"] = 1e-2
    build_s = time.perf_counter() - start
    probe = slice(0, 32)
    with torch.no_grad():
        full_before = float(trainer.model.output.full_loss(features[probe].float(), targets[probe]))
    losses, times = [], []
    for step in range(steps):
        index = torch.arange(step * batch, (step + 1) * batch) % rows
        begin = time.perf_counter()
        losses.append(trainer.step(features[index], targets[index]))
        times.append(time.perf_counter() - begin)
    with torch.no_grad():
        full_after = float(trainer.model.output.full_loss(features[probe].float(), targets[probe]))
    timed = times[2:]  # first steps: allocator and state warm-up
    return {
        "num_classes": num_classes,
        "dim": dim,
        "batch": batch,
        "num_sampled": config["num_sampled"],
        "steps": steps,
        "steps_per_s": len(timed) / sum(timed),
        "median_step_s": statistics.median(timed),
        "build_s": build_s,
        "sampled_loss_first_last": [losses[0], losses[-1]],
        "full_loss_on_32_train_rows_before_after": [full_before, full_after],
        "weight_gb": num_classes * dim * 4 / 1e9,
        "peak_rss_gb": _peak_rss_gb(),
    }


def _run_one_million(quick: bool) -> dict[str, Any]:
    command = [sys.executable, __file__, "--one-million-child"] + (["--quick"] if quick else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _report(
    name: str, value: float, unit: str, goal: float | None, direction: str, details: dict[str, Any], quick: bool
) -> None:
    if quick:
        print(f"BENCH {name}_quick {value:.4g} {unit} (quick: no result file)", flush=True)
    else:
        write_result(name, value, unit, goal, direction, details)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat, no result files")
    parser.add_argument("--one-million-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = QUICK if args.quick else FULL
    if args.one_million_child:
        print(json.dumps(one_million(config["one_million"], config, 6 if args.quick else 40)))
        return
    common = {
        "threads": 2,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "optimizers": "full: adamw (dense, fused); sampled: rowwise_adamw (sparse grads + RowWiseAdamW)",
    }
    # Each result is written as soon as it is measured: the 500k case needs ~12 GB and may be the one that fails.
    million = _run_one_million(args.quick)
    print(
        f"C={million['num_classes']:,}: {million['steps_per_s']:.2f} steps/s, peak RSS "
        f"{million['peak_rss_gb']:.2f} GB, full loss on train rows "
        f"{million['full_loss_on_32_train_rows_before_after']}",
        flush=True,
    )
    _report("sampled_1m_classes", million["peak_rss_gb"], "GB", MEMORY_GOAL_GB, "<=", {**common, **million}, args.quick)
    per_size = []
    for num_classes, name in zip(config["sizes"], SPEEDUP_NAMES, strict=False):
        details = measure_size(num_classes, config, 1 if args.quick else REPEATS.get(num_classes, 3))
        per_size.append(details)
        _report(name, details["speedup"], "x", GOALS.get(name), ">=", {**common, **details}, args.quick)
    worst = max(per_size, key=lambda d: d["full_vs_floor"])
    floor_details = {
        **common,
        "worst_at_num_classes": worst["num_classes"],
        "per_size": {str(d["num_classes"]): d["full_vs_floor"] for d in per_size},
        "what": "full softmax step (fused linear+CE fwd/bwd incl. d/d(embedding), dense fused AdamW step) / "
        "the three plain matmuls",
    }
    _report("full_softmax_vs_flop_floor", worst["full_vs_floor"], "ratio", FLOOR_GOAL, "<=", floor_details, args.quick)


if __name__ == "__main__":
    main()
