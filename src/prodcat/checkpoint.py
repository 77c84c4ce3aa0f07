"""The one checkpoint format of prodcat runs, and the one loader.

Layout of `W/runs/<name>/checkpoints/` for each kept checkpoint (`last`, `best`):
  last.json                     sidecar: config, step, best metric, metrics, in_shape, num_classes, taxonomy, the
                                step plan, RNG states (base64 / lists), the optimizer's non-tensor skeleton, the file
                                names below and the sha256 of each
  last.000120.safetensors       model weights (classifier state_dict)
  last.000120.optim.safetensors optimizer tensors (the skeleton in the sidecar says where each one goes)

Weight files carry their step in their name and are written (temp name, then `os.replace`) before the sidecar;
replacing the sidecar is the commit point, so a crash at any moment leaves the previous checkpoint whole. Files no
sidecar points to are removed after the commit (nothing is removed while any sidecar is unreadable). `best` files
are hard links to the `last` files of the same step.

Loading never guesses: a missing, damaged (sha256 mismatch), unparsable or other-version checkpoint, or one whose
weights are not finite, raises `CheckpointError` naming the file; nothing here deletes a checkpoint on error.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from prodcat.config import ConfigError, TrainConfig, config_from_dict
from prodcat.utils import atomic_write_bytes, read_json, write_json

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "checkpoint_dir",
    "build_model",
    "save_checkpoint",
    "link_checkpoint",
    "read_meta",
    "resolve_resume",
    "verify_checkpoint",
    "non_finite_tensor",
    "load_checkpoint",
    "load_training_state",
    "capture_rng",
    "restore_rng",
]

FORMAT_VERSION = 2  # 2: sha256 of every tensor file in the sidecar


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model it is loaded into."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def build_model(
    config: TrainConfig, in_shape: tuple[int, ...], taxonomy: Any, prior_counts: np.ndarray | None = None
) -> nn.Module:
    """The classifier a config describes (the only place training and loading build one). `prior_counts`: the
    train split's pictures per leaf, for the balanced softmax (a loaded run reads its saved prior instead)."""
    from prodcat.model import build_classifier

    return build_classifier(
        config.head,
        config.loss,
        tuple(int(s) for s in in_shape),
        int(taxonomy.num_classes),
        hidden_dim=config.hidden_dim,
        dropout=config.dropout,
        num_sampled=config.num_sampled,
        sampler=config.sampler,
        class_counts=np.asarray(taxonomy.train_counts),
        prior_counts=prior_counts,
        unigram_alpha=config.unigram_alpha,
        with_replacement=config.sample_with_replacement,
        remove_accidental_hits=config.remove_accidental_hits,
        logq_correction=config.logq_correction,
        label_smoothing=config.label_smoothing,
        leaf_level1=np.asarray(taxonomy.leaf_level1),
        leaf_level2=np.asarray(taxonomy.leaf_level2),
        hier_weights=tuple(config.hier_weights),
    )


