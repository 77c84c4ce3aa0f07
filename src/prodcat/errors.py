"""Expected failures: one line that says what went wrong and what to run next (the CLI prints `error: ...`, exit 2).

Lightweight on purpose (no torch, no numpy): the checks here run before any model is loaded, so a typo fails in
well under a second. `describe` turns the expected errors of every stage (and the OS errors a user can cause: a
missing file, a read-only folder, a full disk, a taken port) into that one line; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import difflib
import errno
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "UserError",
    "did_you_mean",
    "unknown_choice",
    "require_catalog",
    "require_store",
    "require_run",
    "require_file",
    "list_stores",
    "list_runs",
    "describe",
]


class UserError(Exception):
    """Bad input or a missing earlier step; the message names the thing and the command to run next."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest of `choices`, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown_choice(kind: str, name: str, choices: Iterable[str], extra: str = "") -> UserError:
    """UserError for a name outside `choices`: lists them and suggests the closest."""
    choices = sorted(choices)
    return UserError(f"unknown {kind} {name!r}{did_you_mean(name, choices)}; known: {', '.join(choices)}{extra}")


def _ingest_hint(workdir: Path) -> str:
    return f"run `prodcat ingest DATA_DIR --workdir {workdir}` first (DATA_DIR holds train.bson, category_names.csv)"


def require_catalog(workdir: str | Path) -> None:
    """The workdir has been ingested (catalog/train.parquet and taxonomy.parquet)."""
    root = Path(workdir)
    if not root.is_dir():
        raise UserError(f"{root}: no such working directory; {_ingest_hint(root)}")
    missing = [p for p in (root / "catalog" / "train.parquet", root / "taxonomy.parquet") if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]}: no catalog in {root}; {_ingest_hint(root)}")


def list_stores(workdir: str | Path) -> list[str]:
    """Feature stores under W/features (folders with a manifest)."""
    features = Path(workdir) / "features"
    return sorted(p.parent.name for p in features.glob("*/manifest.json")) if features.is_dir() else []


def require_store(workdir: str | Path, name: str) -> None:
    """W/features/NAME is a feature store; else list the stores there, or say which step comes first."""
    root = Path(workdir)
    if (root / "features" / name / "manifest.json").is_file():
        return
    stores = list_stores(root)
    if stores:
        raise unknown_choice("feature store", name, stores, f" (in {root / 'features'}); pass one with --store")
    if not (root / "catalog" / "train.parquet").is_file():
        require_catalog(root)
    raise UserError(f"{root / 'features'}: no feature stores yet; run `prodcat extract --workdir {root}` first")


def list_runs(runs_dir: str | Path) -> list[str]:
    """Runs (folders with checkpoints) under a W/runs folder."""
    runs_dir = Path(runs_dir)
    return sorted(p.parent.name for p in runs_dir.glob("*/checkpoints")) if runs_dir.is_dir() else []


def require_run(run: str | Path) -> None:
    """RUN is a run folder (has checkpoints/); else list the runs beside it."""
    run = Path(run)
    if (run / "checkpoints").is_dir():
        return
    if run.is_file():
        raise UserError(f"{run} is a file; --run takes a run folder (W/runs/NAME)")
    runs = list_runs(run.parent)
    if runs:
        raise unknown_choice("run", run.name, runs, f" (in {run.parent}); pass --run {run.parent}/NAME")
    what = "not a run folder (no checkpoints/)" if run.is_dir() else "no such run folder"
    raise UserError(f"{run}: {what}; train one with `prodcat train --workdir W`, then pass --run W/runs/NAME")


def require_file(path: str | Path, what: str) -> None:
    """`path` is a readable file (a folder is named as one)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass the {what} file itself (e.g. {path / 'test.bson'})")
    if not path.is_file():
        raise UserError(f"{path}: no such file; pass the path of the {what} file")


# Stage errors whose message is already one line saying what to do: looked up by module so that importing this
# (and `prodcat --help`) never loads torch; a module that was never imported cannot have raised one.
_STAGE_ERRORS = (
    ("prodcat.checkpoint", "CheckpointError"),
    ("prodcat.features.store", "StoreError"),
    ("prodcat.features.weights", "WeightsError"),
    ("prodcat.data.catalog", "IngestError"),
    ("prodcat.data.taxonomy", "TaxonomyError"),
    ("prodcat.data.bson_index", "BsonDamageError"),
    ("prodcat.evaluate.evaluation", "SplitError"),
    ("prodcat.train.loop", "TrainingDiverged"),
    ("prodcat.ocr.engine", "EngineUnavailable"),
    ("prodcat.ocr.stage", "OcrError"),
)


def _stage_error(error: BaseException) -> bool:
    for module, name in _STAGE_ERRORS:
        kind = getattr(sys.modules.get(module), name, None)
        if kind is not None and isinstance(error, kind):
            return True
    return False


def _os_error(error: OSError) -> str | None:
    where = error.filename or ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on the device{f' writing {where}' if where else ''}; free some space (or use a "
            "--workdir on a larger disk) and re-run the same command: stages resume what they finished"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "read-only file system" if error.errno == errno.EROFS else "permission denied"
        return f"{where or 'a file'}: {reason}; use a --workdir you can write to (or fix its permissions)"
    if error.errno == errno.EADDRINUSE:
        return f"{error.strerror}; pass another --port (or stop what is listening there)"
    if isinstance(error, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        return str(error) if not where else f"{where}: {error.strerror}"
    return None


_ADVICE = {
    errno.ENOSPC: "free some space (or use a --workdir on a larger disk) and re-run the same command",
    errno.EDQUOT: "free some space (or use a --workdir on a larger disk) and re-run the same command",
    errno.EROFS: "use a --workdir you can write to",
    errno.EACCES: "use a --workdir you can write to (or fix its permissions)",
    errno.EPERM: "use a --workdir you can write to (or fix its permissions)",
}


def describe(error: BaseException) -> str | None:
    """The one line for an expected failure, or None for a bug (which keeps its traceback)."""
    if isinstance(error, UserError) or _stage_error(error):  # ConfigError is a UserError
        message = " ".join(str(error).split()) or type(error).__name__
        cause = error.__cause__
        if isinstance(cause, OSError) and cause.errno in _ADVICE and _ADVICE[cause.errno] not in message:
            message += f"; {_ADVICE[cause.errno]}"  # a stage wrapped a full disk or a read-only folder
        return message
    message = _os_error(error) if isinstance(error, OSError) else None
    if message is None and isinstance(error, OSError | RuntimeError) and "No space left on device" in str(error):
        message = _os_error(OSError(errno.ENOSPC, "No space left on device"))  # pyarrow / torch wrap the errno
    return message
