"""The round-to-nearest baseline of language-model PTQ (``PTQConfig(method="rtn")``).

Every Linear the family names (a decoder's attention and MLP projections) gets min-max RTN weights, per output
channel or per group, and an input quantiser: per token at run time (dynamic) or one static per-tensor grid
(percentile-MSE, calibrated on the calibration text), or none for weight-only settings. Everything else
(embeddings, norms, attention matmuls, the output head) stays in floating point.
"""
from __future__ import annotations

from torch import nn

from ..quant.modules import QuantLinear
from ..quant.quantizers import Quantizer
from ..quant.rtn import MinMaxWeightQuantizer, TokenQuantizer
from .config import PTQConfig
from .surgery import LayerRule, NameTest, act_quantizer


def rtn_input_quantizer(config: PTQConfig) -> Quantizer | None:
    if config.a_bits is None:
        return None
    return TokenQuantizer(config.a_bits) if config.act_granularity == "token" else act_quantizer(config.a_bits)


def rtn_rule(config: PTQConfig, quantized: NameTest) -> LayerRule:
    """RTN on every Linear whose name passes ``quantized``."""
    if config.method != "rtn":
        raise ValueError(f"language models are quantised with the 'rtn' method, not {config.method!r}")

    def rule(name: str, module: nn.Module) -> nn.Module | None:
        if isinstance(module, nn.Linear) and quantized(name):
            return QuantLinear(module, rtn_input_quantizer(config),
                               MinMaxWeightQuantizer(config.w_bits, config.w_group_size))
        return None

    return rule
