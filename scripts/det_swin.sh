#!/usr/bin/env bash
# The paper's COCO detection table: Mask R-CNN Swin-T/S and Cascade Mask R-CNN Swin-T/S/B × {W4A4, W6A6},
# FP / RepQ-ViT / RepQ-ViT+QwT box and mask AP next to the published numbers, in results/det/ (table.md,
# summary.json, one <model>_<bits>.json per run). Every run uses the authors' solver (--solver reference, from
# QwT-det-RepQ-ViT/configs/table.json); add --comp-draw authors --comp-batch-size 1 for their compensation images.
# Needs the detection extra: pip install -r requirements-det.txt
#   scripts/det_swin.sh --coco-root /data/coco --checkpoints /data/det_weights [QwT-det-RepQ-ViT/main.py flags]
#   scripts/det_swin.sh --smoke   # CI: reduced random-init detectors on a synthetic COCO set (results/det_smoke/)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
exec python3 scripts/reproduce_table.py QwT-det-RepQ-ViT "$@"
