"""Fast frozen-backbone inference: BatchNorm folded into convolutions, channels_last, and the fastest engine that
keeps float32 features.

"auto" uses bf16 autocast only where it keeps the features: where the device runs bf16 natively, the runner first
compares bf16 with float32 on 16 real photos (crops of scikit-learn's two sample photos, `calibration_photos`) and
keeps bf16 only if every pooled vector is within cosine `CALIBRATION_MIN_COSINE` (prodcat.config) of float32 (the
goal is 0.999 on every photo, the margin covers photos unlike these). Otherwise it runs float32: on the CPU the
folded backbone exported once to ONNX and run by ONNX Runtime (its NCHWc-blocked x86 kernels), on CUDA PyTorch.
Measured on the 2-thread AMD EPYC at batch 32, 180x180 (benchmarks/bench_forward.py): ONNX Runtime float32 runs
EfficientNet-Lite0 about 4x faster than plain float32 eager, bf16 autocast about 4.3x; but Lite0's bf16 features
fall to cosine 0.9974 on real Cdiscount photos (only 65% reach 0.999), so Lite0 gets ONNX Runtime, while
legacy_xception (random init) keeps 0.99999 in bf16 and gets it (about 4-5x). When ONNX Runtime cannot take a model,
auto falls back to PyTorch float32 with a warning. torch.compile (inductor, freezing) was not faster than the eager
path here and costs ~25 s of compilation per model, so it is not used.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prodcat.config import CALIBRATION_MIN_COSINE, PRECISIONS, TTA_MODES
from prodcat.features.backbones import Backbone, BackboneSpec, Preprocessor
from prodcat.features.calibration_photos import calibration_images

__all__ = [
    "InferenceRunner",
    "fold_batchnorm",
    "bf16_is_fast",
    "calibration_images",
    "flip_mean",
    "PRECISIONS",
    "TTA_MODES",
    "CALIBRATION_MIN_COSINE",
]

_logger = logging.getLogger("prodcat.features.inference")


def bf16_is_fast(device: torch.device) -> bool:
    """True where bfloat16 matmul/conv run natively: CPUs with AVX512-BF16 or AMX, CUDA GPUs from Ampere on."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, check, lambda: False)() for check in checks)
    return False


def _conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, batchnorm name) pairs where the BatchNorm's input is exactly that conv's output (traced once)."""
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # holds the tensors so their ids cannot be reused
    pairs: list[tuple[str, str]] = []

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if isinstance(module, nn.BatchNorm2d) and inputs and id(inputs[0]) in produced:
                pairs.append((produced[id(inputs[0])][0], name))
            elif isinstance(module, nn.Conv2d):
                produced[id(output)] = (name, output)

        return hook

    handles = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.BatchNorm2d)
    ]
    try:
        with torch.no_grad():
            getattr(model, "forward_features", model)(example)  # the part features use; a head is never folded
    finally:
        for handle in handles:
            handle.remove()
    return pairs


def _bn_replacement(norm: nn.BatchNorm2d) -> nn.Module | None:
    """What is left of a BatchNorm once folded: nothing, or timm's fused dropout + activation."""
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if type(norm) is BatchNormAct2d:
        return nn.Sequential(norm.drop, norm.act)
    return None  # an unknown subclass may do more than normalise: leave it alone


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> int:
    """Fold eval-mode BatchNorm into the preceding convolution, in place; returns the number folded.

    Exact in real arithmetic; removes one full pass over every activation map (large for depthwise-heavy nets).
    """
    modules = dict(model.named_modules())
    folded = 0
    for conv_name, norm_name in _conv_bn_pairs(model, example):
        conv, norm = modules[conv_name], modules[norm_name]
        replacement = _bn_replacement(norm)
        if replacement is None or norm.running_mean is None or norm.training:
            continue
        with torch.no_grad():
            weight = norm.weight if norm.affine else torch.ones_like(norm.running_var)
            bias = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
            scale = weight / torch.sqrt(norm.running_var + norm.eps)
            conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
            conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
            conv.bias = nn.Parameter((conv_bias - norm.running_mean) * scale + bias, requires_grad=False)
        parent_name, _, attribute = norm_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attribute, replacement)
        folded += 1
    return folded


