"""Small shared helpers: atomic writes, progress bars, logging, JSON."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
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
    "get_logger",
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


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool | None = None,
) -> Iterator[T]:
    """A tqdm bar with rate and ETA; quiet when stderr is not a terminal unless PRODCAT_PROGRESS=1."""
    from tqdm.auto import tqdm

    if disable is None:
        forced = os.environ.get("PRODCAT_PROGRESS")
        disable = (forced == "0") if forced is not None else not sys.stderr.isatty()
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, smoothing=0.1, mininterval=0.5
    )


def get_logger(name: str = "prodcat") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logging.getLogger("prodcat").handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("prodcat")
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    return logger
