#!/usr/bin/env bash
# Install everything the main job and the tests need on a fresh Debian machine:
# Fashion-MNIST from Debian (apt), the pinned Python packages with the detection extra, and this repo (pip, editable).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
python3 -m pip install -q -r requirements.txt
python3 -m pip install -q -r requirements-det.txt  # detection extra: mmdet 3 on mmcv-lite (see QwT-det-RepQ-ViT)
python3 -m pip install -q --no-deps -e .
