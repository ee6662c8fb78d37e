"""QwT on decoder-only language models: RTN PTQ, then one compensation per decoder layer; held-out perplexity.

    python QwT-llm/main.py                                 # SmolLM2-135M-Instruct, Jane Austen, W4A8 and W3A16
    python scripts/reproduce_table.py QwT-llm              # the README table (configs/table.json, scripts/llm.sh)
    python QwT-llm/main.py --model DIR --calib-text a.txt --eval-text b.txt --bits W4A8
    python QwT-llm/main.py --model DIR --wikitext2 WIKITEXT_DIR   # standard protocol: 2048-token windows

The default model's "FP" reference is SmolLM2's GGUF (Q4_1 weights) dequantised to FP32. Nothing is
downloaded at run time: --model takes a local checkpoint folder only.
"""
import sys

from qwt.tasks.llm import main

if __name__ == "__main__":
    sys.exit(main(__doc__))
