"""Round-to-nearest as language-model PTQ uses it (``baseline="rtn"``): min-max weights per output channel or per
group of ``group_size`` input columns, and activations per token at run time (``activations="token"``, dynamic),
one static per-tensor grid (``"tensor"``, percentile-MSE on the calibration text), or symmetric 8-bit blocks of
``group_size`` columns per token (``"block"``: what onnxruntime's 4-bit kernel computes at accuracy level 4, so the
simulated model is the exported one); ``a_bits=16`` leaves them in float (weights only). Applies to any family;
the decoder-LM family quantises every Linear of its decoder
layers with it and keeps embeddings, norms, attention matmuls and ``lm_head`` in floating point.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...quant.quantizers import Quantizer
from ...quant.rtn import BlockQuantizer, MinMaxWeightQuantizer, TokenQuantizer
from .base import Baseline, act_quantizer, register_baseline

#: The activation width of ``activations="block"``: what onnxruntime's int8 path of MatMulNBits computes with.
BLOCK_BITS = 8


@register_baseline
@dataclass(frozen=True)
class RTN(Baseline):
    """group_size: input columns per weight group (None: one grid per output channel). activations: ``token``
    (per-token min-max at run time), ``tensor`` (per-tensor, static) or ``block`` (per token, symmetric, per
    block of ``group_size`` columns: 8 bits only, as the 4-bit ONNX kernel quantises its input)."""

    name = "rtn"
    activation_options = ("activations",)
    summary = "min-max round-to-nearest weights (per channel or group), per-token, per-block or per-tensor inputs"

    group_size: int | None = None
    activations: str = "token"

    def __post_init__(self) -> None:
        super().__post_init__()  # the types; the values here
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"RTN group_size must be ≥ 1 or None, got {self.group_size!r}")
        if self.activations not in ("token", "tensor", "block"):
            raise ValueError(f"RTN activations must be 'token' (dynamic), 'tensor' (static) or 'block' (dynamic, "
                             f"per block of group_size columns), got {self.activations!r}")
        if self.activations == "block" and self.group_size is None:
            raise ValueError("RTN activations=block quantises blocks of the weight groups' columns: set group_size "
                             "too (e.g. group_size=32)")

    def weight_quantizer(self, bits: int) -> Quantizer:
        return MinMaxWeightQuantizer(bits, self.group_size)

    def activation_quantizer(self, bits: int) -> Quantizer:
        if self.activations == "block":
            if bits != BLOCK_BITS:
                raise ValueError(f"RTN activations=block is the 4-bit ONNX kernel's {BLOCK_BITS}-bit input "
                                 f"quantisation; use it with A{BLOCK_BITS} (e.g. --bits W4A{BLOCK_BITS}), got A{bits}")
            return BlockQuantizer(bits, self.group_size)
        return TokenQuantizer(bits) if self.activations == "token" else act_quantizer(bits)
