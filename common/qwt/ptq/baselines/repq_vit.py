"""RepQ-ViT (Li et al., ICCV 2023): channel-wise post-LayerNorm inputs, reparameterised to per tensor after
calibration; a log-√2 quantiser after softmax; round-to-nearest weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from ...quant.quantizers import LogSqrt2Quantizer, Quantizer
from ..calibration import calibrate_weights
from ..reparameterize import reparameterize_model
from .base import Baseline, act_quantizer, register_baseline

if TYPE_CHECKING:
    from ...family import Family
    from .. import CalibrationForward, PhaseHook
    from ..reparameterize import NormLinearPairs


@register_baseline
@dataclass(frozen=True)
class RepQViT(Baseline):
    name = "repq_vit"
    summary = "channel-wise post-LayerNorm inputs reparameterised to per tensor, log-√2 post-softmax (token models)"

    def check_family(self, family: Family) -> None:
        if not family.norm_linear_pairs:
            raise ValueError(f"RepQ-ViT needs LayerNorm → Linear pairs, which the {family.name} family does not "
                             f"name (Family.norm_linear_pairs); use its default baseline, {family.default_baseline!r}, "
                             "or 'gptq'")

    def post_norm_quantizer(self, bits: int) -> Quantizer:
        return act_quantizer(bits, per_channel=True)

    def softmax_quantizer(self, bits: int, log_floor: float | None) -> Quantizer:
        return LogSqrt2Quantizer(bits, log_floor)

    def after_calibration(self, model: nn.Module, data: Any, forward: CalibrationForward, pairs: NormLinearPairs,
                          on_phase: PhaseHook | None) -> list[str]:
        """Reparameterise the LayerNorm → Linear ``pairs``, then re-fit the reset weight quantisers."""
        norms = reparameterize_model(model, pairs)
        calibrate_weights(model)
        if on_phase:
            on_phase("reparameterize+recalibrate")
        return norms
