"""Channel-wise affine compensation: per output channel ``z ← g·z + b`` on the last Linear/Conv of each residual
branch, fitted in closed form; it folds into that layer's weight scale and bias, so it costs nothing at inference.

The derivation is in docs/channelwise_compensation.md. The target layers are the family's ``residual_branches``;
the walk over the plan is :func:`qwt.compensation.fit_compensation`'s. Per block: one FP pass records the FP
outputs z_fp of the target layers; then, layer by layer, a quantised pass (with the layers already fitted corrected)
gives z_q, and each channel's (g, b) minimises Σ (g·z_q + b − z_fp)² — a one-feature regression whose normal
equations need only five running sums (FP64). A final quantised pass gives the next block's input.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..quant.modules import QuantModule, quant_state, swap_module
from .guard import HeldOutGuard
from .sinks import SinkEnergy, sink_mask
from .targets import fit_rows, propagated_target

if TYPE_CHECKING:
    from .blockwise import BlockInputs, QwTConfig, Step
    from .features import FeatureStore


class ChannelAffine(nn.Module):
    """``layer(x)·gain + bias`` per output channel (last axis for Linear, axis 1 for Conv2d)."""

    def __init__(self, layer: nn.Module, gain: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.channel_axis = 1 if isinstance(layer, nn.Conv2d) else -1
        self.register_buffer("gain", gain.detach().float().clone())
        self.register_buffer("shift", bias.detach().float().clone())

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, 1, 1) if self.channel_axis == 1 else t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) * self._view(self.gain) + self._view(self.shift)


class _AffineFit:
    """Streaming per-channel simple regression z_fp ≈ g·z_q + b."""

    def __init__(self, channel_axis: int) -> None:
        self.axis = channel_axis
        self.sums: torch.Tensor | None = None  # (6, C): n, Σq, Σf, Σq², Σqf, Σf²

    def update(self, z_q: torch.Tensor, z_fp: torch.Tensor) -> None:
        channels = z_q.shape[self.axis]
        q = z_q.movedim(self.axis, -1).reshape(-1, channels).double()
        f = z_fp.movedim(self.axis, -1).reshape(-1, channels).double()
        sums = torch.stack([torch.full_like(q[0], q.shape[0]), q.sum(0), f.sum(0), (q * q).sum(0),
                            (q * f).sum(0), (f * f).sum(0)])
        self.sums = sums if self.sums is None else self.sums + sums

    def reduce(self) -> None:
        """Sum the running sums over processes (torch.distributed), as the dense solver does."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)

    def solve(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(gain, bias, R²): R² = 1 − SSE(fit)/SSE(uncorrected) of the error z_fp − z_q, pooled over channels."""
        n, sq, sf, sqq, sqf, sff = self.sums
        var_q = sqq - sq * sq / n
        gain = (sqf - sq * sf / n) / var_q.clamp_min(1e-30)
        # A constant or anti-correlated channel has no usable gain: correct its mean only.
        gain = torch.where((var_q > 1e-12 * sqq.clamp_min(1e-30)) & (gain > 0), gain, torch.ones_like(gain))
        bias = (sf - gain * sq) / n
        sse_before = self.error()
        sse_after = self._sse(gain, bias)
        r2 = float(1 - sse_after / sse_before) if sse_before > 0 else 0.0
        return gain.float(), bias.float(), r2

    def _sse(self, gain: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, sq, sf, sqq, sqf, sff = self.sums
        return (sff + gain**2 * sqq + n * bias**2 - 2 * gain * sqf - 2 * bias * sf + 2 * gain * bias * sq).sum()

    def error(self, gain: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Σ (z_fp − corrected z_q)² over the rows summed here: uncorrected when no (gain, bias) is given."""
        if gain is None:
            n, sq, sf, sqq, sqf, sff = self.sums
            return (sff - 2 * sqf + sqq).sum()
        return self._sse(gain.to(self.sums), bias.to(self.sums))


def _record(block: nn.Module, names: list[str], run: Callable[[], torch.Tensor]
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``run`` with forward hooks on ``names``; returns its output and the recorded layer outputs."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [block.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
             for n in names]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def _target(block: nn.Module, name: str) -> str:
    """``name``, or the Linear/Conv2d that a wrapper at ``name`` holds as ``layer`` (a W8A8 output quantiser:
    the correction goes inside it, so the quantiser sees the corrected output)."""
    module = block.get_submodule(name)
    while not isinstance(module, (nn.Linear, nn.Conv2d)) and isinstance(getattr(module, "layer", None), nn.Module):
        name, module = f"{name}.layer", module.layer
    return name


def channelwise_block_fit(residual_branches: Callable[[nn.Module, str], list[str]], config: QwTConfig) -> Callable:
    """The channel-wise form as a per-block fit for :func:`qwt.compensation.fit_compensation` (its ``BlockFit``).

    ``residual_branches(model, block_path)`` names the target layers (the family's). A layer is corrected only
    when its fit's R² > ``config.r2_threshold`` and the block index ≥ ``config.start_block``, and, when the guard
    holds batches out (``guard_fraction`` > 0), when the correction lowers the layer's error on them; the block's
    R² is the smallest of its layers'. With ``propagation`` α > 0 a layer's target is α·(its FP output on the FP
    stream) + (1 − α)·(its FP output on the quantised stream), as the dense form's.
    """
    def fit_block(model: nn.Module, step: Step, inputs: BlockInputs, index: int):
        module, feats, device = model.get_submodule(step.path), inputs.feats, inputs.device
        names = [_target(module, name) for name in residual_branches(model, step.path)]

        def record(names: list[str], x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return _record(module, names, lambda: step.run(module, x))

        targets, sinks = _fp_targets(module, names, inputs, record, config)
        r2s, guards, energies = {}, {}, {}
        for name in names:
            layer = module.get_submodule(name)
            axis = 1 if isinstance(layer, nn.Conv2d) else -1
            fit, guard = _AffineFit(axis), HeldOutGuard(inputs.heldout, _AffineFit(axis))
            energy = SinkEnergy(config.sink_norm_multiple) if sinks is not None else None
            for k in range(len(feats)):
                z_q, z_fp = record([name], feats.get(k, device))[1][name], targets[name].get(k, device)
                if energy is not None:
                    energy.add(z_fp - z_q, sinks[k])
                guard.route(k, fit).update(*fit_rows(sinks[k] if config.exclude_sinks else None, z_q, z_fp))
            targets[name].clear()
            fit.reduce()
            gain, bias, r2s[name] = fit.solve()
            if energy is not None:
                energies[name] = energy.report()
            if guard.judge(r2s[name] > config.r2_threshold and index >= config.start_block, guards, name, gain, bias):
                swap_module(module, name, ChannelAffine(layer, gain, bias))
        for k in range(len(feats)):
            feats.put(k, step.run(module, feats.get(k, device)))
        applied = any(isinstance(module.get_submodule(n), ChannelAffine) for n in names)
        meta = {"form": "channelwise", "r2_per_layer": r2s}
        return min(r2s.values()), applied, meta | ({"guard_per_layer": guards} if guards else {}) | \
            ({"sinks_per_layer": energies} if energies else {})

    return fit_block


def _fp_targets(module: nn.Module, names: list[str], inputs: BlockInputs, record: Callable, config: QwTConfig
                ) -> tuple[dict[str, FeatureStore], list[torch.Tensor] | None]:
    """Each target layer's FP output per batch, where the features wait: on the quantised stream, blended with
    the FP stream's (α > 0; the FP stream then moves on to the block's FP output); and, on sequence features,
    each batch's sink rows, from the same fetch of its input."""
    feats, device = inputs.feats, inputs.device
    targets = {name: feats.sibling() for name in names}
    sinks: list[torch.Tensor] | None = [] if inputs.sequence else None
    with quant_state(module, weight=False, act=False):
        for k in range(len(feats)):
            x = feats.get(k, device)
            if sinks is not None:
                sinks.append(sink_mask(x, config.sink_norm_multiple))
            seen = record(names, x)[1]
            stream = None
            if inputs.fp_feats is not None:
                y_stream, stream = record(names, inputs.fp_stream(k))
                inputs.fp_feats.put(k, y_stream)
            for name, z in seen.items():
                targets[name].put(k, propagated_target(z, None if stream is None else stream[name],
                                                       config.propagation))
    return targets, sinks


@torch.no_grad()
def fold_channelwise(model: nn.Module) -> int:
    """Fold every :class:`ChannelAffine` into its layer (in place): weight and per-channel weight scale × g,
    bias → g·bias + b. The integer weight codes are unchanged, so the exported graph has no extra op.
    A correction after a norm (Gemma 3's post-branch norms) folds its gain into the norm's weight
    (:func:`_fold_gain_into_norm`); a norm has no bias, so the shift stays, as a ChannelAffine of unit gain.
    Returns the number of corrections folded."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, ChannelAffine)]
    for name, affine in found:
        if not isinstance(affine.layer, (nn.Linear, nn.Conv2d)):
            _norm_offset(affine.layer, name)  # refuse a layer the gain cannot go into before changing any
    for name, affine in found:
        layer, gain = affine.layer, affine.gain
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            _fold_gain_into_norm(layer, gain, _norm_offset(layer, name))
            affine.gain.fill_(1.0)
            continue
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        q = getattr(layer, "weight_quantizer", None)
        if q is not None and q.calibrated:
            if q.delta.numel() != gain.numel():
                raise ValueError(f"{name}: a per-tensor weight scale cannot absorb a per-channel gain")
            q.delta = q.delta * gain.reshape(q.delta.shape)
        layer.weight.mul_(gain.reshape(shape))
        bias = affine.shift if layer.bias is None else layer.bias * gain + affine.shift
        layer.bias = nn.Parameter(bias)
        if isinstance(layer, QuantModule):
            layer.clear_weight_cache()  # the edits above already invalidate it; do not rely on that
        swap_module(model, name, layer)
    return len(found)


def _norm_offset(norm: nn.Module, name: str) -> float:
    """The ``a`` of a norm computing ``n(x)·(a + w)`` per channel (0: Llama's RMSNorm, LayerNorm without bias;
    1: Gemma's ``1 + weight``), found by running it with its weight at 0 and at 1 (nothing depends on its class);
    a layer of another form (no 1-D weight, a bias, output not linear in the weight) is refused."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or getattr(norm, "bias", None) is not None:
        raise ValueError(f"{name}: the correction follows a {type(norm).__name__}, which is neither a Linear, a "
                         "Conv2d nor a norm with one weight per channel and no bias; its gain cannot be folded")
    x = torch.randn(4, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight)
    saved = weight.detach().clone()
    try:
        weight.zero_()
        at0 = norm(x)
        weight.fill_(1.0)
        at1 = norm(x)
    finally:
        weight.copy_(saved)
    unit = at1 - at0  # n(x)
    for offset in (0.0, 1.0):
        if torch.allclose(at0, offset * unit, rtol=1e-5, atol=1e-6) and \
                torch.allclose(norm(x), (offset + saved) * unit, rtol=1e-5, atol=1e-6):
            return offset
    raise ValueError(f"{name}: the correction follows a {type(norm).__name__} whose output is not n(x)·w nor "
                     "n(x)·(1 + w); its gain cannot be folded")


def _fold_gain_into_norm(norm: nn.Module, gain: torch.Tensor, offset: float) -> None:
    """``n(x)·(a + w)·g = n(x)·(a + w')`` with ``w' = (a + w)·g − a``."""
    norm.weight.copy_((offset + norm.weight) * gain.to(norm.weight) - offset)
