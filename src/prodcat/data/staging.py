"""Ingest writes into a staging folder and swaps it in: a re-ingest replaces all of its outputs or none of them.

`W/.ingest-staging-<pid>/` gets W's layout for what ingest owns (`WorkPaths.ingest_outputs`: taxonomy.parquet and
catalog/); a `COMPLETE` marker is written after the last file. The swap moves W's old outputs into
`W/.ingest-old-<pid>/`, renames the staged ones in, then deletes both folders. A kill at any point leaves folders
that `recover` (run at the start of every ingest) resolves, and logs what it did:
- a staging folder with its marker: the swap was under way; it is finished (an output still staged means the one
  in W is the old one, so the rule is idempotent);
- a staging folder without its marker: ingest died while writing, before W was touched; it is deleted;
- an old folder without a staging folder: the swap had finished; it is deleted.
A folder whose pid is a running process other than this one belongs to a concurrent ingest: an error, nothing moved.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from prodcat.paths import WorkPaths
from prodcat.utils import get_logger

__all__ = ["StagingError", "recover", "staged", "STAGING_PREFIX", "OLD_PREFIX"]

STAGING_PREFIX, OLD_PREFIX, MARKER = ".ingest-staging-", ".ingest-old-", "COMPLETE"
log = get_logger("prodcat.ingest")


class StagingError(RuntimeError):
    """Another ingest is writing the same working directory, or the swap could not be completed."""


@contextlib.contextmanager
def staged(root: str | Path) -> Iterator[WorkPaths]:
    """WorkPaths of a fresh staging folder; on a clean exit its outputs replace W's, on an error it is removed."""
    root = Path(root)
    recover(root)
    staging = root / f"{STAGING_PREFIX}{os.getpid()}"
    staging.mkdir(parents=True)
    try:
        yield WorkPaths(staging)
        (staging / MARKER).write_text("all outputs written\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        _roll_forward(root, staging)
    except Exception as error:
        try:  # a second try (a transient error); what is still left, the next ingest finishes
            _roll_forward(root, staging)
        except Exception:  # noqa: BLE001 - reported below with the first error
            raise StagingError(
                f"{root}: swapping in the new ingest failed ({error}); run `prodcat ingest` again to finish it "
                f"from {staging}"
            ) from error


def recover(root: str | Path) -> list[str]:
    """Resolve what an interrupted ingest left in `root` (see the module docstring); returns what was done."""
    root = Path(root)
    done = []
    for staging in sorted(root.glob(f"{STAGING_PREFIX}*")):
        _check_not_running(staging, STAGING_PREFIX)
        if (staging / MARKER).is_file():
            _roll_forward(root, staging)
            done.append(f"{staging}: finished the swap an interrupted ingest had begun")
        else:
            shutil.rmtree(staging)
            done.append(f"{staging}: removed what an interrupted ingest had half-written (W was untouched)")
    for old in sorted(root.glob(f"{OLD_PREFIX}*")):
        _check_not_running(old, OLD_PREFIX)
        shutil.rmtree(old)
        done.append(f"{old}: removed the outputs an interrupted ingest had already replaced")
    for line in done:
        log.warning(line)
    return done


def _roll_forward(root: Path, staging: Path) -> None:
    """Move W's old outputs aside, the staged ones in, then delete both folders; safe to repeat after a kill."""
    old = root / f"{OLD_PREFIX}{staging.name.removeprefix(STAGING_PREFIX)}"
    old.mkdir(exist_ok=True)
    names = [path.relative_to(root) for path in WorkPaths(root).ingest_outputs]
    for name in names:
        live, aside = root / name, old / name
        if (staging / name).exists() and live.exists():  # still staged, so the live one is the old one
            if aside.exists():
                _remove(live)
            else:
                os.replace(live, aside)
    for name in names:
        if (staging / name).exists():
            os.replace(staging / name, root / name)
    shutil.rmtree(old)
    shutil.rmtree(staging)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _check_not_running(folder: Path, prefix: str) -> None:
    suffix = folder.name.removeprefix(prefix)
    pid = int(suffix) if suffix.isascii() and suffix.isdigit() else None
    if pid is None or pid == os.getpid():
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass
    raise StagingError(
        f"{folder}: another ingest (pid {pid}) is writing this working directory; wait for it to finish "
        f"(or, if no such ingest is running, delete {folder})"
    )