class InferenceRunner:
    """Runs a frozen Backbone fast on one device; the same call on CPU and CUDA.

    `precision`: "float32", "bfloat16" (autocast), or "auto" (bfloat16 where the device runs it natively).
    `device`: default CUDA when available, else CPU. The runner works on its own (folded) copy of the backbone.
    Outputs are float32 on the CPU: "pooled" (N, C), and with `spatial=True` "spatial" (N, h, w, C) channels-last,
    with `logits=True` "logits" (N, 1000) when the backbone has its ImageNet classifier.
    """

    def __init__(
        self, backbone: Backbone, precision: str = "auto", device: str | torch.device | None = None, fold: bool = True
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = torch.device(device) if device is not None else _default_device()
        self.backbone, self.folded = self._prepare(backbone, fold)
        self.preprocess = Preprocessor(backbone.spec)  # its one preprocessor: `pack` for callers, `normalize` here
        self.calibration_cosine: float | None = None  # bf16 vs float32 on the calibration photos, when measured
        fast = precision == "auto" and bf16_is_fast(self.device)
        if precision == "auto":
            use_bf16 = fast and self._bf16_keeps_features()
        else:
            use_bf16 = precision == "bfloat16"
        self.dtype = torch.bfloat16 if use_bf16 else torch.float32
        auto_cpu_fp32 = precision == "auto" and self.device.type == "cpu" and not use_bf16
        self._onnx = _OnnxEngine.create(self.backbone) if auto_cpu_fp32 else None
        if self._onnx is not None:
            engine = "onnxruntime-fp32"
        else:
            engine = ("bf16-autocast" if use_bf16 else "fp32") + "-channels_last"
        self.mode = "-".join(part for part in (self.device.type, engine, "bn-folded" if self.folded else "") if part)
        if precision == "auto":
            _logger.info("%s", self._auto_reason(fast))

    def _auto_reason(self, fast: bool) -> str:
        """The promised `--precision auto` line: what was chosen and why, on every machine."""
        where = f"{self.spec.name} on {self.device.type}"
        if not fast:
            native = "AVX512-BF16 or AMX" if self.device.type == "cpu" else "native bf16"
            return f"{where}: precision auto -> float32 ({self.mode}): no {native} here, so bf16 is not measured"
        verdict = "kept" if self.dtype == torch.bfloat16 else f"below {CALIBRATION_MIN_COSINE}, so not used"
        return (
            f"{where}: precision auto -> {self.mode}: bf16 features within cosine {self.calibration_cosine:.5f} of "
            f"float32 on the calibration photos ({verdict})"
        )

    @property
    def spec(self) -> BackboneSpec:
        return self.backbone.spec

    def _prepare(self, backbone: Backbone, fold: bool) -> tuple[Backbone, int]:
        """A float32 copy, BatchNorm folded when that is verified exact, moved to the device as channels_last."""
        prepared = copy.deepcopy(backbone).to("cpu", torch.float32)
        folded = _fold_checked(prepared) if fold else 0
        if folded < 0:
            prepared, folded = copy.deepcopy(backbone).to("cpu", torch.float32), 0
        return prepared.to(self.device, memory_format=torch.channels_last), folded

    def _autocast(self, dtype: torch.dtype) -> contextlib.AbstractContextManager:
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _bf16_keeps_features(self) -> bool:
        """bf16 vs float32 pooled features on the calibration photos: keep bf16 only above the cosine bar."""
        batch = self.preprocess.normalize(self.preprocess.pack(calibration_images()).to(self.device))
        reference = self._forward_torch(batch, torch.float32, spatial=False, logits=False)["pooled"]
        candidate = self._forward_torch(batch, torch.bfloat16, spatial=False, logits=False)["pooled"]
        self.calibration_cosine = F.cosine_similarity(candidate, reference).min().item()
        return self.calibration_cosine >= CALIBRATION_MIN_COSINE

    def __call__(
        self, batch: torch.Tensor, *, spatial: bool = False, logits: bool = False, tta: str = "none"
    ) -> dict[str, torch.Tensor]:
        """Batch (N, 3, H, W) -> dict of float32 CPU tensors.

        The batch is either normalised float (Preprocessor's `__call__`) or uint8 (its `pack`): uint8 is moved to the
        device as is and normalised there, a quarter of the bytes over the host-to-device link.
        `tta="flip_mean"`: every output is the mean over the picture and its horizontal mirror (see `flip_mean`).
        """
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a (N, 3, H, W) batch, got {tuple(batch.shape)}")
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
        images = self._on_device(batch)
        if tta == "flip_mean":
            # Mirrors made on the device from the normalised batch (no second host copy or host-to-device transfer);
            # one forward of 2N pictures rather than two of N; activation memory is that of a 2N batch.
            images = torch.cat([images, images.flip(-1)])
        if self._onnx is not None:
            out = self._onnx(images, spatial=spatial, logits=logits)
        else:
            out = self._forward_torch(images, self.dtype, spatial=spatial, logits=logits)
        return flip_mean(out, len(batch)) if tta == "flip_mean" else out

    def _on_device(self, batch: torch.Tensor) -> torch.Tensor:
        """The batch normalised, as float32 on the runner's device."""
        if self._onnx is not None:
            # ONNX Runtime reads plain NCHW: reorder now, while the batch is uint8 (a quarter of the float bytes).
            batch = batch.contiguous()
        if batch.dtype == torch.uint8:
            return self.preprocess.normalize(batch.to(self.device, non_blocking=True))
        return batch.to(self.device, dtype=torch.float32, non_blocking=True)

    def _forward_torch(
        self, images: torch.Tensor, dtype: torch.dtype, *, spatial: bool, logits: bool
    ) -> dict[str, torch.Tensor]:
        images = images.contiguous(memory_format=torch.channels_last)
        out: dict[str, torch.Tensor] = {}
        with torch.inference_mode(), self._autocast(dtype):
            feature_map = self.backbone.forward_features(images)
            out["pooled"] = self.backbone.pool(feature_map)
            if logits:
                out["logits"] = self.backbone.logits_from_features(feature_map).float()
            if spatial:
                # channels_last maps make this permute a free view; .contiguous() is then a plain copy.
                out["spatial"] = feature_map.float().permute(0, 2, 3, 1).contiguous()
        return {key: value.cpu() for key, value in out.items()}


def flip_mean(out: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """Outputs of [pictures; their mirrors] (2N rows) -> the mean of each picture's and its mirror's, N rows.

    A mirror's spatial map is flipped back along its width first, so the two maps average position by position.
    Means are taken in float32, before the store's float16 rounding.
    """
    merged = {}
    for key, value in out.items():
        original, mirrored = value[:count], value[count:]
        if key == "spatial":
            mirrored = mirrored.flip(2)  # (N, h, w, C): w is dim 2
        merged[key] = (original.float() + mirrored.float()) * 0.5
    return merged


class _OnnxEngine:
    """The (folded) backbone exported once to ONNX, in memory, and run by ONNX Runtime on the CPU in float32.

    Outputs the last feature map, its global pool and, when the backbone has one, the ImageNet logits; batch size
    and image size are dynamic. `create` returns None (with a warning) when ONNX Runtime is missing or the export or
    session fails, so that the caller runs PyTorch instead: never a silent change of features, only of speed.
    """

    def __init__(self, session: Any, outputs: tuple[str, ...]) -> None:
        self.session, self.outputs = session, outputs

    @classmethod
    def create(cls, backbone: Backbone) -> _OnnxEngine | None:
        try:
            import onnxruntime
        except ImportError:
            _logger.warning("onnxruntime is not installed: %s runs in PyTorch float32", backbone.spec.name)
            return None
        outputs = ("feature_map", "pooled") + (("logits",) if backbone.has_imagenet_classifier else ())
        example = _fold_example(backbone.spec, backbone.model)
        # Dynamic height and width unless the model needs its own size (then the runner is always fed that size).
        fixed = getattr(backbone.model, "pretrained_cfg", {}).get("fixed_input_size", False)
        axes = {"images": {0: "n"} if fixed else {0: "n", 2: "h", 3: "w"}}
        try:
            buffer = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                torch.onnx.export(
                    _ExportedOutputs(backbone, "logits" in outputs),
                    (example,),
                    buffer,
                    dynamo=False,
                    input_names=["images"],
                    output_names=list(outputs),
                    dynamic_axes=axes,
                    opset_version=17,
                )
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            # No busy-waiting between runs: extraction decodes the next batch on these cores meanwhile
            # (measured on 2 cores: pipeline/model 0.91 with spinning, 0.92-0.96 without; the forward alone is equal).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 - any exporter/runtime failure means: stay in PyTorch
            _logger.warning("ONNX export of %s failed (%s); running PyTorch float32", backbone.spec.name, error)
            return None
        return cls(session, outputs)

    def __call__(self, images: torch.Tensor, *, spatial: bool, logits: bool) -> dict[str, torch.Tensor]:
        wanted = ["pooled"] + (["feature_map"] if spatial else []) + (["logits"] if logits else [])
        if logits and "logits" not in self.outputs:
            raise ValueError("this backbone has no ImageNet classifier")
        # ONNX Runtime reads a plain NCHW buffer; the runner reorders the batch before normalising, so this is no copy.
        feed = {"images": np.ascontiguousarray(images.numpy())}
        values = dict(zip(wanted, self.session.run(wanted, feed), strict=True))
        out = {"pooled": torch.from_numpy(values["pooled"])}
        if logits:
            out["logits"] = torch.from_numpy(values["logits"])
        if spatial:
            out["spatial"] = torch.from_numpy(values["feature_map"]).permute(0, 2, 3, 1).contiguous()
        return out


class _ExportedOutputs(nn.Module):
    def __init__(self, backbone: Backbone, logits: bool) -> None:
        super().__init__()
        self.backbone, self.logits = backbone, logits

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feature_map = self.backbone.forward_features(images)
        pooled = self.backbone.pool(feature_map)
        if self.logits:
            return feature_map, pooled, self.backbone.logits_from_features(feature_map)
        return feature_map, pooled


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _fold_example(spec: BackboneSpec, model: nn.Module) -> torch.Tensor:
    """A small random input: full size only for models that need it (fold results do not depend on size)."""
    _, height, width = spec.input_size
    if not getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False):
        height, width = min(height, 64), min(width, 64)
    generator = torch.Generator().manual_seed(0)
    return torch.rand((1, 3, height, width), generator=generator) * 4 - 2


def _fold_checked(prepared: Backbone) -> int:
    """Fold in place; -1 when float32 features no longer match (an odd timm model): the caller then runs unfolded."""
    example = _fold_example(prepared.spec, prepared.model)
    with torch.no_grad():
        reference = prepared.forward_features(example)
    folded = fold_batchnorm(prepared.model, example)
    if folded == 0:
        return 0
    with torch.no_grad():
        result = prepared.forward_features(example)
    error = (result - reference).abs().max().item() / max(reference.abs().max().item(), 1e-6)
    cosine = F.cosine_similarity(result.flatten(1), reference.flatten(1)).min().item()
    if error > 1e-3 or cosine < 0.99999:
        _logger.warning(
            "BatchNorm folding changed %s features (relative error %.2g); running unfolded", prepared.spec.name, error
        )
        return -1
    return folded
