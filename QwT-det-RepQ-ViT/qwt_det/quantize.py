"""RepQ-ViT over a whole mmdet detector (spec §5.1): backbone, FPN, RPN, box and mask heads.

Every ``nn.Conv2d`` and ``nn.Linear`` gets per-output-channel W-bit weights and a per-tensor A-bit input, except
the patch-embed conv (8-bit input) and the Linear layers fed by a LayerNorm in the Swin backbone (channel-wise
input, folded into the LayerNorm by reparameterisation). Both attention matmuls of every window attention are
quantised, the post-softmax operand with the log-√2 quantiser. ``ConvTranspose2d`` (mask upsampling), norms,
RoIAlign and NMS stay in floating point.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from mmdet.models.backbones.swin import WindowMSA
from torch import nn

from qwt.ptq import PTQConfig, reparameterize_model
from qwt.ptq.layer_map import act_quantizer, attention_matmuls, swap_module, weight_quantizer
from qwt.quant import QuantConv2d, QuantLinear, QuantWindowAttention, set_quant_state

#: (LayerNorm, following Linear) of mmdet's Swin: block attention input, block FFN input, patch merging.
SWIN_PAIRS: tuple[tuple[str, str], ...] = (("norm1", "attn.w_msa.qkv"), ("norm2", "ffn.layers.0.0"),
                                           ("norm", "reduction"))
_POST_LAYERNORM = tuple(f".{linear}" for _, linear in SWIN_PAIRS)

Batch = dict[str, Any]
PhaseHook = Callable[[str], None]


def quant_window_msa(msa: WindowMSA, config: PTQConfig) -> QuantWindowAttention:
    """mmdet's ``WindowMSA`` computes exactly what the library's Swin attention does (q·scale @ kᵀ + relative
    bias + shift mask, softmax, @ v, proj), so the library's quantised module takes it over."""
    return QuantWindowAttention(msa, *attention_matmuls(config))


def quantize_detector(model: nn.Module, config: PTQConfig) -> nn.Module:
    """Swap the detector's layers for quantised ones in place (quantisers disabled and uncalibrated)."""
    if config.method != "repq_vit":
        raise ValueError(f"detection uses RepQ-ViT (method='repq_vit'), got {config.method!r}")
    a, w = config.a_bits, config.w_bits
    for name, module in list(model.named_modules()):
        if isinstance(module, WindowMSA):
            swap_module(model, name, quant_window_msa(module, config))
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantConv2d, QuantLinear)):
            continue
        if isinstance(module, nn.Conv2d):
            swap_module(model, name, QuantConv2d(module, act_quantizer(8 if "embed" in name else a),
                                                 weight_quantizer(w)))
        elif isinstance(module, nn.Linear):
            per_channel = name.startswith("backbone.") and name.endswith(_POST_LAYERNORM)
            swap_module(model, name, QuantLinear(module, act_quantizer(a, per_channel), weight_quantizer(w)))
    return model


@torch.no_grad()
def calibrate_detector(model: nn.Module, batch: Batch) -> None:
    """One test forward with every quantiser on; uncalibrated quantisers initialise on what they see."""
    set_quant_state(model, weight=True, act=True)
    model.test_step(batch)


def repq_vit_detector(model: nn.Module, batch: Batch, config: PTQConfig,
                      on_phase: PhaseHook | None = None) -> list[str]:
    """Quantise and calibrate ``model`` in place as the authors do; returns the reparameterised LayerNorms.

    Calibrate on ``batch`` (one val image), reparameterise the backbone's LayerNorm → Linear pairs, calibrate
    again (only the reset weight quantisers re-fit). Quantisation is left on.
    """
    model.eval()
    quantize_detector(model, config)
    calibrate_detector(model, batch)
    if on_phase:
        on_phase("calibrate")
    norms = reparameterize_model(model.backbone, pairs=SWIN_PAIRS)
    calibrate_detector(model, batch)
    if on_phase:
        on_phase("reparameterize+recalibrate")
    return norms
