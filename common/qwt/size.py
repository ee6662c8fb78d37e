"""Model size as the authors count it (docs/algorithm.md#size), in decimal megabytes.

Each module's own parameters (buffers, hence quantiser parameters, excluded): a ``weight`` of a module with a
``weight_quantizer`` counts that quantiser's bits per element, a compensation's weight (a reduced-rank map's two
factors) 16 bits when it is applied in FP16 (``fp16_eval``, the authors' default) and 32 otherwise, everything else
its dtype width. Zero compensations still count: they exist in the model. A parameter shared by two modules (tied
embeddings) counts once.
"""
from __future__ import annotations

from torch import nn

from .compensation.modules import Compensated


def model_size_bits(model: nn.Module) -> int:
    total, seen = 0, set()
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # a tied parameter (a language model's embedding and output head) counts once
                continue
            seen.add(id(param))
            if name == "weight" and quantizer is not None:
                bits = quantizer.n_bits
            elif isinstance(module, Compensated) and module.fp16_eval and name in module.half_parameters:
                bits = 16  # stored as it is applied: in FP16
            else:
                bits = param.element_size() * 8
            total += param.numel() * bits
    return total


def model_size_mb(model: nn.Module) -> float:
    """total_bits // 8 / 1e6, exactly the authors' ``compute_quantized_params``."""
    return model_size_bits(model) // 8 / 1e6
