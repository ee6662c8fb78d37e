"""Per-channel percentile-MSE search: the authors' per-channel Python loop vs the vectorised search.

Prints seconds per weight matrix for the shapes of DeiT-S / ViT-B layers and checks the results are identical.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/percentile_search.py [--device cuda]
"""
from __future__ import annotations

import argparse
import time

import torch

from qwt.quant.quantizers import search_uniform
from qwt.quant.reference import loop_search_uniform


def timed(fn, *args) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bits", type=int, default=4)
    args = p.parse_args()
    shapes = {"DeiT-S qkv weight": (1152, 384), "DeiT-S fc1 weight": (1536, 384), "ViT-B fc2 weight": (768, 3072),
              "DeiT-S qkv input, 32 imgs (C × tokens)": (384, 32 * 197)}
    print(f"device {args.device}, {args.bits} bits")
    print("| tensor | loop s | vectorised s | speed-up | identical |\n|---|---|---|---|---|")
    for name, shape in shapes.items():
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(args.device)
        search_uniform(x[:4], args.bits)  # warm-up
        t_loop, ref = timed(loop_search_uniform, x, args.bits)
        t_vec, got = timed(search_uniform, x, args.bits)
        same = torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
        print(f"| {name} {tuple(shape)} | {t_loop:.3f} | {t_vec:.4f} | {t_loop / t_vec:.0f}× | {same} |")


if __name__ == "__main__":
    main()
