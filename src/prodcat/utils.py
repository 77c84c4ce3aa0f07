"""Small shared helpers: atomic writes, progress bars, logging, JSON."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json",
    "write_parquet",
    "read_json",
    "progress",
    "format_seconds",
    "LogProgress",
    "get_logger",
    "log_to_file",
]

T = TypeVar("T")
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Binary handle on a temp file beside `path`, renamed over it on success and removed on any error, so a crash
    never leaves a half-written file under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs (reports, stores) should read like normal files
        with os.fdopen(fd, "wb", buffering=1 << 20) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write(path: Path, data: bytes) -> Path:
    with atomic_open(path) as handle:
        handle.write(data)
    return path


def write_parquet(path: str | Path, table: Any) -> Path:
    """Write a pyarrow Table atomically."""
    import pyarrow.parquet as pq

    with atomic_open(path) as handle:
        pq.write_table(table, handle)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return _atomic_write(Path(path), data)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return _atomic_write(Path(path), text.encode("utf-8"))


def write_json(path: str | Path, payload: Any) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays show up in metrics; make them plain JSON.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class LogProgress:
    """Progress for logs (CI, nohup, `| tee`): one line every `every` seconds with count, rate and ETA, and a closing
    line. Quacks like the tqdm calls prodcat makes (update, set_postfix, close, iteration)."""

    def __init__(
        self, iterable: Iterable[T] | None, total: int | None, desc: str, unit: str, every: float, enabled: bool = True
    ) -> None:
        self.iterable, self.total, self.desc, self.unit, self.every = iterable, total, desc, unit, every
        self.enabled, self.n, self.postfix, self.closed = enabled, 0, "", False
        self.start = self.last = time.perf_counter()
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[T]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{key}={value}" for key, value in values.items())

    def update(self, count: int = 1) -> None:
        self.n += count
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            _progress_log.info("%s", self.line(now))

    def line(self, now: float, done: bool = False) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.n / elapsed
        if done:
            text = f"{self.desc}: done, {self.n:,} {self.unit} in {format_seconds(elapsed)} ({rate:,.1f} {self.unit}/s)"
        elif self.total:
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            share = 100.0 * self.n / self.total
            text = (
                f"{self.desc}: {self.n:,}/{self.total:,} {self.unit} ({share:.0f}%), {rate:,.1f} {self.unit}/s, "
                f"ETA {format_seconds(eta)}"
            )
        else:
            text = f"{self.desc}: {self.n:,} {self.unit}, {rate:,.1f} {self.unit}/s"
        return f"{text} {self.postfix}".rstrip()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.enabled and self.n:
                _progress_log.info("%s", self.line(time.perf_counter(), done=True))


def format_seconds(seconds: float) -> str:
    """12s, 3m05s, 2h01m: short enough for a progress line."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool | None = None,
) -> Any:
    """Progress with rate and ETA: a tqdm bar in a terminal; elsewhere (CI, nohup, a pipe) a log line every ~20 s
    (PRODCAT_PROGRESS_EVERY seconds) and a closing line. PRODCAT_PROGRESS=1 forces the bar, 0 silences both;
    disable=True (e.g. non-zero ranks) silences both."""
    forced = os.environ.get("PRODCAT_PROGRESS")
    if disable or forced == "0":
        return LogProgress(iterable, total, desc, unit, every=float("inf"), enabled=False)
    if forced == "1" or (forced is None and sys.stderr.isatty()):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1, mininterval=0.5)
    every = float(os.environ.get("PRODCAT_PROGRESS_EVERY", "20"))
    get_logger()  # make sure the prodcat handler exists before the first line
    return LogProgress(iterable, total, desc, unit, every=every)


def get_logger(name: str = "prodcat") -> logging.Logger:
    """The `prodcat` logger tree, with one stderr handler on its root."""
    logger = logging.getLogger(name)
    if not logging.getLogger("prodcat").handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("prodcat")
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    return logger


def log_to_file(path: str | Path) -> Path:
    """Also write prodcat's log (progress lines included) to `path`, appending; once per path per process."""
    path = Path(path).resolve()
    root = get_logger()
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in root.handlers):
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    return path


_progress_log = logging.getLogger("prodcat.progress")
