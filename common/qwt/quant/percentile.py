"""Percentile clipping ranges, vectorized over rows, bit-identical to the installed ``torch.quantile``.

RepQ-ViT picks a quantiser's clipping range among quantile pairs of the calibration tensor. The authors call
``torch.quantile`` once per channel in a Python loop and fall back to ``numpy.percentile`` (float64, cast back
to float32) whenever ``torch.quantile`` raises. Here the order statistics that the candidate percentiles need
are pulled for all rows at once with two ``topk`` calls and interpolated as ``torch.quantile`` does.

What ``torch.quantile`` computes depends on the torch release: older releases compute the rank ``q·(n−1)`` in
the input dtype (float32) and refuse inputs above 2**24 values; current ones compute the rank in float64 and
accept any size. :func:`quantile_behaviour` finds out which, once, by probing the installed torch, so the
vectorised search reproduces it (and the numpy fallback happens exactly where that torch would refuse).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

#: The candidate percentiles of RepQ-ViT's search, in the order they are tried.
PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999)

#: The size limit of older ``torch.quantile`` releases; probed, not assumed.
LEGACY_QUANTILE_MAX_NUMEL = 16_777_216

RankArithmetic = Literal["float64", "input_dtype", "unknown"]


@dataclass(frozen=True)
class QuantileBehaviour:
    """How the installed ``torch.quantile`` computes: rank arithmetic and the largest input it accepts."""

    rank: RankArithmetic
    max_numel: float  # math.inf when no limit was found


def _ranks(q: torch.Tensor, n: int, rank: RankArithmetic) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(below, above, weight) for quantiles ``q`` (already in the input dtype) of ``n`` sorted values."""
    if rank == "float64":
        ranks = q.double() * (n - 1)
        below = ranks.floor()
        weights = (ranks - below).to(q.dtype)
    else:  # "input_dtype": product, floor and weight all in the input dtype
        ranks = q * (n - 1)
        below = ranks.floor()
        weights = ranks - below
    return below.long(), ranks.ceil().long(), weights


#: Rows at least this long, with a tail at most this fraction of them, take the pre-filtered tail selection.
_FILTER_MIN_LENGTH, _FILTER_MAX_TAIL = 1 << 16, 1 / 64
#: Stride of the sub-sample whose k-th value bounds the tail; larger: a cheaper sub-sample, more survivors.
_FILTER_STRIDE = 16


def _tail(rows: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The k largest (or smallest) values of each row, sorted from the extreme inwards, as ``torch.topk``.

    ``topk`` works on one row per thread, so a per-tensor quantiser's single row of millions of values runs on
    one core. For such a row the tail is pre-filtered: the k-th value of a strided sub-sample is a bound that
    at least k values of the row reach (the sub-sample's own top k), so every value of the row's top k reaches
    it too, and ``topk`` of the values that do returns exactly the same values. A sub-sample that is no bound
    (NaN, or too few survivors) falls back to ``topk`` of the whole row.
    """
    n = rows.shape[1]
    if rows.shape[0] == 1 and n >= _FILTER_MIN_LENGTH and k <= n * _FILTER_MAX_TAIL:
        sample = rows[0, ::_FILTER_STRIDE]
        bound = torch.topk(sample, k, largest=largest, sorted=False).values
        bound = bound.min() if largest else bound.max()
        survivors = rows[0][rows[0] >= bound] if largest else rows[0][rows[0] <= bound]
        if survivors.numel() >= k:
            return torch.topk(survivors, k, largest=largest, sorted=True).values.unsqueeze(0)
    return torch.topk(rows, k, dim=1, largest=largest, sorted=True).values


def _torch_style(rows: torch.Tensor, qs: Sequence[float], rank: RankArithmetic) -> torch.Tensor:
    """Quantiles of each row with torch.quantile's arithmetic, reading only the tails that ``qs`` need."""
    n = rows.shape[1]
    below, above, weights = _ranks(torch.tensor(list(qs), dtype=rows.dtype), n, rank)
    # Split the needed ranks into a low tail and a high tail so topk stays small.
    needed = torch.cat([below, above]).tolist()
    low_needed = [r for r in needed if r < n // 2]
    high_needed = [r for r in needed if r >= n // 2]
    low = _tail(rows, max(low_needed) + 1, largest=False) if low_needed else None
    high_start = min(high_needed) if high_needed else n
    high = _tail(rows, n - high_start, largest=True).flip(1) if high_needed else None

    def gather(idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([low[:, r] if r < n // 2 else high[:, r - high_start] for r in idx.tolist()], dim=1)

    return torch.lerp(gather(below), gather(above), weights.to(rows.device).unsqueeze(0))


def _numpy_style(row: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """numpy.percentile in float64, cast back to float32: the reference fallback when torch refuses."""
    values = row.detach().to("cpu", torch.float64).numpy()
    out = np.percentile(values, [q * 100 for q in qs]).astype(np.float32)
    return torch.from_numpy(out).to(row.device)


def _probe_rank() -> RankArithmetic:
    """Which rank arithmetic reproduces ``torch.quantile`` on a step tensor, where the two kinds differ."""
    n, q = 100_003, 0.999
    x = torch.zeros(n)
    below = int(float(torch.tensor(q)) * (n - 1))
    x[below + 1:] = 1.0  # sorted; the quantile is the interpolation weight itself
    got = torch.quantile(x, q).reshape(1, 1)
    for rank in ("float64", "input_dtype"):
        if torch.equal(_torch_style(x.reshape(1, -1), [q], rank), got):
            return rank
    return "unknown"


def _probe_max_numel() -> float:
    try:
        torch.quantile(torch.zeros(LEGACY_QUANTILE_MAX_NUMEL + 1), 0.5)
    except RuntimeError:
        return LEGACY_QUANTILE_MAX_NUMEL
    return math.inf


@functools.cache
def _rank_behaviour() -> RankArithmetic:
    return _probe_rank()


@functools.cache
def _max_numel() -> float:
    return _probe_max_numel()


def quantile_behaviour() -> QuantileBehaviour:
    """The installed torch's quantile behaviour (each part probed once, when first needed)."""
    return QuantileBehaviour(rank=_rank_behaviour(), max_numel=_max_numel())


def row_quantiles(rows: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """Quantiles ``qs`` of each row of a 2-D tensor, shape (rows, len(qs)), as the authors' loop computes them.

    Rows longer than the installed ``torch.quantile`` accepts use the numpy fallback, as the reference code
    does. Should the probe not recognise torch's rank arithmetic, ``torch.quantile`` itself is called per row.
    """
    if rows.dim() != 2:
        raise ValueError(f"row_quantiles expects a 2-D tensor, got shape {tuple(rows.shape)}")
    # The size limit is only probed when a row could exceed the legacy limit (the probe sorts 2**24 values).
    if rows.shape[1] > LEGACY_QUANTILE_MAX_NUMEL and rows.shape[1] > _max_numel():
        return torch.stack([_numpy_style(row, qs) for row in rows])
    rank = _rank_behaviour()
    if rank == "unknown":
        q = torch.tensor(list(qs), dtype=rows.dtype, device=rows.device)
        return torch.quantile(rows, q, dim=1).T.contiguous()
    return _torch_style(rows, qs, rank)
