"""Round-to-nearest quantisers of language-model PTQ: min-max weights per output channel or per group, and
activations quantised per token at run time (min-max per token, or symmetric per block of columns as
onnxruntime's 4-bit kernels quantise them).

Both use the asymmetric uniform grid of :func:`uniform_fake_quant` with Δ = (max − min)/(L − 1) and
z = round(−min/Δ), from the plain minimum and maximum (no clipping search), which is what "RTN" means in the
language-model literature. A constant row or token gets Δ = max(|min|, 1e-8)/(L − 1), a grid that holds it.
"""
from __future__ import annotations

import torch

from .quantizers import Quantizer, uniform_fake_quant


def minmax_params(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ, z) of the asymmetric min-max grid; the range always includes 0 (so 0 stays exact)."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    delta = (hi - lo) / (levels - 1)
    delta = torch.where(delta > 0, delta, lo.abs().clamp_min(1e-8) / (levels - 1))
    return delta, torch.round(-lo / delta)


class MinMaxWeightQuantizer(Quantizer):
    """RTN weights of a Linear (out × in) or a conv (out × in·kh·kw, its weight flattened per output channel, as
    GPTQ reads it): one grid per output channel (``group_size=None``) or per group of ``group_size`` consecutive
    input columns of each output channel. Δ and z have shape (out, groups, 1)."""

    kind = "minmax_weight"
    settings = ("group_size",)

    def __init__(self, n_bits: int, group_size: int | None = None) -> None:
        super().__init__(n_bits)
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be ≥ 1 or None (per output channel), got {group_size}")
        self.group_size = group_size
        self.register_buffer("zero_point", torch.empty(0))

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        if w.dim() < 2:
            raise ValueError(f"{type(self).__name__} quantises Linear or conv weights, got shape {tuple(w.shape)}")
        columns = w[0].numel()
        size = columns if self.group_size is None else self.group_size
        if columns % size:
            raise ValueError(f"group size {size} does not divide the {columns} input columns")
        return w.reshape(w.shape[0], -1, size)

    def calibrate(self, x: torch.Tensor) -> None:
        g = self._grouped(x)
        self.delta, self.zero_point = minmax_params(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), self.levels)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return uniform_fake_quant(self._grouped(x), self.delta, self.zero_point, self.levels).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, group_size={self.group_size}, enabled={self.enabled}"


class TokenQuantizer(Quantizer):
    """Dynamic per-token activations: each token (last axis) gets its own min-max grid at every call, so there is
    nothing to calibrate or store (``delta`` stays empty)."""

    kind = "dynamic_token"
    settings = ()

    @property
    def calibrated(self) -> bool:
        return True

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        delta, zero = minmax_params(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), self.levels)
        return uniform_fake_quant(x, delta, zero, self.levels)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, enabled={self.enabled}"


class BlockQuantizer(Quantizer):
    """Dynamic symmetric activations per token and per block of ``block_size`` consecutive columns, as
    onnxruntime's ``MatMulNBits`` quantises its input at ``accuracy_level`` 4 (MLAS's int8 path): each block's
    codes are round-half-to-even(x·(M/amax)) with M = 2^(b−1) − 1 and scale amax/M (0 for a block of zeros).
    Simulating it makes the PyTorch model the one the 4-bit ONNX export runs, up to the order of the sums."""

    kind = "dynamic_block"
    settings = ("block_size",)

    def __init__(self, n_bits: int, block_size: int) -> None:
        super().__init__(n_bits)
        if block_size < 1:
            raise ValueError(f"block_size must be ≥ 1, got {block_size}")
        self.block_size = block_size

    @property
    def calibrated(self) -> bool:
        return True

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.block_size:
            raise ValueError(f"block size {self.block_size} does not divide the {x.shape[-1]} input columns")
        top = float(2 ** (self.n_bits - 1) - 1)
        blocks = x.reshape(*x.shape[:-1], -1, self.block_size)
        amax = blocks.abs().amax(-1, keepdim=True)
        inverse = torch.where(amax > 0, top / amax, torch.zeros_like(amax))
        return (blocks * inverse).round_().mul_(amax / top).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, block_size={self.block_size}, enabled={self.enabled}"
