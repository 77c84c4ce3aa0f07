"""Shared helpers for `make bench`: result JSON files and the BENCH summary line (see ../shared/BENCHMARKS.md)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name and its vector extensions that move speed ratios (AVX2, AVX-512, bf16, AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return f"{name or 'unknown'} ({' '.join(f for f in wanted if f in flags) or 'no AVX2'})"


def machine_info(device: str = "cpu") -> dict[str, Any]:
    import torch

    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__.split("+")[0],
        "device": device,
        "threads": torch.get_num_threads(),
        "platform": platform.machine(),
    }


def write_result(
    name: str, value: float, unit: str, goal: float | None, direction: str, details: dict[str, Any], device: str = "cpu"
) -> dict[str, Any]:
    """Write benchmarks/results/<name>.json and print the one-line summary."""
    if goal is None:
        ok = True
    elif direction == ">=":
        ok = value >= goal
    else:
        ok = value <= goal
    payload = {
        "name": name,
        "value": round(float(value), 4),
        "unit": unit,
        "goal": goal,
        "direction": direction,
        "ok": bool(ok),
        "details": details,
        "when": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(device),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"BENCH {name} {payload['value']} {unit} goal {direction} {goal} {'ok' if ok else 'MISS'}", flush=True)
    return payload


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_samples(fns: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each function, run A B A B ... so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, interleaved (see interleaved_samples)."""
    return {name: statistics.median(values) for name, values in interleaved_samples(fns, repeats, warmup).items()}
