"""Compensated blocks: ``out = block(x) + c(x)`` with a linear or grouped-conv map c fitted in closed form.

At eval the compensation product runs in FP16 with the bias added in FP32, as the authors do
(``half=True``); training mode (QwT*) and ``half=False`` use FP32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Compensated(nn.Module):
    """Wraps a block; ``comp_weight`` counts 16 bits in the size accounting, ``comp_bias`` 32."""

    def __init__(self, block: nn.Module, weight: torch.Tensor, bias: torch.Tensor, half: bool = True) -> None:
        super().__init__()
        self.block = block
        self.comp_weight = nn.Parameter(weight.detach().clone().float())
        self.comp_bias = nn.Parameter(bias.detach().clone().float())
        self.half = half
        self.train(block.training)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.block(x, *args, **kwargs) + self.compensation(x)

    def compensation(self, x: torch.Tensor) -> torch.Tensor:
        if self.half and not self.training:
            return self._product(x.half(), self.comp_weight.half()).float() + self._bias_view()
        return self._product(x, self.comp_weight) + self._bias_view()

    def _product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _bias_view(self) -> torch.Tensor:
        return self.comp_bias


class LinearCompensated(Compensated):
    """Token-wise: c(x) = x·W + b, W of shape (C_in, C_out), applied over the last axis of any layout."""

    @classmethod
    def zeros(cls, block: nn.Module, in_features: int, out_features: int, half: bool = True) -> "LinearCompensated":
        return cls(block, torch.zeros(in_features, out_features), torch.zeros(out_features), half)

    def _product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x @ weight


class ConvCompensated(Compensated):
    """Grouped conv: c(x) = conv2d(x, W, b, stride, padding=k//2, groups), W of shape (C_out, C_in/G, k, k)."""

    def __init__(self, block: nn.Module, weight: torch.Tensor, bias: torch.Tensor, stride: int, groups: int,
                 half: bool = True) -> None:
        super().__init__(block, weight, bias, half)
        self.stride, self.groups = stride, groups

    @classmethod
    def zeros(cls, block: nn.Module, in_channels: int, out_channels: int, kernel_size: int, stride: int,
              groups: int, half: bool = True) -> "ConvCompensated":
        weight = torch.zeros(out_channels, in_channels // groups, kernel_size, kernel_size)
        return cls(block, weight, torch.zeros(out_channels), stride, groups, half)

    def _product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        k = weight.shape[-1]
        return F.conv2d(x, weight, None, stride=self.stride, padding=k // 2, groups=self.groups)

    def _bias_view(self) -> torch.Tensor:
        return self.comp_bias.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, groups={self.groups}, half={self.half}"
