"""A quantised Linear's weight as onnxruntime ``MatMulNBits`` initialisers, from the library's own codes.

``MatMulNBits`` (com.microsoft) multiplies by a weight of N output rows and K input columns stored block-wise:
every row is cut into blocks of ``block_size`` consecutive input columns (a power of two, ≥ 16), each block with
one scale and one integer zero point, the dequantised weight being (code − zero point)·scale. That is exactly the
min-max RTN grid with ``group_size`` input columns per group (:class:`~qwt.quant.rtn.MinMaxWeightQuantizer`): the
codes, the scales Δ and the zero points z are taken from the quantiser, nothing is re-quantised, and
(code − z)·Δ is the weight the PyTorch simulation multiplies by, bit for bit (the codes and z are small integers,
so code − z is exact and the product rounds once in both). Two 4-bit codes share a byte, the lower column in the
low nibble; zero points are packed the same way along each row's blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..quant.quantizers import nearest_codes
from ..quant.rtn import MinMaxWeightQuantizer

#: Weight widths this export writes (onnxruntime's CPU kernel also has 8 bits; the LM baselines use 3 and 4).
NBITS = (4,)
#: ``block_size`` values MatMulNBits accepts: powers of two from 16.
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass
class NBitsWeight:
    """The initialisers of one ``MatMulNBits`` node: packed codes (N, blocks, block_size·bits/8), scales
    (N·blocks,) and packed zero points (N·⌈blocks·bits/8⌉,)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    k: int
    n: int
    bits: int
    block_size: int
    #: the layer's bias (FP32, maybe with a channel-wise correction folded in), added after the node
    bias: torch.Tensor | None = None
    #: MatMulNBits's accuracy_level: 0 FP32 activations, 4 the kernel's int8 blocks
    accuracy_level: int = 0

    @staticmethod
    def stack(parts: list[NBitsWeight]) -> NBitsWeight:
        """Layers reading the same input as one node: their output rows stacked (same K, bits and blocks)."""
        first = parts[0]
        key = (first.k, first.bits, first.block_size, first.accuracy_level)
        if any((p.k, p.bits, p.block_size, p.accuracy_level) != key for p in parts):
            raise InputError("layers that read one input need the same width, bits and group size to share a node")
        if len(parts) == 1:
            return first
        return NBitsWeight(packed=np.concatenate([p.packed for p in parts]),
                           scales=np.concatenate([p.scales for p in parts]),
                           zero_points=np.concatenate([p.zero_points for p in parts]), k=first.k,
                           n=sum(p.n for p in parts), bits=first.bits, block_size=first.block_size,
                           accuracy_level=first.accuracy_level)

    def dequantized(self) -> np.ndarray:
        """The (N, K) weight onnxruntime multiplies by: (code − zero point)·scale, in FP32 (for tests and checks)."""
        blocks = self.k // self.block_size
        codes = _unpack(self.packed.reshape(self.n, -1), self.k).reshape(self.n, blocks, self.block_size)
        zeros = _unpack(self.zero_points.reshape(self.n, -1), blocks)
        scales = self.scales.reshape(self.n, blocks)
        return ((codes.astype(np.float32) - zeros[..., None]) * scales[..., None]).reshape(self.n, self.k)


def nbits_weight(layer: nn.Module, name: str, gain: torch.Tensor | None = None) -> NBitsWeight:
    """``layer``'s quantised weight (a QuantLinear with a calibrated min-max weight quantiser of a group size
    MatMulNBits takes) as initialisers. ``gain`` (per output channel, a channel-wise compensation) multiplies the
    scales: the codes stay the layer's own. Anything else is refused, with the fix."""
    q = getattr(layer, "weight_quantizer", None)
    if not isinstance(q, MinMaxWeightQuantizer) or not q.calibrated or not q.enabled:
        raise InputError(f"{name}: the 4-bit ONNX export takes weights quantised by the rtn baseline (min-max, "
                         f"groups of input columns); this layer has {type(q).__name__}")
    if q.n_bits not in NBITS:
        raise InputError(f"{name}: W{q.n_bits} weights; MatMulNBits export is written for "
                         f"{', '.join(f'W{b}' for b in NBITS)} (quantise with --bits W4A16)")
    if q.group_size not in BLOCK_SIZES:
        raise InputError(f"{name}: weight group size {q.group_size}; MatMulNBits needs groups of "
                         f"{', '.join(map(str, BLOCK_SIZES))} input columns (--method-option group_size=32 or 64)")
    weight = layer.weight.detach().float()
    n, k = weight.shape
    grouped = weight.reshape(n, -1, q.group_size)
    codes = nearest_codes(grouped, q.delta, q.zero_point, q.levels).to(torch.uint8).numpy()
    scales = q.delta.reshape(n, -1)
    if gain is not None:
        scales = scales * gain.reshape(n, 1).float()
    zeros = q.zero_point.reshape(n, -1).to(torch.uint8).numpy()
    return NBitsWeight(packed=_pack(codes).reshape(n, -1, q.group_size // 2),
                       scales=np.ascontiguousarray(scales.numpy(), dtype=np.float32).reshape(-1),
                       zero_points=_pack(zeros).reshape(-1), k=k, n=n, bits=q.n_bits, block_size=q.group_size)


def _pack(codes: np.ndarray) -> np.ndarray:
    """4-bit codes along the last axis two to a byte, the first in the low nibble (an odd count padded by 0)."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4), dtype=np.uint8)


def _unpack(packed: np.ndarray, count: int) -> np.ndarray:
    low, high = packed & 0x0F, packed >> 4
    return np.stack([low, high], axis=-1).reshape(packed.shape[0], -1)[:, :count]
