"""Compensated blocks: ``out = block(x) + c(x)`` with a linear or grouped-conv map c fitted in closed form.

The order of the additions is part of the result: under 4-bit quantisers a one-ulp change in a block's output
flips quantisation codes downstream. Both paths follow the authors' arithmetic exactly:

- FP32 (training mode, ``fp16_eval=False``, and the fit-time pass that produces the next block's input):
  tokens ``(y + x·W) + b``; convs ``y + conv2d(x, W, b)`` (bias inside the conv).
- FP16 product (evaluation with ``fp16_eval=True``): tokens ``(y + (x̃·W̃).float()) + b``; convs
  ``y + (conv2d(x̃, W̃).float() + b)``, where ˜ is a cast to FP16.

The reduced-rank token map (not the authors') follows the token form with W = D·U evaluated as ``(x·D)·U``.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class Compensated(nn.Module):
    """Wraps a block; its weight parameters (:attr:`half_parameters`: ``comp_weight``, or a reduced-rank map's
    ``comp_down`` and ``comp_up``) count 16 bits in the size accounting when ``fp16_eval`` (32 otherwise),
    ``comp_bias`` 32. ``weights`` name the parameters ``comp_<name>``, registered in their order before the bias."""

    #: the parameters applied in FP16 when ``fp16_eval`` (hence stored in 16 bits)
    half_parameters: tuple[str, ...] = ("comp_weight",)

    def __init__(self, block: nn.Module, bias: torch.Tensor, fp16_eval: bool = True, **weights: torch.Tensor) -> None:
        super().__init__()
        self.block = block
        for name, weight in weights.items():
            setattr(self, f"comp_{name}", nn.Parameter(weight.detach().clone().float()))
        self.comp_bias = nn.Parameter(bias.detach().clone().float())
        self.fp16_eval = fp16_eval
        self.train(block.training)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.add_compensation(self.block(x, *args, **kwargs), x)

    def add_compensation(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + c(x)`` for block output ``y`` and input ``x``: the FP16 product at eval when ``fp16_eval``."""
        if self.fp16_eval and not self.training:
            return self.add_half(y, x)
        return self.add_fp32(y, x)

    def add_fp32(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_half(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class LinearCompensated(Compensated):
    """Token-wise: c(x) = x·W + b, W of shape (C_in, C_out), applied over the last axis of any layout."""

    def __init__(self, block: nn.Module, weight: torch.Tensor, bias: torch.Tensor, fp16_eval: bool = True) -> None:
        super().__init__(block, bias, fp16_eval, weight=weight)

    @classmethod
    def zeros(cls, block: nn.Module, in_features: int, out_features: int,
              fp16_eval: bool = True) -> "LinearCompensated":
        return cls(block, torch.zeros(in_features, out_features), torch.zeros(out_features), fp16_eval)

    def add_fp32(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y + x @ self.comp_weight + self.comp_bias

    def add_half(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y + (x.half() @ self.comp_weight.half()).float() + self.comp_bias


class LowRankCompensated(Compensated):
    """Token-wise, reduced rank (``QwTConfig.rank``, :mod:`qwt.compensation.lowrank`): c(x) = (x·D)·U + b with
    D = ``comp_down`` (C_in, r) and U = ``comp_up`` (r, C_out): r·(C_in + C_out) weights instead of C_in·C_out."""

    half_parameters = ("comp_down", "comp_up")

    def __init__(self, block: nn.Module, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor,
                 fp16_eval: bool = True) -> None:
        super().__init__(block, bias, fp16_eval, down=down, up=up)

    @classmethod
    def zeros(cls, block: nn.Module, in_features: int, rank: int, out_features: int,
              fp16_eval: bool = True) -> "LowRankCompensated":
        return cls(block, torch.zeros(in_features, rank), torch.zeros(rank, out_features), torch.zeros(out_features),
                   fp16_eval)

    def add_fp32(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y + (x @ self.comp_down) @ self.comp_up + self.comp_bias

    def add_half(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y + ((x.half() @ self.comp_down.half()) @ self.comp_up.half()).float() + self.comp_bias


class ConvCompensated(Compensated):
    """Grouped conv: c(x) = conv2d(x, W, b, stride, padding=k//2, groups), W of shape (C_out, C_in/G, k, k)."""

    def __init__(self, block: nn.Module, weight: torch.Tensor, bias: torch.Tensor, stride: int, groups: int,
                 fp16_eval: bool = True) -> None:
        super().__init__(block, bias, fp16_eval, weight=weight)
        self.stride, self.groups = stride, groups

    @classmethod
    def zeros(cls, block: nn.Module, in_channels: int, out_channels: int, kernel_size: int, stride: int,
              groups: int, fp16_eval: bool = True) -> "ConvCompensated":
        weight = torch.zeros(out_channels, in_channels // groups, kernel_size, kernel_size)
        return cls(block, weight, torch.zeros(out_channels), stride, groups, fp16_eval)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, stride=self.stride, padding=weight.shape[-1] // 2, groups=self.groups)

    def add_fp32(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y + self._conv(x, self.comp_weight, self.comp_bias)

    def add_half(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y + (self._conv(x.half(), self.comp_weight.half(), None).float() + self.comp_bias.reshape(1, -1, 1, 1))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, groups={self.groups}, fp16_eval={self.fp16_eval}"


@contextmanager
def compensation_precision(model: nn.Module, half: bool) -> Iterator[None]:
    """Run every compensation of ``model`` with the FP16 (``half``) or FP32 product while inside; the modules'
    own settings are restored on exit."""
    saved = [(m, m.fp16_eval) for m in model.modules() if isinstance(m, Compensated)]
    try:
        for m, _ in saved:
            m.fp16_eval = half
        yield
    finally:
        for m, half_before in saved:
            m.fp16_eval = half_before
