#!/usr/bin/env bash
# Every GPU benchmark of issue 7 in one call (for a machine with NVIDIA GPUs; ~10 minutes on one H200).
#   bash benchmarks/gpu_suite.sh 2>&1 | tee benchmarks/gpu-$(date +%Y%m%d).log
# Paste the printed tables into benchmarks/RESULTS.md with the machine line.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
echo "## shared training step, IDDPM ImageNet-64 UNet, batch 128"
uv run python -m benchmarks.bench_train_step --preset imagenet64 --batch 128 --steps 10 --repeats 5
echo "## sampling: routed pruned ensemble vs single model, ImageNet-64, batch 256, bf16"
uv run python -m benchmarks.bench_sampling --preset imagenet64 --batch 256 --steps 50 --bf16
echo "## DDP: shared training under torchrun on every visible GPU (digits, exact resume is a test)"
uv run pytest -q tests/test_speed_paths.py
