"""Stage records of a rehearsal: wall time, peak RSS, bytes written, throughput, each stage in its own process.

A stage runs in a fresh `spawn` child, so its peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss` read in the child at
the end) is the stage's own and not the driver's or an earlier stage's. Disk written is the growth of the work
directory over the stage (what it leaves on disk) and, beside it, the bytes the child sent to storage
(`/proc/self/io` write_bytes: temp files and rewrites included) where the kernel reports them.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import platform
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from prodcat.utils import get_logger

__all__ = ["StageRecord", "run_stage", "directory_bytes", "machine_info"]

log = get_logger("prodcat.rehearsal")


@dataclasses.dataclass
class StageRecord:
    """What one stage cost."""

    name: str
    seconds: float
    peak_rss_mb: float
    disk_growth_mb: float
    written_mb: float | None  # bytes the stage's process wrote to storage; None where /proc/self/io is unreadable
    items: int
    unit: str
    throughput: float | None  # items per second of wall time
    isolated: bool  # peak RSS of the stage's own process (True) or of the driver process so far (False)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def directory_bytes(path: str | Path) -> int:
    """Bytes of the regular files under `path` (0 when it does not exist yet); a hard-linked file counts once
    (checkpoints link `best` to `last`)."""
    total, seen = 0, set()
    for root, _, files in os.walk(path):
        for name in files:
            try:
                info = os.lstat(os.path.join(root, name))
            except FileNotFoundError:  # a temp file renamed between listing and stat
                continue
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_size
    return total


def _written_bytes() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _measured(target: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], float, int | None]:
    """Run `module:function(**kwargs)`; returns (its result, peak RSS MB of this process, bytes written)."""
    module, function = target.split(":")
    before = _written_bytes()
    result = getattr(importlib.import_module(module), function)(**kwargs)
    after = _written_bytes()
    written = None if before is None or after is None else after - before
    return result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, written


def run_stage(
    name: str, target: str, kwargs: dict[str, Any], workdir: str | Path, isolate: bool = True
) -> tuple[dict[str, Any], StageRecord]:
    """Run one stage and record it. `target` returns a dict with `items` and `unit` (what its throughput counts)."""
    log.info("== rehearsal stage %s", name)
    before = directory_bytes(workdir)
    start = time.perf_counter()
    if isolate:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            result, peak_mb, written = pool.submit(_measured, target, kwargs).result()
    else:
        result, peak_mb, written = _measured(target, kwargs)
    seconds = time.perf_counter() - start
    items = int(result.get("items", 0))
    record = StageRecord(
        name=name,
        seconds=round(seconds, 2),
        peak_rss_mb=round(peak_mb, 1),
        disk_growth_mb=round((directory_bytes(workdir) - before) / 2**20, 1),
        written_mb=None if written is None else round(written / 2**20, 1),
        items=items,
        unit=str(result.get("unit", "")),
        throughput=round(items / seconds, 2) if seconds > 0 and items else None,
        isolated=isolate,
        details={k: v for k, v in result.items() if k not in ("items", "unit")},
    )
    log.info("   %s: %.1f s, peak RSS %.0f MB, %s %s", name, seconds, peak_mb, items, record.unit)
    return result, record


def machine_info() -> dict[str, Any]:
    """CPU count and model, load average: the context every timing needs on a shared machine."""
    model = ""
    try:
        model = next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), ""
        )
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.machine(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
