#!/usr/bin/env bash
# The paper's ImageNet ViT/DeiT/Swin table: 10 models × {W4A4, W6A6}, RepQ-ViT and +QwT, assembled next to the
# published numbers in results/cls_vit/ (summary.json, table.md, vs_paper.md, chart.png).
#   scripts/cls_vit.sh --data-dir /data/imagenet --checkpoints /data/weights [QwT-cls-RepQ-ViT/main.py flags]
#   scripts/cls_vit.sh --smoke      # CI: reduced random-init ViT, distilled DeiT and Swin on synthetic data
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
exec python3 scripts/reproduce_table.py QwT-cls-RepQ-ViT "$@"
