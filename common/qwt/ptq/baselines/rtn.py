"""Round-to-nearest as language-model PTQ uses it (``baseline="rtn"``): min-max weights per output channel or per
group of ``group_size`` input columns, and activations per token at run time (``activations="token"``, dynamic)
or one static per-tensor grid (``"tensor"``, percentile-MSE on the calibration text); ``a_bits=16`` leaves them
in float (weights only). Applies to any family; the decoder-LM family quantises every Linear of its decoder
layers with it and keeps embeddings, norms, attention matmuls and ``lm_head`` in floating point.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...quant.quantizers import Quantizer
from ...quant.rtn import MinMaxWeightQuantizer, TokenQuantizer
from .base import Baseline, act_quantizer, register_baseline


@register_baseline
@dataclass(frozen=True)
class RTN(Baseline):
    """group_size: input columns per weight group (None: one grid per output channel). activations: ``token``
    (per-token min-max at run time) or ``tensor`` (per-tensor, static)."""

    name = "rtn"
    activation_options = ("activations",)
    summary = "min-max round-to-nearest weights (per channel or group), per-token dynamic or per-tensor inputs"

    group_size: int | None = None
    activations: str = "token"

    def __post_init__(self) -> None:
        super().__post_init__()  # the types; the values here
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"RTN group_size must be ≥ 1 or None, got {self.group_size!r}")
        if self.activations not in ("token", "tensor"):
            raise ValueError(f"RTN activations must be 'token' (dynamic) or 'tensor' (static), got "
                             f"{self.activations!r}")

    def weight_quantizer(self, bits: int) -> Quantizer:
        return MinMaxWeightQuantizer(bits, self.group_size)

    def activation_quantizer(self, bits: int) -> Quantizer:
        return TokenQuantizer(bits) if self.activations == "token" else act_quantizer(bits)
