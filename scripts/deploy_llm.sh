#!/usr/bin/env bash
# Deployment of the 4-bit language model: the LM task quantises SmolLM2-135M-Instruct to W4A8 (rtn weight groups,
# the 4-bit kernel's 8-bit input blocks), fits the dense, channel-wise and reduced-rank QwT maps and saves them;
# each is exported to ONNX (MatMulNBits) and checked and timed in onnxruntime on CPU against PyTorch. Results in
# results/deploy_llm/ (summary.json, table.md, chart.png). --smoke: a 2-layer random Llama (CI, about a minute),
# in results/deploy_llm_smoke/. Extra flags pass through to scripts/deploy_llm.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
if [ "${1:-}" = --smoke ]; then
  set -- --out results/deploy_llm_smoke "$@"
fi
exec python3 scripts/deploy_llm.py "$@"
