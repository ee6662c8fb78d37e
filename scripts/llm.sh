#!/usr/bin/env bash
# QwT on SmolLM2-135M-Instruct (the README's language-model table): RTN baselines, + dense QwT, + channel-wise,
# held-out perplexity on two Jane Austen novels. Results in results/llm/ (summary.json, table.md, chart.png,
# blocks.json). --smoke: a 2-layer random Llama with SmolLM2's tokenizer and a few short windows (CI, < 3 min),
# written to results/llm_smoke/. Extra flags pass through to QwT-llm/main.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
if [ "${1:-}" = "--smoke" ]; then
  shift
  exec python3 QwT-llm/main.py --tiny-random --bits W4A8 W3A16 --window 64 --calib-windows 16 \
    --eval-windows 8 --continuation-tokens 8 --out results/llm_smoke --no-progress "$@"
fi
exec python3 QwT-llm/main.py --config QwT-llm/configs/table.json "$@"
