"""RepQ-ViT's scale reparameterisation over any LayerNorm → Linear pairs (docs/algorithm.md#repq-vit).

A post-LayerNorm activation has a few outlier channels, so it is first calibrated with a per-channel quantiser
(Δ_c, z_c). Reparameterisation then moves the per-channel scale into the LayerNorm affine and the next layer's
weight columns, leaving one per-tensor grid (mean Δ, mean z) that cheap integer kernels can use, while the float
function is unchanged.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..quant.modules import QuantLinear
from ..quant.quantizers import UniformQuantizer

#: (LayerNorm, following Linear) names relative to a parent module; each model family supplies its own.
NormLinearPairs = tuple[tuple[str, str], ...]


def layernorm_linear_pairs(model: nn.Module, pairs: NormLinearPairs) -> Iterator[tuple[str, nn.LayerNorm, QuantLinear]]:
    """LayerNorm → QuantLinear pairs found by ``pairs`` under every module of ``model``.

    Only pairs whose Linear still has a channel-wise input quantiser qualify.
    """
    for name, module in model.named_modules():
        for norm_name, linear_name in pairs:
            try:
                norm = module.get_submodule(norm_name)
                linear = module.get_submodule(linear_name)
            except AttributeError:
                continue
            q = getattr(linear, "input_quantizer", None)
            if isinstance(norm, nn.LayerNorm) and isinstance(q, UniformQuantizer) and q.channel_axis is not None:
                yield f"{name}.{norm_name}".lstrip("."), norm, linear


@torch.no_grad()
def reparameterize(norm: nn.LayerNorm, linear: QuantLinear) -> None:
    """Fold the per-channel input scales of ``linear`` into ``norm`` and ``linear`` (float function kept).

    r_c = Δ_c/mean(Δ), b_c = m_c/r_c − m̄ with m = −z·Δ; γ ← γ/r, β ← β/r − b; W[:, c] ← W[:, c]·r_c,
    bias ← bias + W·b. The input quantiser becomes per tensor with (mean Δ, mean z) — z̄ is not rounded —
    and the weight quantiser is reset so the next calibration pass re-fits it on the new weights.
    """
    q = linear.input_quantizer
    if not q.calibrated:
        raise RuntimeError("reparameterize needs a calibrated input quantiser; run a calibration pass first")
    delta, zero = q.delta.reshape(-1), q.zero_point.reshape(-1)
    offset = -zero * delta
    delta_mean, zero_mean = delta.mean(), zero.mean()
    offset_mean = -zero_mean * delta_mean
    r = delta / delta_mean
    b = offset / r - offset_mean

    norm.weight.data = norm.weight.data / r
    norm.bias.data = norm.bias.data / r - b
    linear.weight.data = linear.weight.data * r.reshape(1, -1)
    shift = torch.mm(linear.weight.data, b.reshape(-1, 1)).reshape(-1)
    if linear.bias is None:
        linear.bias = nn.Parameter(shift)
    else:
        linear.bias.data = linear.bias.data + shift

    q.channel_axis = None
    q.set_params(delta_mean.reshape(()), zero_mean.reshape(()))
    linear.weight_quantizer.reset()


def reparameterize_model(model: nn.Module, pairs: NormLinearPairs) -> list[str]:
    """Reparameterise every LayerNorm → Linear pair; returns the LayerNorm names touched."""
    found = list(layernorm_linear_pairs(model, pairs))
    for _, norm, linear in found:
        reparameterize(norm, linear)
    return [name for name, _, _ in found]
