"""GPTQ weights (Frantar et al., ICLR 2023) with another baseline's activations, or none (weights only).

The activations are those of the model family's default baseline (RepQ-ViT on ViT, DeiT and Swin, percentile on
CNNs, RTN on decoder LMs) unless ``activations`` names one; that baseline's post-calibration step (RepQ-ViT's
reparameterisation) runs first, so GPTQ rounds the weights the model finally uses. Then every weight-quantised
layer, in the order the forward first reaches it, gets its Hessian from its calibration inputs as the layers before
it produce them, already GPTQ-rounded and with every activation quantiser on (so a layer sees the quantised inputs
it multiplies), and is rounded at once.

Each layer's inputs are produced again by a calibration forward that stops at the next layer, instead of being
stored at block boundaries as the published code does: memory is one forward's activations plus one layer's
Hessian, whatever the model, and any calibration forward works (a detector's too); the price is about half a
forward per layer. A module called several times per forward contributes the calls made before the next layer
is first reached.

The result lives in the layer's weight quantiser, a :class:`~qwt.quant.quantizers.RoundingQuantizer`: it keeps
the grid (per channel from its percentile search, or per static group of ``group_size`` columns from the same
search on each group) and stores, per weight, the integer offset from round-to-nearest to GPTQ's code. The float
weight stays the layer's weight, so switching quantisation off gives the float layer (the target QwT fits
towards), and switching it on gives GPTQ's rounded weight bit for bit; saving, loading and the ONNX simulation
export handle the quantiser like any other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...errors import InputError
from ...quant.gptq import NotPositiveDefinite, gptq_round, hessian_update, layer_columns
from ...quant.modules import QuantConv2d, QuantLinear, quant_modules
from ...quant.quantizers import Quantizer, RoundingQuantizer, UniformQuantizer, search_uniform
from ...utils import all_finite
from .base import Baseline, make_baseline, register_baseline

if TYPE_CHECKING:
    from ...family import Family
    from .. import CalibrationForward, PhaseHook
    from ..reparameterize import NormLinearPairs


@register_baseline
@dataclass(frozen=True)
class GPTQ(Baseline):
    """damp: fraction of mean(diag H) added to H's diagonal. block_size: columns per lazy batch update.
    act_order: round columns in order of decreasing H_ii. group_size: columns per static weight group (None:
    one grid per output channel). symmetric: symmetric weight grid using every code (zero point fixed at L/2,
    Δ = 2·max|w|/(L − 1) from the percentile search, as published GPTQ).
    activations: the baseline whose activation quantisers are used (None: the model family's default baseline,
    filled in once by :meth:`for_family`)."""

    name = "gptq"
    summary = "GPTQ-rounded weights; activations as the family's default baseline (or activations=NAME) or none (A16)"

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    group_size: int | None = None
    symmetric: bool = False
    activations: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()  # the types; the ranges here
        if not (math.isfinite(self.damp) and self.damp >= 0):
            raise ValueError(f"GPTQ damp must be a finite number ≥ 0, got {self.damp!r}")
        for name in ("block_size", "group_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"GPTQ {name} must be ≥ 1{' or None' * (name == 'group_size')}, got {value!r}")
        if self.activations is not None:
            if self.activations == self.name:
                raise ValueError("GPTQ activations must name another baseline (e.g. repq_vit, percentile)")
            make_baseline(self.activations)  # refuses an unknown name now, not at quantisation

    def check_family(self, family: Family) -> None:
        if self.activations is not None:
            make_baseline(self.activations).check_family(family)

    def for_family(self, family: Family) -> GPTQ:
        return self if self.activations is not None else replace(self, activations=family.default_baseline)

    def activation_baseline(self) -> Baseline:
        if self.activations is None:
            raise ValueError("GPTQ(activations=None) takes its activations from the model family's default baseline: "
                             "resolve the config with config.for_family(family) first (qwt.quantize does)")
        return make_baseline(self.activations)

    def weight_quantizer(self, bits: int) -> Quantizer:
        return RoundingQuantizer(bits, channel_axis=0, grid="symmetric_full" if self.symmetric else "affine",
                                 group_size=self.group_size)

    def after_calibration(self, model: nn.Module, data: Any, forward: CalibrationForward, pairs: NormLinearPairs,
                          on_phase: PhaseHook | None) -> list[str]:
        norms = self.activation_baseline().after_calibration(model, data, forward, pairs, on_phase)
        gptq_model(model, data, forward, self)
        if on_phase:
            on_phase("gptq")
        return norms


class _Stop(Exception):
    """Ends a calibration forward once the layer being collected has been passed."""


def _weight_layers(model: nn.Module, data: Any, forward: CalibrationForward) -> list[tuple[str, nn.Module]]:
    """The weight-quantised layers in the order the calibration forward first reaches them."""
    names = {module: name for name, module in quant_modules(model)
             if isinstance(module, (QuantLinear, QuantConv2d))}
    order: dict[nn.Module, str] = {}

    def record(module: nn.Module, args: tuple) -> None:
        order.setdefault(module, names[module])

    hooks = [m.register_forward_pre_hook(record) for m in names]
    try:
        forward(model, data)
    finally:
        for hook in hooks:
            hook.remove()
    return [(name, module) for module, name in order.items()]


def _collect_hessian(model: nn.Module, layer: nn.Module, stop_at: nn.Module | None, data: Any,
                     forward: CalibrationForward) -> torch.Tensor:
    """H = 2·Σ XᵀX over every call of ``layer`` before ``stop_at`` is first reached, batch by batch."""
    hessian: list[torch.Tensor] = []

    def collect(module: nn.Module, args: tuple) -> None:
        columns = layer_columns(module, module.input_quantizer(args[0]))
        hessian[:] = [hessian_update(hessian[0] if hessian else None, columns)]

    def stop(module: nn.Module, args: tuple) -> None:
        raise _Stop

    hooks = [layer.register_forward_pre_hook(collect)]
    if stop_at is not None:
        hooks.append(stop_at.register_forward_pre_hook(stop))
    try:
        forward(model, data)
    except _Stop:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return hessian[0]


def _group_grid(weight: torch.Tensor, quantizer: UniformQuantizer, group_size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ, z) of every weight (G, rows, columns) from the quantiser's search on each static group of columns."""
    deltas, zeros = [], []
    for start in range(0, weight.shape[-1], group_size):
        part = weight[..., start:start + group_size]
        delta, zero = search_uniform(part.reshape(-1, part.shape[-1]), quantizer.n_bits, quantizer.grid)
        deltas.append(delta.reshape(*part.shape[:-1], 1).expand_as(part))
        zeros.append(zero.reshape(*part.shape[:-1], 1).expand_as(part))
    return torch.cat(deltas, -1), torch.cat(zeros, -1)


