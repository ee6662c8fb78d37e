"""Percentile clipping ranges, vectorized over rows.

RepQ-ViT picks a quantiser's clipping range among quantile pairs of the calibration tensor. The authors call
``torch.quantile`` once per channel in a Python loop; here the order statistics that the three candidate
percentiles need are pulled for all rows at once with two ``topk`` calls, and interpolated exactly as
``torch.quantile`` does (same rank arithmetic, ``lerp`` between neighbours), so results are bit-identical.
``torch.quantile`` refuses inputs above 2**24 elements; the authors then fall back to ``numpy.percentile`` in
float64, which :func:`row_quantiles` mirrors for per-tensor inputs of that size.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: The candidate percentiles of RepQ-ViT's search, in the order they are tried.
PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999)

#: torch.quantile's input-size limit; above it the reference code falls back to numpy.
TORCH_QUANTILE_MAX_NUMEL = 16_777_216


def _order_statistics(rows: torch.Tensor, low_count: int, high_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``low_count`` smallest (ascending) and ``high_count`` largest (ascending) values of each row."""
    low = torch.topk(rows, low_count, dim=1, largest=False, sorted=True).values
    high = torch.topk(rows, high_count, dim=1, largest=True, sorted=True).values.flip(1)
    return low, high


def _torch_style(rows: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """Quantiles of each row with torch.quantile's arithmetic, reading only the tails that ``qs`` need."""
    n = rows.shape[1]
    # torch.quantile's rank arithmetic (checked bit-for-bit): q rounded to the input dtype, multiplied by
    # (n − 1) in float64; the interpolation weight is cast back to the input dtype.
    q = torch.tensor(list(qs), dtype=rows.dtype).double()
    ranks = q * (n - 1)
    below = ranks.floor().long()
    above = ranks.ceil().long()
    weights = (ranks - below.double()).to(rows.dtype).to(rows.device)
    # Split the needed ranks into a low tail and a high tail so topk stays small.
    needed = torch.cat([below, above]).tolist()
    low_needed = [r for r in needed if r < n // 2]
    high_needed = [r for r in needed if r >= n // 2]
    low_count = (max(low_needed) + 1) if low_needed else 1
    high_start = min(high_needed) if high_needed else n - 1
    low, high = _order_statistics(rows, min(low_count, n), n - high_start)

    def gather(idx: torch.Tensor) -> torch.Tensor:
        cols = []
        for r in idx.tolist():
            cols.append(low[:, r] if r < n // 2 else high[:, r - high_start])
        return torch.stack(cols, dim=1)

    return torch.lerp(gather(below), gather(above), weights.unsqueeze(0))


def _numpy_style(flat: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """numpy.percentile in float64, cast back to float32: the reference fallback for huge tensors."""
    values = flat.detach().to("cpu", torch.float64).numpy()
    out = np.percentile(values, [q * 100 for q in qs]).astype(np.float32)
    return torch.from_numpy(out).to(flat.device).unsqueeze(0)


def row_quantiles(rows: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """Quantiles ``qs`` of each row of a 2-D tensor, shape (rows, len(qs)).

    A single row above torch.quantile's size limit uses the numpy fallback, as the reference code does.
    """
    if rows.dim() != 2:
        raise ValueError(f"row_quantiles expects a 2-D tensor, got shape {tuple(rows.shape)}")
    if rows.shape[0] == 1 and rows.shape[1] > TORCH_QUANTILE_MAX_NUMEL:
        return _numpy_style(rows[0], qs)
    return _torch_style(rows, qs)
