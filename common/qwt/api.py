"""The two calls a user makes: ``quantize`` (PTQ) and ``apply_qwt`` (compensation), family-aware."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .compensation import BlockPlan, BlockReports, ChannelAffine, Compensated, QwTConfig, fit_compensation
from .errors import InputError
from .family import Family, family_of, get_family
from .inputs import check_finite, check_float32_model
from .ptq import CalibrationForward, PTQConfig, PhaseHook, apply_ptq
from .ptq.calibration import each_batch
from .quant.modules import quant_modules


def _resolve(model: nn.Module, family: Family | str | None) -> Family:
    """The model's family; one passed by name or object must recognise the model (its layer rule and block plan
    assume that model's layout)."""
    if family is None:
        return family_of(model)
    fam = get_family(family) if isinstance(family, str) else family
    if not fam.matches(model):
        raise InputError(f"family {fam.name!r} does not recognise {type(model).__name__}; pass the model's own "
                         f"family or leave family= out to have it recognised")
    return fam


def quantize(model: nn.Module, calib: Any, config: PTQConfig = PTQConfig(), *, family: Family | str | None = None,
             forward: CalibrationForward | None = None, on_phase: PhaseHook | None = None,
             post_calibration_data: Any = None) -> nn.Module:
    """Quantise ``model`` in place with its family's layer rule and calibrate it on ``calib``.

    The family is recognised from the model unless given; ``config`` is resolved for it
    (:meth:`PTQConfig.for_family`: ``PTQConfig()`` runs the family's default baseline). ``forward(model, calib)``
    runs the calibration pass (default ``model(calib)``), once per batch of a :class:`qwt.ptq.Batches`.
    ``post_calibration_data`` (default ``calib``) is what the baseline's post-calibration step runs on (GPTQ's
    Hessians: e.g. more windows than the static activation ranges need). Returns the model, quantisation on.
    """
    quantized = sum(1 for _ in quant_modules(model))
    if quantized:
        raise InputError(f"the model is already quantised ({quantized} quantised layers): quantise a fresh copy of "
                         "the float model (its bits cannot be changed in place)")
    check_float32_model(model)
    fam = _resolve(model, family)
    for data in (calib, post_calibration_data):
        for batch in each_batch(data):
            if isinstance(batch, torch.Tensor):
                check_finite(fam.check_inputs(batch, "calibration inputs"), "calibration inputs")
    config = config.for_family(fam)
    extra = {"forward": forward} if forward is not None else {}
    apply_ptq(model, calib, config, fam.layer_rule(model, config), fam.norm_linear_pairs, on_phase=on_phase,
              post_calibration_data=post_calibration_data, **extra)
    return model


def apply_qwt(model: nn.Module, images: torch.Tensor | Iterable, config: QwTConfig = QwTConfig(), *,
              plan: BlockPlan | None = None, family: Family | str | None = None, batch_size: int = 32,
              progress: bool = True) -> BlockReports:
    """Fit and attach QwT's compensation to every block of a quantised, calibrated ``model`` (in place).

    ``images`` is a tensor (split into ``batch_size`` batches) or an iterable of batches such as a DataLoader.
    The block plan comes from the model's family unless given; so do the residual branches that
    ``QwTConfig(compensation="channelwise")`` corrects. Returns one report per compensated block, and which
    compensation batches the held-out guard kept out of the fit (``.heldout``; the guard's model-level half is
    :func:`qwt.compensation.model_guard`).
    """
    check_float32_model(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
    _refuse_fitted_again(model, config)
    branches = None
    if plan is None or config.compensation == "channelwise":
        fam = _resolve(model, family)
        plan = plan if plan is not None else fam.plan(model)
        branches = fam.residual_branches
        if config.compensation == "channelwise" and branches is None:
            raise ValueError(f"the {fam.name} family does not name its residual branches (Family.residual_branches): "
                             "channel-wise compensation cannot tell which layers to correct")
    return fit_compensation(model, plan, images, config, batch_size=batch_size, progress=progress,
                            residual_branches=branches)


def _refuse_fitted_again(model: nn.Module, config: QwTConfig) -> None:
    """Refuse a second fit over an earlier compensation: the fit's FP target runs through the first compensation
    too (it does not switch off with quantisation), so a second fit of either form aims at a distorted "FP"
    output (a second dense fit adds the same correction again), and a channel-wise fit cannot find the branches
    inside a dense wrapper."""
    dense = sum(isinstance(m, Compensated) for m in model.modules())
    channelwise = sum(isinstance(m, ChannelAffine) for m in model.modules())
    if dense or channelwise:
        held = f"{dense} dense-compensated blocks" if dense else f"{channelwise} channel-wise corrections"
        raise InputError(f"the model already holds QwT compensation ({held}): fit it again on a fresh copy of the "
                         "quantised model (copy.deepcopy before the first apply_qwt)")
