"""The authors' per-channel percentile search, a Python loop over channels with ``torch.quantile``.

Kept only as the yardstick the vectorised :func:`qwt.quant.quantizers.search_uniform` is checked and timed
against (tests, benchmarks); the library never calls it.
"""
from __future__ import annotations

import torch

from .percentile import PERCENTILES


def loop_search_uniform(x: torch.Tensor, n_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ, z) per row of ``x``, one channel at a time, keeping a candidate only on strict improvement."""
    levels, deltas, zeros = 2**n_bits, [], []
    for row in x:
        best, best_d, best_z = 1e10, None, None
        for p in PERCENTILES:
            hi, lo = torch.quantile(row, p), torch.quantile(row, 1 - p)
            d = (hi - lo) / (levels - 1)
            z = torch.round(-lo / d)
            score = (row - (torch.clamp(torch.round(row / d) + z, 0, levels - 1) - z) * d).pow(2).mean()
            if score < best:
                best, best_d, best_z = score, d, z
        deltas.append(best_d)
        zeros.append(best_z)
    return torch.stack(deltas), torch.stack(zeros)
