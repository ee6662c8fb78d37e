"""Percentile calibration: every activation per tensor (uniform, also after softmax), round-to-nearest weights,
no reparameterisation. Applies to any family."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Baseline, register_baseline


@register_baseline
@dataclass(frozen=True)
class Percentile(Baseline):
    name = "percentile"
    summary = "every activation per tensor, uniform post-softmax, round-to-nearest weights (any family)"
