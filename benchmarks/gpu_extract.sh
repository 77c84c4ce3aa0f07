#!/usr/bin/env bash
# Prepared GPU check (issue: feature extraction at scale). Run on a lent GPU machine from the repo root:
#   bash benchmarks/gpu_extract.sh [--products N]   (the device tool copies the tree; results land in $OUT and benchmarks/results)
# The GPU image has torch/timm/pyarrow/typer but not pymongo: wheels travel in .whl/ (see docs in the device README).
set -euo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 PRODCAT_PROGRESS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/bench_gpu_extract.py "$@"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu_extract_xception_img_per_s.json "$OUT/"; fi
# The training loader on the same card: can the feature store feed a 5,270-way head without starving the GPU?
python3 benchmarks/bench_loader.py --device cuda --name loader_vs_step_gpu
if [ -n "${OUT:-}" ]; then cp benchmarks/results/loader_vs_step_gpu.json "$OUT/"; fi
