"""Backbone forward pass: plain float32 NCHW eager vs the InferenceRunner's auto mode, side by side.

Batch 32 at Cdiscount's 180x180, 2 threads, random normalised images (not zeros), interleaved A B A B, medians.
Plain is what one would write first: `with torch.no_grad(): backbone(images)` on a contiguous NCHW batch.
Auto is `InferenceRunner(backbone, precision="auto")`: on the CPU the BatchNorm-folded backbone exported to ONNX and
run by ONNX Runtime in float32 (it reports its engine in `mode`). Goals: EfficientNet-Lite0 (packaged weights) >= 4x,
legacy_xception (random init: speed does not depend on the values) >= 3x. Also measured side by side, for the record:
PyTorch bf16 autocast + channels_last (precision="bfloat16"), faster still but not auto because its pooled features
leave cosine 0.999 of float32 on real photos (tests/features/test_real_photos.py). Cosines are on these inputs.

    python benchmarks/bench_forward.py [--quick] [--only forward_speedup_lite0|forward_speedup_xception]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from prodcat.features.backbones import create_backbone
from prodcat.features.inference import InferenceRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_times, write_result  # noqa: E402

THREADS = 2
CASES = (
    # result name, backbone, random_init, goal
    ("forward_speedup_lite0", "efficientnet_lite0", False, 4.0),
    ("forward_speedup_xception", "legacy_xception", True, 3.0),
)


def measure(backbone_name: str, random_init: bool, batch: int, size: int, repeats: int) -> dict:
    backbone = create_backbone(backbone_name, random_init=random_init)
    runner = InferenceRunner(backbone, precision="auto", device="cpu")
    bf16 = InferenceRunner(backbone, precision="bfloat16", device="cpu")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator)  # contiguous NCHW, like a naive pipeline

    def plain() -> torch.Tensor:
        with torch.no_grad():
            return backbone(images)

    def auto() -> torch.Tensor:
        return runner(images)["pooled"]

    def bfloat16() -> torch.Tensor:
        return bf16(images)["pooled"]

    cosine = F.cosine_similarity(plain(), auto()).min().item()
    bf16_cosine = F.cosine_similarity(plain(), bfloat16()).min().item()
    load_before = os.getloadavg()[0]
    times = interleaved_times({"plain": plain, "auto": auto, "bf16": bfloat16}, repeats=repeats, warmup=1)
    # Other processes on these shared cores skew ratios (2-thread oneDNN suffers most): record how busy it was.
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return {
        "backbone": backbone_name,
        "weights_id": backbone.weights_id,
        "mode": runner.mode,
        "plain_img_per_s": round(batch / times["plain"], 1),
        "auto_img_per_s": round(batch / times["auto"], 1),
        "plain_s_per_batch": round(times["plain"], 4),
        "auto_s_per_batch": round(times["auto"], 4),
        "speedup": times["plain"] / times["auto"],
        "min_cosine_vs_fp32": round(cosine, 5),
        "bf16_mode": bf16.mode,
        "bf16_img_per_s": round(batch / times["bf16"], 1),
        "bf16_speedup": round(times["plain"] / times["bf16"], 3),
        "bf16_min_cosine_vs_fp32": round(bf16_cosine, 5),
        "batch": batch,
        "input_size": [3, size, size],
        "threads": THREADS,
        "repeats": repeats,
        "load_average_1min": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 2 at 64x64, two repeats, no result file")
    parser.add_argument("--only", choices=[case[0] for case in CASES], help="run just this result")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    batch, size, repeats = (2, 64, 2) if args.quick else (32, 180, 7)
    for name, backbone_name, random_init, goal in CASES:
        if args.only and name != args.only:
            continue
        details = measure(backbone_name, random_init, batch, size, repeats)
        speedup = details.pop("speedup")
        details["speedup"] = round(speedup, 3)
        print(json.dumps(details), flush=True)
        if args.quick:
            ok = "ok" if speedup >= goal else "MISS"
            print(f"BENCH {name}_quick {speedup:.4f} ratio goal >= {goal} {ok} (quick: no result file)")
            continue
        write_result(name, speedup, "ratio", goal, ">=", details)


if __name__ == "__main__":
    main()
