#!/usr/bin/env bash
# The main job: PTQ vs PTQ+QwT on Fashion-MNIST for a ViT and a pretrained EfficientNet-Lite0, on CPU.
# Results go to results/demo/ (summary.json, table.md, chart.png, blocks.json). Extra flags pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
exec python3 scripts/demo.py "$@"
