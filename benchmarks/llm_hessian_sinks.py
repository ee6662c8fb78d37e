"""How much of each Linear's GPTQ Hessian H = 2·XᵀX the attention sink holds, on SmolLM2-135M-Instruct.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/llm_hessian_sinks.py --windows 8

GPTQ minimises tr((W − Q)·H·(W − Q)ᵀ), the layer's squared output error summed over its calibration rows. When one
row (the first token of each window, where the massive activation forms) holds most of tr(H), that sum is mostly
the sink token's error, and GPTQ rounds for it at the other tokens' expense. This prints, per Linear, the share of
tr(XᵀX) on position 0 of the windows (FP model, calibration novels, 256-token windows), the largest shares first.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from qwt.data.text import CALIBRATION_NOVELS, read_austen, token_windows
from qwt.models.lm_loading import load_causal_lm
from qwt.tasks.llm.text import tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--top", type=int, default=12, help="print this many Linears (largest position-0 share first)")
    args = p.parse_args()
    model, tokenizer, label = load_causal_lm(None, "cpu")
    text = "\n\n".join(read_austen(CALIBRATION_NOVELS).values())
    ids = token_windows(tokens(tokenizer, text), args.window, args.windows, "calibration")
    shares: dict[str, list[float]] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple) -> None:
            energy = inputs[0].double().square().sum(-1)  # (batch, tokens): each row's contribution to tr(XᵀX)
            first, total = float(energy[:, 0].sum()), float(energy.sum())
            acc = shares.setdefault(name, [0.0, 0.0])
            acc[0] += first
            acc[1] += total
        return record

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    with torch.no_grad():
        for batch in ids.split(4):
            model(input_ids=batch)
    for h in handles:
        h.remove()
    ranked = sorted(((first / total, name) for name, (first, total) in shares.items()), reverse=True)
    print(f"{label}: {args.windows} calibration windows of {args.window} tokens; position 0 is 1/{args.window} "
          f"= {100 / args.window:.2f} % of the rows")
    print("| Linear | share of tr(XᵀX) on position 0 |\n|---|---|")
    for share, name in ranked[:args.top]:
        print(f"| {name} | {100 * share:.1f} % |")
    median = sorted(s for s, _ in ranked)[len(ranked) // 2]
    print(f"median over all {len(ranked)} Linears: {100 * median:.1f} %")


if __name__ == "__main__":
    main()
