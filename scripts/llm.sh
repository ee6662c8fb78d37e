#!/usr/bin/env bash
# QwT on SmolLM2-135M-Instruct (the README's language-model table): RTN baselines, + dense QwT, + channel-wise,
# held-out perplexity on two Jane Austen novels, as QwT-llm/configs/table.json describes it. Results in results/llm/
# (summary.json, table.md, chart.png, blocks.json). --smoke: a 2-layer random Llama with SmolLM2's tokenizer and a
# few short windows (CI, < 3 min), written to results/llm_smoke/. --out DIR writes elsewhere; other flags pass
# through to QwT-llm/main.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
exec python3 scripts/reproduce_table.py QwT-llm "$@"