# -- RNG states as JSON ---------------------------------------------------------------------------------------------
def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states, JSON-ready."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# -- optimizer state: tensors to safetensors, everything else to a JSON skeleton -------------------------------------
def _split_tensors(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        if value.is_sparse:
            value = value.to_dense()
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__dict__": [[k, _split_tensors(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple | list):
        items = [_split_tensors(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, float) and not np.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise CheckpointError(f"optimizer state entry {key!r} has unsupported type {type(value).__name__}")


def _join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_join_tensors(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__dict__" in value:
        return {k: _join_tensors(v, tensors) for k, v in value["__dict__"]}
    if "__tuple__" in value:
        return tuple(_join_tensors(v, tensors) for v in value["__tuple__"])
    if "__float__" in value:
        return float(value["__float__"])
    raise CheckpointError(f"unknown optimizer skeleton node {sorted(value)}")


# -- writing --------------------------------------------------------------------------------------------------------
def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def _remove_unreferenced(directory: Path) -> None:
    """Delete weight files no sidecar points to (left by an earlier commit or a crash before one). An unreadable
    sidecar may still name files someone wants back, so then nothing is deleted."""
    keep: set[str] = set()
    for sidecar in directory.glob("*.json"):
        try:
            keep.update(read_json(sidecar)["files"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return
    for path in directory.glob("*.safetensors"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


def save_checkpoint(
    run_dir: str | Path, which: str, model: nn.Module, optimizer: torch.optim.Optimizer | None, meta: dict[str, Any]
) -> Path:
    """Write weights (+ optimizer) then the sidecar (the commit); returns the sidecar path."""
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    step = int(meta["step"])
    files: dict[str, str] = {}
    checksums: dict[str, str] = {}
    stamp = {"step": str(step), "format": str(FORMAT_VERSION)}

    def write(role: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
        data = safetensors.torch.save(tensors, metadata=stamp)
        atomic_write_bytes(directory / name, data)
        files[role], checksums[role] = name, hashlib.sha256(data).hexdigest()

    write("weights", f"{which}.{step:06d}.safetensors", _plain_state(model))
    sidecar = dict(meta, format=FORMAT_VERSION, files=files, checksums=checksums, rng=capture_rng())
    if optimizer is not None:
        tensors: dict[str, torch.Tensor] = {}
        sidecar["optimizer_skeleton"] = _split_tensors(optimizer.state_dict(), "optim", tensors)
        write("optimizer", f"{which}.{step:06d}.optim.safetensors", tensors)
    path = write_json(directory / f"{which}.json", sidecar)
    _remove_unreferenced(directory)
    return path


def link_checkpoint(run_dir: str | Path, source: str, target: str) -> Path:
    """Make `target` (e.g. best) the same checkpoint as `source` (e.g. last) without rewriting the tensors."""
    directory = checkpoint_dir(run_dir)
    meta = read_meta(run_dir, source)
    files = {}
    for role, name in meta["files"].items():
        new_name = target + name[len(source) :]
        tmp = directory / f".{new_name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(directory / name, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(directory / name, tmp)
        os.replace(tmp, directory / new_name)
        files[role] = new_name
    path = write_json(directory / f"{target}.json", dict(meta, files=files))  # same bytes: same checksums
    _remove_unreferenced(directory)
    return path


# -- reading --------------------------------------------------------------------------------------------------------
_REQUIRED = ("step", "files", "checksums", "config", "in_shape", "num_classes", "taxonomy", "rng")


def read_meta(run_dir: str | Path, which: str = "last") -> dict[str, Any]:
    """The sidecar of a checkpoint, checked for its format and against the tensor files it names (their presence;
    `verify_checkpoint` and the loaders also check their sha256)."""
    directory = checkpoint_dir(run_dir)
    sidecar = directory / f"{which}.json"
    if not sidecar.is_file():
        raise CheckpointError(f"{sidecar}: no {which!r} checkpoint in {run_dir}")
    try:
        meta = read_json(sidecar)
    except (OSError, ValueError) as error:  # ValueError: bad JSON or UTF-8
        raise CheckpointError(f"{sidecar}: unreadable checkpoint sidecar ({_one_line(error)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(
            f"{sidecar}: checkpoint format {found!r}, this prodcat reads {FORMAT_VERSION} (retrain the run)"
        )
    missing = [key for key in _REQUIRED if key not in meta]
    if missing:
        raise CheckpointError(f"{sidecar}: checkpoint sidecar lacks {', '.join(missing)}")
    files, checksums = meta["files"], meta["checksums"]
    if not isinstance(files, dict) or "weights" not in files or not isinstance(checksums, dict):
        raise CheckpointError(f"{sidecar}: checkpoint sidecar has no valid 'files' / 'checksums' entries")
    for role, name in files.items():
        if not isinstance(name, str) or Path(name).name != name or role not in checksums:
            raise CheckpointError(f"{sidecar}: {role} file entry {name!r} is not a plain file name with a checksum")
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name}: {role} file of {sidecar.name} is missing")
    return meta


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _check_file(directory: Path, meta: dict[str, Any], role: str) -> Path:
    """The path of one tensor file of a checkpoint, after checking its sha256 against the sidecar's."""
    path = directory / meta["files"][role]
    try:
        digest = _sha256(path)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read checkpoint file ({_one_line(error)})") from None
    if digest != meta["checksums"][role]:
        raise CheckpointError(f"{path}: sha256 differs from the one its sidecar recorded (damaged or changed since)")
    return path


def verify_checkpoint(run_dir: str | Path, which: str = "last") -> dict[str, Any]:
    """`read_meta` plus the sha256 of every tensor file: the sidecar of a checkpoint that is whole."""
    meta = read_meta(run_dir, which)
    for role in meta["files"]:
        _check_file(checkpoint_dir(run_dir), meta, role)
    return meta


def resolve_resume(run_dir: str | Path) -> dict[str, Any] | None:
    """The `last` checkpoint's sidecar to resume from; None when the run has no checkpoint files at all (start
    fresh). One that exists but cannot be used (damaged, missing files, other format; `best` included, whose files
    a resumed run would otherwise replace) raises CheckpointError naming the file: resuming never starts over."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return None
    if not any(directory.glob("*.json")):
        tensors = sorted(directory.glob("*.safetensors"))
        if tensors:  # uncommitted (a kill during the first save) or sidecars lost: not ours to delete unasked
            raise CheckpointError(f"{tensors[0]}: tensor file without a checkpoint sidecar in {directory}")
        return None
    meta = verify_checkpoint(run_dir, "last")
    if (directory / "best.json").exists():
        verify_checkpoint(run_dir, "best")
    return meta


def non_finite_tensor(module: nn.Module) -> str | None:
    """The name of the first floating-point parameter or buffer holding NaN or infinity (None: all finite)."""
    state = {k: v for k, v in module.state_dict().items() if v.is_floating_point() and v.numel()}
    if not state:
        return None
    # A float64 sum is finite exactly when every element is (NaN and inf propagate; float32 values cannot overflow
    # it), without the tensor-sized boolean temporary isfinite would make; one device sync for all tensors.
    finite = torch.stack([torch.isfinite(v.sum(dtype=torch.float64)) for v in state.values()]).cpu()
    return None if bool(finite.all()) else list(state)[int((~finite).nonzero()[0])]


def _load_tensors(
    run_dir: Path, meta: dict[str, Any], role: str, device: str | torch.device
) -> tuple[Path, dict[str, torch.Tensor]]:
    path = _check_file(checkpoint_dir(run_dir), meta, role)
    expected_step = int(meta["step"])
    try:
        with safetensors.safe_open(str(path), framework="pt", device=str(device)) as handle:
            step = (handle.metadata() or {}).get("step")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable safetensors file ({_one_line(error)})") from None
    if step is not None and int(step) != expected_step:
        raise CheckpointError(f"{path}: holds step {step}, its sidecar says {expected_step}")
    return path, tensors


def _load_weights(model: nn.Module, run_dir: Path, meta: dict[str, Any], device: str | torch.device) -> None:
    path, state = _load_tensors(run_dir, meta, "weights", device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit the model built from its config: {error}") from error
    bad = non_finite_tensor(model)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad!r} holds NaN or infinity (a diverged run); retrain with lower lr")


def load_checkpoint(
    run_dir: str | Path, which: str = "best", device: str | torch.device = "cpu", taxonomy: Any = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the classifier from the saved config and taxonomy copy, load its weights; eval mode. `taxonomy`: the
    run's, when the caller has read it already (prodcat.predict.run); checked against the sidecar either way."""
    from prodcat.data.taxonomy import Taxonomy

    run_dir = Path(run_dir)
    meta = read_meta(run_dir, which)
    try:
        config = config_from_dict(TrainConfig, meta["config"])
    except (ConfigError, TypeError) as error:
        sidecar = checkpoint_dir(run_dir) / f"{which}.json"
        raise CheckpointError(f"{sidecar}: saved config is invalid ({_one_line(error)})") from None
    try:
        taxonomy = taxonomy if taxonomy is not None else Taxonomy.load(run_dir / meta["taxonomy"])
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise CheckpointError(f"{run_dir / meta['taxonomy']}: unreadable taxonomy ({_one_line(error)})") from None
    if taxonomy.num_classes != int(meta["num_classes"]):
        raise CheckpointError(
            f"{run_dir / meta['taxonomy']}: {taxonomy.num_classes} classes, checkpoint has {meta['num_classes']}"
        )
    model = build_model(config, tuple(meta["in_shape"]), taxonomy).to(device)
    _load_weights(model, run_dir, meta, device)
    model.eval()
    return model, dict(meta, run_dir=str(run_dir))


def load_training_state(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    which: str = "last",
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore weights, optimizer state and RNG states in place (resume); returns the sidecar."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir, which)
    _load_weights(model, run_dir, meta, device)
    if optimizer is not None:
        if "optimizer" not in meta["files"] or "optimizer_skeleton" not in meta:
            raise CheckpointError(f"{run_dir}: {which!r} checkpoint has no optimizer state to resume from")
        # CPU: load_state_dict moves state to each parameter's device itself, and Adam wants `step` left on CPU.
        path, tensors = _load_tensors(run_dir, meta, "optimizer", "cpu")
        try:
            optimizer.load_state_dict(_join_tensors(meta["optimizer_skeleton"], tensors))
        except (KeyError, ValueError, TypeError, RuntimeError) as error:
            raise CheckpointError(f"{path}: optimizer state does not fit ({_one_line(error)})") from None
    try:
        restore_rng(meta["rng"])
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        sidecar = checkpoint_dir(run_dir) / f"{which}.json"
        raise CheckpointError(f"{sidecar}: unusable RNG states ({_one_line(error)})") from None
    return meta
