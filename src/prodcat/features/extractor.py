"""One feature extractor: the backbone, its inference engine and its preprocessor, built from an extraction config.

`prodcat extract` and the Predictor both build it with `FeatureExtractor.from_config` and turn uint8 pictures into
features with its call, so served features are the stored ones by construction: same backbone and weights, same
preprocessing (the spec's), same engine choice, same kind and channels, same TTA, same float16 rounding.
What can still differ is the engine `--precision auto` picks on another machine (bf16 on one, float32 on another);
the store's config records the engine it was made with (`ExtractConfig.engine`) and `warn_if_engine_differs` says
when the engine here is another.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from prodcat.config import FEATURE_KINDS, TTA_MODES, ExtractConfig
from prodcat.features.backbones import BackboneSpec, Preprocessor, create_backbone, get_spec
from prodcat.features.inference import InferenceRunner

__all__ = ["FeatureExtractor", "input_size"]

_logger = logging.getLogger("prodcat.features.extractor")


def input_size(config: ExtractConfig) -> tuple[int, int]:
    """(H, W) the extractor of `config` feeds its backbone, without building it (serve decodes towards it)."""
    return get_spec(config.backbone).image_size


class FeatureExtractor:
    """uint8 pictures -> features exactly as the feature store keeps them (float16, the store's kind and channels).

    `kind`: "pooled" (N, C) or "spatial" (N, h, w, C[:channels]); `tta`: "none" or "flip_mean" (each vector the mean
    of the picture's and its mirror's). The runner holds the (BatchNorm-folded) backbone and its one Preprocessor.
    """

    def __init__(
        self, runner: InferenceRunner, kind: str = "pooled", channels: int | None = None, tta: str = "none"
    ) -> None:
        if kind not in FEATURE_KINDS:
            raise ValueError(f"kind must be one of {FEATURE_KINDS}, got {kind!r}")
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
        self.runner, self.kind, self.channels, self.tta = runner, kind, channels, tta

    @classmethod
    def from_config(cls, config: ExtractConfig, device: str | torch.device | None = None) -> FeatureExtractor:
        """Backbone (weights or seeded random init), engine (config.precision on `device`), kind, channels, TTA.

        `config.engine` is what a store was made with, never a request: the engine is chosen here, on this device.
        """
        backbone = create_backbone(config.backbone, weights=config.weights, random_init=config.random_init)
        runner = InferenceRunner(backbone, precision=config.precision, device=device)
        # The runner keeps its own folded copy; the unfolded original is dropped here (half the backbone memory).
        return cls(runner, kind=config.features, channels=config.spatial_channels, tta=config.tta)

    @property
    def spec(self) -> BackboneSpec:
        return self.runner.spec

    @property
    def engine(self) -> str:
        """The engine actually used, e.g. "cpu-onnxruntime-fp32-bn-folded" or "cuda-bf16-autocast-channels_last"."""
        return self.runner.mode

    @property
    def weights_id(self) -> str:
        return self.runner.backbone.weights_id

    @property
    def calibration_cosine(self) -> float | None:
        """bf16 vs float32 on the calibration photos when `auto` measured it, else None."""
        return self.runner.calibration_cosine

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def preprocess(self) -> Preprocessor:
        """The backbone's preprocessor: `pack` runs wherever pictures are decoded, normalisation on the device."""
        return self.runner.preprocess

    def pack(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decoded uint8 (3, H, W) pictures -> one uint8 (N, 3, H, W) channels_last batch at the input size."""
        return self.preprocess.pack(images)

    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one stored vector: (C,) pooled, (h, w, C or channels) spatial; one probe forward."""
        probe = torch.rand(1, *self.spec.input_size)
        out = self.runner(probe, spatial=self.kind == "spatial")
        if self.kind == "pooled":
            return (out["pooled"].shape[1],)
        height, width, channels = out["spatial"].shape[1:]
        return (height, width, min(channels, self.channels) if self.channels else channels)

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor]) -> np.ndarray:
        """A packed uint8 (N, 3, H, W) batch (`pack`; channels_last, i.e. NHWC in memory) or a sequence of uint8
        (3, H, W) pictures as `decode_image` gives them -> float16 features, row for row as the store keeps them.
        One forward for the whole input: callers choose the batches (extraction's are aligned to shards)."""
        batch = images if isinstance(images, torch.Tensor) else self.pack(images)
        if batch.dtype != torch.uint8:
            raise ValueError(f"expected uint8 pictures, got {batch.dtype}; the extractor normalises them itself")
        out = self.runner(batch, spatial=self.kind == "spatial", tta=self.tta)
        return self._stored(out)

    def _stored(self, out: dict[str, torch.Tensor]) -> np.ndarray:
        """What the store keeps of a runner output: pooled or spatial (first `channels`), as float16. Converted by
        torch, not numpy: numpy's float32 -> float16 cast is scalar code (measured on an H200 host: 41 ms per batch
        of 256 x 2048, a third of the extraction loop); the rounding is the same (round to nearest even)."""
        features = out["pooled"] if self.kind == "pooled" else out["spatial"]
        if self.kind == "spatial" and self.channels:
            features = features[..., : self.channels]
        return features.to(torch.float16).numpy()

    def warn_if_engine_differs(self, recorded: str | None, store: str) -> bool:
        """Log a warning naming both engines when `recorded` (the store's) is not the one used here; True if so.
        None (a store from before engines were recorded) is not compared."""
        if recorded is None or recorded == self.engine:
            return False
        _logger.warning(
            "features are computed by %s here, but store %s was made by %s: they can differ from the stored ones the "
            "head was trained on (float16-rounding level between float32 engines, more with bf16); use the store's "
            "device and precision to match it exactly",
            self.engine,
            store,
            recorded,
        )
        return True
