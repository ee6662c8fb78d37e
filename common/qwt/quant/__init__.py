"""Quantisers and quantised modules."""
from .attention import QuantAttention, QuantWindowAttention
from .modules import (QuantConv2d, QuantLinear, QuantMatMul, QuantModule, quant_modules, quant_state, set_quant_state,
                      swap_module)
from .quantizers import (MAX_BITS, MIN_BITS, LogSqrt2Quantizer, Quantizer, UniformQuantizer, check_bits,
                         log_sqrt2_fake_quant, round_ste, uniform_fake_quant)

__all__ = ["QuantAttention", "QuantWindowAttention", "QuantConv2d", "QuantLinear", "QuantMatMul", "QuantModule",
           "quant_modules", "quant_state", "set_quant_state", "swap_module", "MAX_BITS", "MIN_BITS", "LogSqrt2Quantizer", "Quantizer",
           "UniformQuantizer", "check_bits", "log_sqrt2_fake_quant", "round_ste", "uniform_fake_quant"]
