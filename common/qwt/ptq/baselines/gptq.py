"""GPTQ weights (Frantar et al., ICLR 2023) with another baseline's activations, or none (weights only).

The activations are those of the model family's default baseline (RepQ-ViT on ViT, DeiT and Swin, percentile on
CNNs, RTN on decoder LMs) unless ``activations`` names one; that baseline's post-calibration step (RepQ-ViT's
reparameterisation) runs first, so GPTQ rounds the weights the model finally uses. Then every weight-quantised
layer, in the order the forward first reaches it, gets its Hessian from its calibration inputs as the layers before
it produce them, already GPTQ-rounded and with every activation quantiser on (so a layer sees the quantised inputs
it multiplies), and is rounded at once.

Where the model's family has a block plan whose blocks hold every weight-quantised layer (a decoder LM: every
quantised Linear is inside a decoder layer), the inputs are walked block by block, as the published code does:
the plan's stem maps each calibration batch (each batch of a :class:`~qwt.ptq.Batches`, or the data as one batch)
to the first block's input, kept in a :class:`~qwt.compensation.features.FeatureStore`; each block's layers are
then collected and rounded in the order the block first runs them, by running the block on every stored batch and
stopping it at the next layer, and the rounded block's outputs become the next block's inputs. A layer sees
exactly what the whole calibration forward would give it (the same arithmetic, one block instead of the model
prefix per layer; the caller's calibration forward is not used). Otherwise (a ViT's patch embedding or head, a CNN's stem or classifier, a detector's neck lie
outside every block) each layer's inputs are produced again by a calibration forward per batch that stops at the
next layer: memory is one forward's activations plus one layer's Hessian, any calibration forward works (a
detector's too), and the price is about half a forward per layer. Either way a module called several times per
forward contributes the calls made before the next layer is first reached.

Each layer's GPTQ loss and its output error against round-to-nearest's are left on the model
(:func:`gptq_layers`), which tells layer by layer whether GPTQ did better than RTN on its calibration inputs.

The result lives in the layer's weight quantiser, a :class:`~qwt.quant.quantizers.RoundingQuantizer`: it keeps
the grid (per channel from its percentile search, or per static group of ``group_size`` columns from the same
search on each group) and stores, per weight, the integer offset from round-to-nearest to GPTQ's code. The float
weight stays the layer's weight, so switching quantisation off gives the float layer (the target QwT fits
towards), and switching it on gives GPTQ's rounded weight bit for bit; saving, loading and the ONNX simulation
export handle the quantiser like any other.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...compensation.blockwise import BlockPlan, Step
from ...compensation.features import FeatureStore
from ...errors import InputError
from ...quant.gptq import NotPositiveDefinite, gptq_round, hessian_update, layer_columns
from ...quant.modules import QuantConv2d, QuantLinear, quant_modules
from ...quant.quantizers import Quantizer, RoundingQuantizer, UniformQuantizer, search_uniform, uniform_fake_quant
from ...utils import all_finite
from ..calibration import each_batch
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


#: Attribute of a GPTQ-quantised model's root module: each layer's statistics (:func:`gptq_layers`); a plain
#: attribute, not saved with the model.
GPTQ_LAYERS = "qwt_gptq_layers"


def gptq_layers(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per layer of the last GPTQ run on ``model`` (empty if none): ``gptq_loss`` (the published algorithm's
    loss), ``output_error`` = ‖X(W − Q)ᵀ‖²_F = tr((W − Q) H (W − Q)ᵀ)/2 on the calibration inputs X (H = 2XᵀX,
    undamped), ``output_error_rtn`` the same for round-to-nearest on the same grid, and ``output_norm`` =
    ‖XWᵀ‖²_F (to read the errors relative to the layer's output). GPTQ beats RTN on a layer where
    output_error < output_error_rtn."""
    return dict(getattr(model, GPTQ_LAYERS, {}))


def _weight_layer_names(model: nn.Module) -> dict[nn.Module, str]:
    return {module: name for name, module in quant_modules(model) if isinstance(module, (QuantLinear, QuantConv2d))}


def _first_reached(names: dict[nn.Module, str], run: Callable[[], None]) -> list[nn.Module]:
    """The modules of ``names`` in the order ``run`` first reaches them."""
    order: dict[nn.Module, None] = {}
    hooks = [m.register_forward_pre_hook(lambda module, args: order.setdefault(module)) for m in names]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return list(order)


def _collect_hessian(layer: nn.Module, stop_at: nn.Module | None, runs: list[Callable[[], Any]]) -> torch.Tensor:
    """H = 2·Σ XᵀX over every call of ``layer`` before ``stop_at`` is first reached, in each of ``runs`` (a
    calibration forward per batch, or a block on each stored batch)."""
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
        for run in runs:
            try:
                run()
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


