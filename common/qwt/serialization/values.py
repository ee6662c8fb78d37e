"""Values no calibration can produce, refused however consistently a save is written: steps Δ ≤ 0, zero points
off their grid or beyond what calibration gives, weight grids that do not reach their weights, GPTQ codes off the
grid, FP16-evaluated compensation beyond FP16's range."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..compensation.modules import Compensated, LowRankCompensated
from ..quant.quantizers import (SYMMETRIC_GRIDS, Quantizer, RoundingQuantizer, UniformQuantizer, _param_shape,
                               _to_rows, nearest_codes)
from ..quant.rtn import MinMaxWeightQuantizer


def _is_integer(t: torch.Tensor) -> bool:
    return bool(torch.equal(t, torch.round(t)))


#: A zero point the affine percentile search computes in FP32 is within (L − 1)·2^25 of 0
#: (:func:`_zero_point_range`).
_AFFINE_ZERO_FACTOR = 2**25


def _zero_point_range(q: Quantizer, spec: dict[str, Any], levels: int) -> tuple[float, float, str]:
    """The zero points calibration can give ``q`` (described settings), and why.

    Min-max (RTN) and zero-included grids stretch the range to include 0, so z = round(−lo/Δ) ∈ [0, L−1]; the
    symmetric grids fix z = L/2. The authors' affine grid does not keep 0 inside: z = round(−lo·(L−1)/(hi−lo))
    for quantiles lo ≤ hi of the calibration data lies in [0, L−1] when lo ≤ 0 ≤ hi, but data on one side of 0
    and concentrated far from it give any |z| up to |lo|/(hi−lo)·(L−1). Calibration runs in FP32, where two
    distinct values of one sign differ by at least 2^−24 of the larger magnitude (the gap below a power of two),
    so |lo|/(hi−lo) ≤ 2^24, and the bound (L−1)·2^25 leaves a factor 2 for the rounding of Δ and −lo/Δ; equal
    quantiles take the step |lo|/(L−1), so |z| ≤ L−1. A mean of such zero points (reparameterisation) stays
    within the same bound. Inside it, only the calibration data could tell a forged zero point from a
    calibrated one.
    """
    if isinstance(q, MinMaxWeightQuantizer) or spec.get("grid") == "zero_included":
        return 0, levels - 1, "a grid whose range includes 0"
    if spec.get("grid") in SYMMETRIC_GRIDS:
        return levels // 2, levels // 2, "the symmetric grids' zero point"
    bound = (levels - 1) * _AFFINE_ZERO_FACTOR
    return -bound, bound, "what the affine percentile search can give in FP32"


def averaged_zero_points(skeleton: nn.Module, quantizers: dict[str, dict[str, Any]]) -> set[str]:
    """Channel-wise quantisers (as the config builds them) described as per tensor: RepQ-ViT's
    reparameterisation averaged their zero points, which need not be integers then."""
    return {name for name, q in skeleton.named_modules() if isinstance(q, UniformQuantizer)
            and q.channel_axis is not None and quantizers[name].get("channel_axis", q.channel_axis) is None}


def quantizer_value_problems(skeleton: nn.Module, state: dict[str, torch.Tensor],
                              quantizers: dict[str, dict[str, Any]], averaged: set[str]) -> list[str]:
    """Quantiser parameters no calibration can produce.

    Every step Δ is > 0. A zero point is an integer (unless it is ``averaged``) within
    :func:`_zero_point_range`. A weight quantiser's parameters are also checked against the weight the file
    holds (:func:`_weight_problems`). Finiteness is checked with the other tensors. ``skeleton``'s quantisers
    carry the described settings.
    """
    problems = []
    for name, q in skeleton.named_modules():
        if not isinstance(q, Quantizer) or f"{name}.delta" not in state:
            continue
        spec, delta, zero = quantizers[name], state[f"{name}.delta"], state.get(f"{name}.zero_point")
        if not bool((delta > 0).all()):
            problems.append(f"{name}.delta holds a step ≤ 0")
            continue
        if zero is None:
            continue
        low, high, meaning = _zero_point_range(q, spec, 2 ** spec["n_bits"])
        if name not in averaged and not _is_integer(zero):
            problems.append(f"{name}.zero_point holds a non-integer zero point")
        elif not bool(((zero >= low) & (zero <= high)).all()):
            problems.append(f"{name}.zero_point lies outside {low}..{high} ({meaning})")
        elif name.endswith(".weight_quantizer"):
            problems += _weight_problems(name, q, state)
    return problems


def _weight_problems(name: str, q: Quantizer, state: dict[str, torch.Tensor]) -> list[str]:
    """A weight quantiser's Δ and z have the shape its settings give for the weight, and each grid reaches the
    weights it quantises to within one step (calibration puts the grid's ends within Δ/2 of quantiles of those
    weights, and a min-max grid spans them); GPTQ's codes lie on the grid (:func:`_rounding_problems`)."""
    weight = state.get(name.removesuffix("_quantizer"))
    if weight is None or not weight.is_floating_point() or weight.numel() == 0 or \
            not isinstance(q, (UniformQuantizer, MinMaxWeightQuantizer)):
        return []
    delta, zero = state[f"{name}.delta"], state[f"{name}.zero_point"]
    try:
        shape, one_per_grid, rows = _weight_grids(q, weight)
    except ValueError as err:
        return [f"{name}: {err}"]
    if tuple(delta.shape) != shape or tuple(zero.shape) != shape:
        return [f"{name}: Δ and z have shape {tuple(delta.shape)}, but its settings give {shape} for "
                f"{name.removesuffix('_quantizer')} {tuple(weight.shape)}"]
    problems = _rounding_problems(name, q, state, weight) if isinstance(q, RoundingQuantizer) else []
    if not problems and not _grid_reaches(rows, one_per_grid(delta), one_per_grid(zero), q.levels):
        problems.append(f"{name}: its grid does not reach the weights it quantises (zero point or step out of "
                        "range)")
    return problems


