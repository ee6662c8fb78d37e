"""GPTQ (Frantar et al., ICLR 2023): round a layer's weights column by column, spreading each column's rounding
error onto the columns not yet rounded so that the layer's output on its calibration inputs moves least.

Layout: a weight is viewed as (G, rows, columns) with G independent groups: G = 1 for a Linear (columns = input
features) and a plain conv (columns = C_in·k_h·k_w, the order of ``F.unfold``); G = ``groups`` for a grouped or
depthwise conv, each group of output channels with its own inputs and Hessian.

Precision: the Hessian H = 2·XᵀX is accumulated in FP64, and the damped H, its Cholesky factor, the inverse,
the inverse's upper Cholesky factor, the working weights and the error updates are all FP64. The published code
works in FP32. What changes there: H of a wide layer is badly conditioned, so its FP32 Cholesky factorisation can
fail (the published code's reason for damping, and its advice when it happens is more damping), and the error
fed back to later columns carries FP32 rounding, so weights that sit near the middle between two codes can round
the other way. FP64 costs little here: one factorisation per layer, and the column loop is a few small
operations per column.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import uniform_fake_quant


def layer_columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The matrix the layer multiplies its weight with, (G, samples, columns), from the layer's (already
    input-quantised) input ``x``: a Linear's rows of features, a conv's unfolded patches, split by group."""
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    if not isinstance(layer, nn.Conv2d):
        raise TypeError(f"GPTQ handles Linear and Conv2d layers, not {type(layer).__name__}")
    padding = layer.padding
    if getattr(layer, "same_pad", False):  # timm's TF 'same' padding, as QuantConv2d applies it
        from timm.layers import pad_same

        x, padding = pad_same(x, layer.kernel_size, layer.stride, layer.dilation), 0
    if isinstance(padding, str) or layer.padding_mode != "zeros":
        raise ValueError(f"GPTQ unfolds conv inputs with zero padding given as numbers; this conv has padding "
                         f"{layer.padding!r}, padding_mode {layer.padding_mode!r}")
    cols = F.unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride)  # (N, C·kh·kw, L)
    n, _, length = cols.shape
    cols = cols.reshape(n, layer.groups, -1, length)  # channel-major: each group's channels are contiguous
    return cols.permute(1, 0, 3, 2).reshape(layer.groups, n * length, -1)


def hessian_update(hessian: torch.Tensor | None, columns: torch.Tensor) -> torch.Tensor:
    """H + 2·XᵀX for one batch of ``columns`` (G, samples, columns), in FP64."""
    x = columns.double()
    update = torch.matmul(x.transpose(1, 2), x).mul_(2)
    return update if hessian is None else hessian.add_(update)


class Rounding(NamedTuple):
    """GPTQ's result for one weight: the rounded weight (FP64, the weight's layout) and the published
    algorithm's loss, Σ (w − q)² / [H⁻¹]_ii² / 2 over every weight, w as updated when its column is rounded (the
    increase of the damped objective that rounding column by column made)."""

    weight: torch.Tensor
    loss: float


class NotPositiveDefinite(ValueError):
    """The damped Hessian has no Cholesky factor (too little damping for the calibration inputs)."""


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, delta: torch.Tensor, zero: torch.Tensor, levels: int,
               *, damp: float = 0.01, block_size: int = 128, act_order: bool = False) -> Rounding:
    """GPTQ's rounding of ``weight`` (G, rows, columns): the rounded weight, FP64, same layout, and its loss.

    ``delta``/``zero`` (G, rows, columns) give each weight's grid (a column's own per-row grid: per-channel
    parameters repeated along the columns, or static groups' parameters); with ``act_order`` they move with
    their columns, so a column keeps the group of its original index. Dead inputs (H_ii = 0) get H_ii = 1 and a
    zero weight column, as in the published code. ``damp`` is the fraction of mean(diag H) added to the diagonal.
    """
    w = weight.double().clone()
    h = hessian.double().clone()
    delta, zero = delta.double(), zero.double()
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag.masked_fill_(dead, 1)
    w.masked_fill_(dead.unsqueeze(1), 0)
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True, stable=True)
        w, delta, zero = (_columns(t, perm) for t in (w, delta, zero))
        h = _columns(torch.gather(h, 1, perm.unsqueeze(2).expand_as(h)), perm)
        diag = h.diagonal(dim1=-2, dim2=-1)
    diag.add_(damp * diag.mean(-1, keepdim=True))
    factor, info = torch.linalg.cholesky_ex(h)
    if bool((info != 0).any()):
        raise NotPositiveDefinite("the damped Hessian is not positive definite; raise the damping")
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)

    q = torch.zeros_like(w)
    loss = torch.zeros((), dtype=w.dtype, device=w.device)
    columns = w.shape[-1]
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        w1 = w[..., i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = h_inv[..., i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[..., i]
            rounded = uniform_fake_quant(col, delta[..., i1 + i], zero[..., i1 + i], levels)
            q[..., i1 + i] = rounded
            err = (col - rounded) / h1[..., i, i].unsqueeze(1)
            w1[..., i:] -= err.unsqueeze(2) * h1[..., i, i:].unsqueeze(1)  # an outer product: exact per element
            err1[..., i] = err
        w[..., i2:] -= torch.matmul(err1, h_inv[..., i1:i2, i2:])  # the lazy batch update
        loss += err1.square().sum() / 2  # err = (w − q) / [H⁻¹]_ii, so each weight's loss is err² / 2
    if act_order:
        q = _columns(q, torch.argsort(perm, dim=-1))
    return Rounding(q, float(loss))


def _columns(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``t`` (G, rows, columns) with each group's columns in the order ``perm`` (G, columns)."""
    return torch.gather(t, 2, perm.unsqueeze(1).expand_as(t))
