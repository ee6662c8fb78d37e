#!/usr/bin/env bash
# Deployment job: export the main job's models and random-weight DeiT-S / ResNet-50 to ONNX (FP32, W8A8,
# W8A8 + QwT, W8A8 + channel-wise, W4A4 simulation), run them in onnxruntime on CPU, and write
# results/deploy/ (summary.json, table.md, chart.png). Offline; extra flags pass through to scripts/deploy.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
exec python3 scripts/deploy.py "$@"
