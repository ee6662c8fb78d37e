"""Calibration passes: one forward with every quantiser on, and a weight-only re-fit."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..quant.modules import quant_modules, set_quant_state

PhaseHook = Callable[[str], None]
#: Runs the model on calibration data; the default is ``model(data)``.
CalibrationForward = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, data: Any) -> Any:
    return model(data)


class Batches(list):
    """Calibration data given batch by batch: a pass over it runs the forward once per batch, so a large set
    need not fit one forward (GPTQ's Hessians over many language-model windows). Any other object is one batch."""


def each_batch(data: Any) -> list[Any]:
    """The batches of calibration ``data``: those of a :class:`Batches`, else ``[data]``."""
    if not isinstance(data, Batches):
        return [data]
    if not data:
        raise ValueError("no calibration batches: pass at least one")
    return list(data)


@torch.no_grad()
def calibrate(model: nn.Module, data: Any, forward: CalibrationForward = default_forward) -> None:
    """One forward (per batch of a :class:`Batches`) with every quantiser on: uncalibrated quantisers initialise
    on what they see first.

    Each layer sees the already-quantised output of the layers before it, as in the reference pipeline.
    """
    set_quant_state(model, weight=True, act=True)
    for batch in each_batch(data):
        forward(model, batch)


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