def _output_error(difference: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(D H Dᵀ)/2 summed over the groups: ‖X Dᵀ‖²_F for H = 2XᵀX, in FP64."""
    d = difference.double()
    return float((torch.matmul(d, hessian.double()) * d).sum() / 2)


@torch.no_grad()
def gptq_layer(layer: nn.Module, hessian: torch.Tensor, options: GPTQ) -> dict[str, float]:
    """Round ``layer``'s weight with GPTQ on its calibrated weight quantiser's grid (per channel, or static groups
    searched here) and give the quantiser GPTQ's codes; the layer's float weight is left as it is. Returns the
    layer's statistics (see :func:`gptq_layers`)."""
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
    rounded, loss = gptq_round(w, hessian, delta, zero, quantizer.levels, damp=options.damp,
                               block_size=options.block_size, act_order=options.act_order)
    # rounded = (k − z)·Δ exactly in FP64, so k is recovered exactly; the quantiser then computes (k − z)·Δ in the
    # weight's dtype, which is GPTQ's rounded weight in that dtype.
    codes = torch.round(rounded / delta.double()).add_(zero.double()).to(weight.dtype)
    quantizer.set_codes(weight, codes.reshape(weight.shape))
    quantizer.group_size = options.group_size  # the quantiser states the grids it holds (saved models record it)
    layer.clear_weight_cache()
    nearest = uniform_fake_quant(w.double(), delta.double(), zero.double(), quantizer.levels)
    return {"gptq_loss": loss, "output_error": _output_error(w - rounded, hessian),
            "output_error_rtn": _output_error(w - nearest, hessian), "output_norm": _output_error(w, hessian)}


def _round(name: str, layer: nn.Module, hessian: torch.Tensor, options: GPTQ) -> dict[str, float]:
    """:func:`gptq_layer`, with its failures named by the layer and the fix."""
    if not all_finite(hessian):  # damping cannot help, so say what can
        raise InputError(f"GPTQ, layer {name}: its calibration inputs hold NaN or Inf (non-finite calibration "
                         "data, or a model that produces them before this layer); pass finite calibration "
                         "inputs")
    try:
        return gptq_layer(layer, hessian, options)
    except NotPositiveDefinite as err:
        raise ValueError(f"GPTQ, layer {name}: {err} (GPTQ(damp=...), now {options.damp})") from None


def _round_in_order(layers: list[nn.Module], names: dict[nn.Module, str], runs: list[Callable[[], Any]],
                    options: GPTQ, stats: dict[str, dict[str, float]]) -> None:
    """Round ``layers`` one after another, each on the inputs ``runs`` give it once the layers before it are
    rounded; each run is stopped at the next layer."""
    for k, layer in enumerate(layers):
        stop_at = layers[k + 1] if k + 1 < len(layers) else None
        stats[names[layer]] = _round(names[layer], layer, _collect_hessian(layer, stop_at, runs), options)


def _forward_walk(model: nn.Module, data: Any, forward: CalibrationForward, options: GPTQ
                  ) -> dict[str, dict[str, float]]:
    """Every weight layer's inputs from a calibration forward per batch, stopped at the next layer."""
    names = _weight_layer_names(model)
    runs = [partial(forward, model, batch) for batch in each_batch(data)]
    layers = _first_reached(names, lambda: [run() for run in runs])
    stats: dict[str, dict[str, float]] = {}
    _round_in_order(layers, names, runs, options, stats)
    return stats


def _covering_plan(model: nn.Module) -> BlockPlan | None:
    """The model's family's block plan, if its blocks hold every weight-quantised layer (a decoder LM's do);
    None otherwise (e.g. a ViT's patch embedding and head lie outside its blocks), or for a model no registered
    family recognises."""
    from ...family import family_of  # the family module imports the PTQ config, which imports the baselines

    try:
        plan = family_of(model).plan(model)
    except ValueError:
        return None
    inside = {m for step in plan.steps for m in model.get_submodule(step.path).modules()}
    return plan if all(layer in inside for layer in _weight_layer_names(model)) else None


def _run_step(step: Step, block: nn.Module, feats: FeatureStore, k: int, device: torch.device) -> torch.Tensor:
    return step.run(block, feats.get(k, device))


def _block_walk(model: nn.Module, plan: BlockPlan, data: Any, options: GPTQ) -> dict[str, dict[str, float]]:
    """Every weight layer's inputs from its block run on stored block inputs (see the module docstring)."""
    names = _weight_layer_names(model)
    feats, device = FeatureStore(None), None
    for k, batch in enumerate(each_batch(data)):
        if isinstance(batch, torch.Tensor):
            plan.check_inputs(batch, "calibration inputs")
        x = plan.stem(batch)
        device = x.device if device is None else device
        feats.put(k, x)
    stats: dict[str, dict[str, float]] = {}
    for step in plan.steps:
        block = model.get_submodule(step.path)
        inside = {m: names[m] for m in block.modules() if m in names}
        if inside:  # a transition without weight layers just runs
            runs = [partial(_run_step, step, block, feats, k, device) for k in range(len(feats))]
            _round_in_order(_first_reached(inside, runs[0]), inside, runs, options, stats)
        for k in range(len(feats)):  # the next step's inputs, through the rounded block
            feats.put(k, step.run(block, feats.get(k, device)))
    return stats


@torch.no_grad()
def gptq_model(model: nn.Module, data: Any, forward: CalibrationForward, options: GPTQ) -> None:
    """GPTQ every weight-quantised layer of a calibrated model, in forward order (see the module docstring); each
    layer's statistics are left on the model (:func:`gptq_layers`)."""
    plan = _covering_plan(model)
    stats = _forward_walk(model, data, forward, options) if plan is None else _block_walk(model, plan, data, options)
    setattr(model, GPTQ_LAYERS, stats)