@torch.no_grad()
def gptq_layer(layer: nn.Module, hessian: torch.Tensor, options: GPTQ) -> None:
    """Round ``layer``'s weight with GPTQ on its calibrated weight quantiser's grid (per channel, or static groups
    searched here) and give the quantiser GPTQ's codes; the layer's float weight is left as it is."""
    quantizer = layer.weight_quantizer
    if not isinstance(quantizer, RoundingQuantizer):
        raise TypeError(f"GPTQ needs a RoundingQuantizer on the weight (GPTQ.weight_quantizer), got "
                        f"{type(quantizer).__name__}")
    groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
    weight = layer.weight.detach()
    w = weight.reshape(groups, weight.shape[0] // groups, -1)
    if options.group_size is None:
        delta = quantizer.delta.reshape(groups, -1, 1).expand_as(w)
        zero = quantizer.zero_point.reshape(groups, -1, 1).expand_as(w)
    else:
        delta, zero = _group_grid(w, quantizer, options.group_size)
        quantizer.set_params(delta.reshape(weight.shape), zero.reshape(weight.shape))
    rounded = gptq_round(w, hessian, delta, zero, quantizer.levels, damp=options.damp,
                         block_size=options.block_size, act_order=options.act_order)
    # rounded = (k − z)·Δ exactly in FP64, so k is recovered exactly; the quantiser then computes (k − z)·Δ in the
    # weight's dtype, which is GPTQ's rounded weight in that dtype.
    codes = torch.round(rounded / delta.double()).add_(zero.double()).to(weight.dtype)
    quantizer.set_codes(weight, codes.reshape(weight.shape))
    quantizer.group_size = options.group_size  # the quantiser states the grids it holds (saved models record it)
    layer.clear_weight_cache()


@torch.no_grad()
def gptq_model(model: nn.Module, data: Any, forward: CalibrationForward, options: GPTQ) -> None:
    """GPTQ every weight-quantised layer of a calibrated model, in forward order (see the module docstring)."""
    layers = _weight_layers(model, data, forward)
    for k, (name, layer) in enumerate(layers):
        stop_at = layers[k + 1][1] if k + 1 < len(layers) else None
        hessian = _collect_hessian(model, layer, stop_at, data, forward)
        if not all_finite(hessian):  # damping cannot help, so say what can
            raise InputError(f"GPTQ, layer {name}: its calibration inputs hold NaN or Inf (non-finite calibration "
                             "data, or a model that produces them before this layer); pass finite calibration "
                             "inputs")
        try:
            gptq_layer(layer, hessian, options)
        except NotPositiveDefinite as err:
            raise ValueError(f"GPTQ, layer {name}: {err} (GPTQ(damp=...), now {options.damp})") from None
