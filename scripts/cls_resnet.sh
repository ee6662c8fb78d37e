#!/usr/bin/env bash
# The paper's ResNet table (Table 11): ResNet-18/50/101 × {W4A4, W6A6, W4A8}, percentile PTQ and +QwT
# (grouped conv, k=1, 64 channels per group), assembled next to the published numbers in results/cls_resnet/.
#   scripts/cls_resnet.sh --data-dir /data/imagenet --checkpoints /data/weights [QwT-cls-ResNet/main.py flags]
#   scripts/cls_resnet.sh --smoke   # CI: random-init ResNet-18/50 on synthetic 32×32 data
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
exec python3 scripts/reproduce_table.py QwT-cls-ResNet "$@"