def _weight_grids(q: Quantizer, weight: torch.Tensor
                  ) -> tuple[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """How ``q`` lays its grids over ``weight``: the shape of Δ and z, how to take one value per grid from
    them, and the weight as one row per grid. ValueError where the settings cannot quantise this weight."""
    if isinstance(q, MinMaxWeightQuantizer):
        groups = q._grouped(weight)
        return (groups.shape[0], groups.shape[1], 1), lambda p: p.reshape(-1), groups.reshape(-1, groups.shape[2])
    if isinstance(q, RoundingQuantizer) and q.group_size is not None:
        size = min(q.group_size, weight[0].numel())  # a group wider than the row is the row
        return (tuple(weight.shape), lambda p: p.reshape(weight.shape[0], -1)[:, ::size].reshape(-1),
                _column_groups(weight, size))
    return _param_shape(weight, q.channel_axis), lambda p: p.reshape(-1), _to_rows(weight, q.channel_axis)


def _column_groups(weight: torch.Tensor, size: int) -> torch.Tensor:
    """Each output channel's columns (GPTQ's order) cut into groups of ``size``, one group per row; the last,
    shorter group is padded with its own last value, which changes neither its minimum nor its maximum."""
    w = weight.reshape(weight.shape[0], -1)
    pad = -w.shape[1] % size
    if pad:
        w = torch.cat([w, w[:, -1:].expand(-1, pad)], 1)
    return w.reshape(-1, size)


def _rounding_problems(name: str, q: RoundingQuantizer, state: dict[str, torch.Tensor],
                       weight: torch.Tensor) -> list[str]:
    """GPTQ's quantiser: with static groups, Δ and z are constant over each group of columns; the offsets have
    the weight's shape (or none: GPTQ has not run), and every code, round-to-nearest plus offset as the
    quantiser computes it, lies on the grid 0..L−1 (GPTQ only ever picks codes there)."""
    delta, zero, offset = (state[f"{name}.{leaf}"] for leaf in ("delta", "zero_point", "offset"))
    if q.group_size is not None:
        columns = torch.arange(delta[0].numel()) // q.group_size * q.group_size
        if any(not torch.equal(p.reshape(p.shape[0], -1), p.reshape(p.shape[0], -1)[:, columns])
               for p in (delta, zero)):
            return [f"{name}: Δ or z varies within a group of {q.group_size} columns (group_size is not the one "
                    "GPTQ used)"]
    if offset.numel() == 0:
        return []
    if offset.shape != weight.shape:
        return [f"{name}.offset has shape {tuple(offset.shape)}, expected the weight's {tuple(weight.shape)}"]
    codes = nearest_codes(weight, delta, zero, q.levels).add_(offset.to(weight.dtype))
    if not bool(((codes >= 0) & (codes <= q.levels - 1)).all()):
        return [f"{name}.offset moves codes off the grid 0..{q.levels - 1}"]
    return []


def _grid_reaches(rows: torch.Tensor, delta: torch.Tensor, zero: torch.Tensor, levels: int) -> bool:
    """Each row's grid [−zΔ, (L−1−z)Δ] comes within one step Δ of the row's values."""
    rows = rows.detach().double()
    d, z = delta.double().reshape(-1), zero.double().reshape(-1)
    low, high = -z * d, (levels - 1 - z) * d
    return bool(((low <= rows.amax(1) + d) & (high >= rows.amin(1) - d)).all())


def compensation_problems(description: dict[str, Any], state: dict[str, torch.Tensor]) -> list[str]:
    """A compensation weight evaluated in FP16 (``fp16_eval``) must be representable there: a larger magnitude is
    ±Inf in FP16, and Inf (or Inf·0 = NaN) reaches the block's output whatever the input, so no working model
    holds one. An FP32 compensation is bounded only by finiteness: a least-squares fit on nearly collinear
    features may legitimately be large, and without the calibration features no bound separates it from a
    forged one. A channel-wise gain is never negative: the fit keeps a positive gain or uses 1."""
    problems = []
    for spec in description["compensation"]:
        if spec["form"] == "channelwise":
            gain = state.get(f"{spec['path']}.gain")
            if gain is not None and bool((gain < 0).any()):
                problems.append(f"{spec['path']}.gain holds a negative gain, which the channel-wise fit never gives")
            continue
        for name in (LowRankCompensated if spec["form"] == "lowrank" else Compensated).half_parameters:
            weight = state.get(f"{spec['path']}.{name}")
            if spec["fp16_eval"] and weight is not None and weight.is_floating_point() and \
                    bool(torch.isinf(weight.half()).any()):
                problems.append(f"{spec['path']}.{name} holds values beyond FP16's range, in which fp16_eval "
                                "evaluates it")
    return problems
