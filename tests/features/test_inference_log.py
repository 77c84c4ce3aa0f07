"""The `--precision auto` line says what was chosen and why, on every machine (measured or not)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from prodcat.features.inference import InferenceRunner


def _runner(device: str, mode: str, dtype: torch.dtype, cosine: float | None) -> SimpleNamespace:
    spec = SimpleNamespace(name="efficientnet_lite0")
    return SimpleNamespace(spec=spec, device=torch.device(device), mode=mode, dtype=dtype, calibration_cosine=cosine)


def test_auto_says_why_without_fast_bf16() -> None:
    line = InferenceRunner._auto_reason(_runner("cpu", "cpu-onnxruntime-fp32", torch.float32, None), False)
    assert "precision auto -> float32 (cpu-onnxruntime-fp32)" in line and "no AVX512-BF16 or AMX" in line


def test_auto_says_what_the_calibration_measured() -> None:
    kept = InferenceRunner._auto_reason(_runner("cpu", "cpu-bf16-autocast", torch.bfloat16, 0.99991), True)
    assert "cosine 0.99991" in kept and "(kept)" in kept
    dropped = InferenceRunner._auto_reason(_runner("cuda", "cuda-fp32", torch.float32, 0.99), True)
    assert "below" in dropped and "not used" in dropped
