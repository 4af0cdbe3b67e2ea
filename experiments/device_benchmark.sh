#!/usr/bin/env bash
# The accelerator benchmark on a GPU machine whose image has CUDA JAX, flax, optax, orbax, torch and
# torchvision: installs the wheels carried in .whl (segment-anything and what else the image lacks; the
# README's Accelerators section downloads them), puts this checkout on PYTHONPATH and runs
# experiments/device_benchmark.py with the given arguments.
#   bash experiments/device_benchmark.sh --output "$OUT/device_benchmark.json"
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 -m experiments.device_benchmark "$@"
