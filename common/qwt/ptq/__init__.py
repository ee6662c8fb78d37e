"""PTQ baselines: RepQ-ViT for token models, percentile calibration for token models and CNNs.

The sequence is one function for every task: module surgery with the family's layer rule, a calibration
forward, and for RepQ-ViT the LayerNorm → Linear reparameterisation and a second calibration forward. The
forward is pluggable (a classifier runs ``model(images)``, a detector ``model.test_step(batch)``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..quant.modules import quant_modules, set_quant_state
from .config import PTQConfig
from .repq_vit import layernorm_linear_pairs, reparameterize, reparameterize_model
from .surgery import (LayerRule, act_quantizer, attention_matmuls, cnn_rule, quantize_modules, token_rule,
                      weight_quantizer)

PhaseHook = Callable[[str], None]
#: Runs the model on calibration data; the default is ``model(data)``.
CalibrationForward = Callable[[nn.Module, Any], Any]

__all__ = ["PTQConfig", "LayerRule", "CalibrationForward", "calibrate", "calibrate_weights", "apply_ptq",
           "quantize_modules", "token_rule", "cnn_rule", "act_quantizer", "weight_quantizer", "attention_matmuls",
           "reparameterize",
           "reparameterize_model", "layernorm_linear_pairs"]


def _default_forward(model: nn.Module, data: Any) -> Any:
    return model(data)


@torch.no_grad()
def calibrate(model: nn.Module, data: Any, forward: CalibrationForward = _default_forward) -> None:
    """One forward with every quantiser on: uncalibrated quantisers initialise on what they see.

    Each layer sees the already-quantised output of the layers before it, as in the reference pipeline.
    """
    set_quant_state(model, weight=True, act=True)
    forward(model, data)


@torch.no_grad()
def calibrate_weights(model: nn.Module) -> None:
    """Fit every uncalibrated weight quantiser on its weight.

    A weight quantiser's search reads only the weight, so after reparameterisation (which resets the weight
    quantisers of the touched Linears) this gives the parameters a second calibration forward would, without
    the forward.
    """
    for _, module in quant_modules(model):
        for quantizer in module.weight_quantizers():
            if not quantizer.calibrated:
                quantizer.enabled = True
                module.quantized_weight()


def apply_ptq(model: nn.Module, data: Any, config: PTQConfig, rule: LayerRule,
              pairs: tuple[tuple[str, str], ...] = (), forward: CalibrationForward = _default_forward,
              on_phase: PhaseHook | None = None) -> list[str]:
    """Quantise ``model`` in place with ``rule`` and calibrate it on ``data``; returns the reparameterised norms.

    RepQ-ViT: calibrate → reparameterise the LayerNorm → Linear ``pairs`` → re-fit the reset weight quantisers
    on their weights. Percentile: one calibration pass. ``on_phase`` is called after each phase.
    Quantisation is left on.
    """
    model.eval()
    quantize_modules(model, rule)
    calibrate(model, data, forward)
    if on_phase:
        on_phase("calibrate")
    norms: list[str] = []
    if config.method == "repq_vit":
        norms = reparameterize_model(model, pairs)
        calibrate_weights(model)
        if on_phase:
            on_phase("reparameterize+recalibrate")
    return norms
