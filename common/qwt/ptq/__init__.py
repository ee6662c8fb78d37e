"""PTQ baselines: RepQ-ViT for ViT-family models, percentile calibration for ViTs and CNNs."""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from ..quant.modules import set_quant_state
from .config import PTQConfig
from .layer_map import quantize_cnn_modules, quantize_vit_modules
from .repq_vit import layernorm_linear_pairs, reparameterize, reparameterize_model

Family = Literal["vit", "cnn"]
PhaseHook = Callable[[str], None]

__all__ = ["PTQConfig", "Family", "calibrate", "quantize", "reparameterize", "reparameterize_model",
           "layernorm_linear_pairs"]


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor) -> None:
    """One forward with every quantiser on: uncalibrated quantisers initialise on what they see.

    Each layer sees the already-quantised output of the layers before it, as in the reference pipeline.
    """
    set_quant_state(model, weight=True, act=True)
    model(images)


def quantize(model: nn.Module, calib_images: torch.Tensor, config: PTQConfig, family: Family,
             on_phase: PhaseHook | None = None) -> nn.Module:
    """Quantise ``model`` in place and calibrate it on one batch; returns it with quantisation on.

    RepQ-ViT: calibrate → reparameterise LayerNorm → Linear pairs → calibrate again (only the reset weight
    quantisers re-fit). Percentile: one calibration pass. ``on_phase`` is called after each phase (timing).
    """
    model.eval()
    if family == "vit":
        quantize_vit_modules(model, config)
    elif family == "cnn":
        quantize_cnn_modules(model, config)
    else:
        raise ValueError(f"unknown model family {family!r}; choose 'vit' or 'cnn'")
    calibrate(model, calib_images)
    if on_phase:
        on_phase("calibrate")
    if config.method == "repq_vit":
        reparameterize_model(model)
        calibrate(model, calib_images)
        if on_phase:
            on_phase("reparameterize+recalibrate")
    return model
