"""Save and load a quantised, compensated model: ``model.safetensors`` + ``qwt.json``.

The tensors hold everything that calibration and fitting produced (reparameterised weights, quantiser Δ/z,
compensation W/b); the JSON says how to rebuild the module structure around them: registry name and builder
arguments, the PTQ config the model was quantised with, every quantiser's kind, bit width and declared settings
(grid, axis, log floor, group size) as read from the model itself, which blocks carry which compensation, and the
SHA-256 of every tensor's bytes. The SHA-256 of the JSON is stored in the tensor file.

What the checks guarantee, and what they do not:

- The checksums detect accidental damage (a truncated file, a flipped bit) and an edit or swap of either file
  alone. They do not detect a deliberate, consistent rewrite: whoever rewrites the tensors and the description
  can recompute every checksum.
- The value checks refuse what the format cannot mean, however consistently written: a config other than the
  one the model was quantised with (on save) or than the quantisers' settings; tensors of the wrong dtype or
  shape or with NaN/Inf; Δ ≤ 0; zero points off their grid or beyond what calibration can produce; GPTQ codes off
  the grid; weight grids that do not reach their weights; FP16-evaluated compensation beyond FP16's range;
  builder arguments the registered model does not take (its entry's ``check_saved_args``). Values that are
  possible but wrong (a zero point or a compensation weight calibration could have produced, an argument that
  keeps every tensor's shape such as a language model's rotary base) cannot be told from genuine ones.
- Loading never runs code from the files (nothing is unpickled; the description names a registered builder) and
  bounds what it allocates: the description's size, nesting and builder arguments (nested configs included) are
  bounded, and the structure is first built on the ``meta`` device, before any memory is allocated for it. A
  saved model from an untrusted source is data, not code, but its numbers are only as trustworthy as its source.

Saving writes a fresh temporary folder and renames it into place; it replaces only a previous save that holds
nothing else, and never deletes a file it did not write.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .compensation.channelwise import ChannelAffine
from .compensation.modules import Compensated, ConvCompensated, LinearCompensated
from .errors import InputError
from .models import get_model_entry
from .ptq import APPLIED_CONFIG, PTQConfig, applied_config
from .ptq.surgery import quantize_modules
from .quant.modules import set_quant_state, swap_module
from .quant.quantizers import (SYMMETRIC_GRIDS, Quantizer, RoundingQuantizer, UniformQuantizer, _param_shape,
                               _to_rows, nearest_codes)
from .quant.rtn import MinMaxWeightQuantizer
from .utils import all_finite

TENSORS, DESCRIPTION = "model.safetensors", "qwt.json"
#: 4: per-tensor SHA-256 (``tensors``) and the uniform quantisers' ``grid`` in the description.
FORMAT_VERSION = 4
_HASH_KEY = "qwt_description_sha256"
_SHOWN = 5  # differences listed in an error message

#: Bounds on what a description may declare, checked before anything is built. A real description is a few
#: hundred kB (one entry per quantiser and block) and a few levels deep; the builder arguments are those of the
#: registered models (the largest timm ImageNet models, and language models of hundreds of billions of
#: parameters, stay inside these). A limit applies to its key at any depth (a language model's nested config).
MAX_DESCRIPTION_BYTES = 16 * 2**20
MAX_NESTING = 8
BUILD_LIMITS = {"img_size": 2048, "patch_size": 2048, "in_chans": 64, "embed_dim": 16384, "depth": 256,
                "num_heads": 256, "num_classes": 100_000, "mlp_ratio": 64,
                "num_hidden_layers": 256, "hidden_size": 32768, "intermediate_size": 131_072, "vocab_size": 2**20,
                "num_attention_heads": 256, "num_key_value_heads": 256, "head_dim": 1024,
                "max_position_embeddings": 2**20}
#: Any other integer or float a top-level builder argument declares, and any top-level list's length. Other
#: numbers of a nested config (token ids, rotary bases) size nothing and are not bounded.
MAX_BUILD_NUMBER, MAX_BUILD_ITEMS = 100_000, 16
#: The length of a list in a nested config (a language model's per-layer list has one item per layer).
MAX_CONFIG_ITEMS = 1024
#: Builder arguments a description may not set: the saved tensors are the weights, nothing else is read.
FORBIDDEN_BUILD_ARGS = ("checkpoint", "pretrained")


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes in memory order (as safetensors stores them on a little-endian machine)."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy() if flat.numel() else b"").hexdigest()


def _describe_compensation(model: nn.Module) -> list[dict[str, Any]]:
    out = []
    for name, module in model.named_modules():
        if isinstance(module, ConvCompensated):
            w = module.comp_weight
            out.append({"path": name, "form": "conv", "in": w.shape[1] * module.groups, "out": w.shape[0],
                        "kernel_size": w.shape[-1], "stride": module.stride, "groups": module.groups,
                        "fp16_eval": module.fp16_eval})
        elif isinstance(module, LinearCompensated):
            w = module.comp_weight
            out.append({"path": name, "form": "linear", "in": w.shape[0], "out": w.shape[1],
                        "fp16_eval": module.fp16_eval})
    return out


def _describe_quantizers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every quantiser's settings as the model holds them (not as a config says they should be)."""
    out = {}
    for name, q in model.named_modules():
        if not isinstance(q, Quantizer):
            continue
        if not q.calibrated:
            raise InputError(f"quantiser {name} is not calibrated: quantise and calibrate the model before saving")
        spec: dict[str, Any] = {"kind": q.kind, "n_bits": q.n_bits, "shape": list(q.delta.shape)}
        spec |= {setting: getattr(q, setting) for setting in q.settings}
        if isinstance(q, RoundingQuantizer):
            spec["offset_shape"] = list(q.offset.shape)
        out[name] = spec
    return out


def _skeleton(description: dict[str, Any], where: str, device: str = "cpu") -> nn.Module:
    """The module structure a description implies: built on ``device`` (``meta``: shapes only, no memory),
    quantised by its config, compensation wrappers in place.

    A description that cannot be built (a block path the architecture lacks, a malformed entry) is refused
    naming ``where`` it came from.
    """
    try:
        with torch.device(device):
            return _build(description)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError, ZeroDivisionError) as err:
        raise InputError(f"{where} does not describe a buildable model ({type(err).__name__}: {err})") from None


def _build(description: dict[str, Any]) -> nn.Module:
    entry = get_model_entry(description["model"])
    model = entry.build(pretrained=False, **description["build_kwargs"])
    config = PTQConfig.from_dict(description["ptq"]).for_family(entry.family)
    quantize_modules(model, entry.family.layer_rule(model, config))
    for spec in description["compensation"]:
        block = model.get_submodule(spec["path"])
        if spec["form"] == "linear":
            wrapper: Compensated = LinearCompensated.zeros(block, spec["in"], spec["out"], spec["fp16_eval"])
        else:
            wrapper = ConvCompensated.zeros(block, spec["in"], spec["out"], spec["kernel_size"], spec["stride"],
                                            spec["groups"], spec["fp16_eval"])
        swap_module(model, spec["path"], wrapper)
    return model


def _one_sided(expected: Iterable[str], actual: Iterable[str], absent: str, extra: str) -> list[str]:
    """Names found on one side only, as messages: ``absent`` / ``extra`` are formats with ``{}`` for the name."""
    expected, actual = list(expected), list(actual)
    exp, act = set(expected), set(actual)
    return [absent.format(k) for k in expected if k not in act] + [extra.format(k) for k in actual if k not in exp]


def _quantizer_differences(expected: nn.Module, actual: dict[str, dict[str, Any]]) -> list[str]:
    """How the quantisers a config builds differ from the described ones: kind, bits, and every setting the
    quantiser declares (:attr:`Quantizer.settings`; a value a later step may give it, such as the per-tensor axis
    of a reparameterised quantiser, is no difference)."""
    built = {name: q for name, q in expected.named_modules() if isinstance(q, Quantizer)}
    diffs = _one_sided(built, actual, "{}: the model has no such quantiser", "{}: the config does not quantise it")
    for name, spec in actual.items():
        q = built.get(name)
        if q is None:
            continue
        if q.kind != spec["kind"]:
            diffs.append(f"{name}: the model's quantiser is {spec['kind']}, the config gives {q.kind}")
        elif q.n_bits != spec["n_bits"]:
            diffs.append(f"{name}: the model quantises to {spec['n_bits']} bits, the config to {q.n_bits}")
        else:
            diffs += _setting_differences(name, q, spec)
    return diffs


def _setting_differences(name: str, q: Quantizer, spec: dict[str, Any]) -> list[str]:
    """Declared settings whose described value is neither the config's nor an adjustable one. A setting the
    description lacks was saved before the quantiser declared it: the config's value stands (see
    :func:`_described_settings`), and the tensors' shapes are checked against it."""
    diffs = []
    for setting in q.settings:
        if setting not in spec:
            continue
        value, built = spec[setting], getattr(q, setting)
        if value != built and value not in q.adjustable_settings.get(setting, ()):
            diffs.append(f"{name}: the model's {setting} is {value!r}, the config's {built!r}")
    return diffs


def _described_settings(model: nn.Module, quantizers: dict[str, dict[str, Any]]) -> None:
    """Give every quantiser of ``model`` its described settings (checked against the config by
    :func:`_quantizer_differences`); one the description lacks keeps the config's."""
    for name, q in model.named_modules():
        if isinstance(q, Quantizer):
            spec = quantizers[name]
            for setting in q.settings:
                setattr(q, setting, spec.get(setting, getattr(q, setting)))


def _listing(diffs: list[str]) -> str:
    more = f"; … {len(diffs) - _SHOWN} more" if len(diffs) > _SHOWN else ""
    return "; ".join(diffs[:_SHOWN]) + more


def _quantizer_buffer_shape(key: str, quantizers: dict[str, Any]) -> tuple[int, ...] | None:
    """The shape a quantiser's calibrated buffer has according to the description (None: not such a buffer)."""
    owner, _, leaf = key.rpartition(".")
    spec = quantizers.get(owner)
    if spec is None:
        return None
    if leaf in ("delta", "zero_point"):
        return tuple(spec["shape"])
    return tuple(spec["offset_shape"]) if leaf == "offset" and "offset_shape" in spec else None


def _tensor_problems(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                     quantizers: dict[str, dict[str, Any]]) -> list[str]:
    """Tensors without the dtype and shape the structure implies, or with values that are not finite."""
    problems = _one_sided(reference, state, "missing {}", "unexpected {}")
    for key, tensor in state.items():
        ref = reference.get(key)
        if ref is None:
            continue
        described = _quantizer_buffer_shape(key, quantizers)
        shape = described if described is not None else tuple(ref.shape)
        if tensor.dtype != ref.dtype:
            problems.append(f"{key} is {tensor.dtype}, expected {ref.dtype}")
        elif tuple(tensor.shape) != shape:
            problems.append(f"{key} has shape {tuple(tensor.shape)}, expected {shape}")
        elif tensor.is_floating_point() and not all_finite(tensor):
            problems.append(f"{key} holds NaN or Inf")
    return problems


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


def _averaged(skeleton: nn.Module, quantizers: dict[str, dict[str, Any]]) -> set[str]:
    """Channel-wise quantisers (as the config builds them) described as per tensor: RepQ-ViT's
    reparameterisation averaged their zero points, which need not be integers then."""
    return {name for name, q in skeleton.named_modules() if isinstance(q, UniformQuantizer)
            and q.channel_axis is not None and quantizers[name].get("channel_axis", q.channel_axis) is None}


def _quantizer_value_problems(skeleton: nn.Module, state: dict[str, torch.Tensor],
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


def _compensation_problems(description: dict[str, Any], state: dict[str, torch.Tensor]) -> list[str]:
    """A compensation weight evaluated in FP16 (``fp16_eval``) must be representable there: a larger magnitude is
    ±Inf in FP16, and Inf (or Inf·0 = NaN) reaches the block's output whatever the input, so no working model
    holds one. An FP32 compensation is bounded only by finiteness: a least-squares fit on nearly collinear
    features may legitimately be large, and without the calibration features no bound separates it from a
    forged one."""
    problems = []
    for spec in description["compensation"]:
        weight = state.get(f"{spec['path']}.comp_weight")
        if spec["fp16_eval"] and weight is not None and weight.is_floating_point() and \
                bool(torch.isinf(weight.half()).any()):
            problems.append(f"{spec['path']}.comp_weight holds values beyond FP16's range, in which fp16_eval "
                            "evaluates it")
    return problems


def _verify(description: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> None:
    """The checks save and load share: config ↔ described quantisers, tensors ↔ structure, checksums,
    quantiser values. Builds the structure on the ``meta`` device only."""
    try:
        quantizers = description["quantizers"]
        skeleton = _skeleton(description, where, "meta")
        diffs = _quantizer_differences(skeleton, quantizers)
        if diffs:
            raise InputError(f"{where}: the quantisers disagree with {description['model']!r} + "
                             f"{PTQConfig.from_dict(description['ptq'])}: {_listing(diffs)}")
        problems = _tensor_problems(state, _reference_state(skeleton, state), quantizers)
        if not problems:
            averaged = _averaged(skeleton, quantizers)
            _described_settings(skeleton, quantizers)
            problems = _quantizer_value_problems(skeleton, state, quantizers, averaged) + \
                _compensation_problems(description, state)
    except (KeyError, TypeError) as err:
        raise InputError(f"{where} is incomplete or malformed ({type(err).__name__}: {err})") from None
    if problems:
        raise InputError(f"{where}: tensors do not match the model description: {_listing(problems)}")


def _reference_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The skeleton's state dict, plus the biases reparameterisation gave bias-free Linears (Swin's patch-merging
    reduction): created on the skeleton too, so ``load_state_dict`` can fill them."""
    for key in state:
        owner, _, leaf = key.rpartition(".")
        if leaf == "bias" and key not in model.state_dict():
            module = model.get_submodule(owner) if owner else model
            if getattr(module, "bias", "absent") is None and isinstance(module, nn.Linear):
                module.bias = nn.Parameter(torch.empty(module.out_features, device=module.weight.device))
    return model.state_dict()


def _json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    depth, level = 0, [(value, 1)]
    while level:
        item, d = level.pop()
        depth = max(depth, d)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        level.extend((child, d + 1) for child in children)
    return depth


def _read_description(path: Path) -> tuple[dict[str, Any], str]:
    """The description and the SHA-256 of its bytes; size and nesting bounded before and while parsing."""
    size = path.stat().st_size
    if size > MAX_DESCRIPTION_BYTES:
        raise InputError(f"{path} is {size} bytes, more than any model description ({MAX_DESCRIPTION_BYTES}); "
                         "it is not a qwt.json written by save_quantized")
    raw = path.read_bytes()
    try:
        description = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not valid JSON ({err}); the file is damaged") from None
    except RecursionError:
        description = None  # nested deeper than the parser goes: refused below like any deep nesting
    if description is None or _json_depth(description) > MAX_NESTING:
        raise InputError(f"{path} is nested deeper than a model description ({MAX_NESTING} levels); it is not a "
                         "qwt.json written by save_quantized")
    if not isinstance(description, dict):
        raise InputError(f"{path} does not hold a QwT model description")
    version = description.get("format_version")
    if version != FORMAT_VERSION:
        hint = ("it was saved by an earlier version, without checksums of its tensors; save the model again with "
                "this version" if isinstance(version, int) and 0 < version < FORMAT_VERSION else
                "save the model again with this version")
        raise InputError(f"{path}: unsupported format_version {version!r} (this version reads {FORMAT_VERSION}); "
                         f"{hint}")
    return description, hashlib.sha256(raw).hexdigest()


def _check_declared(description: dict[str, Any], where: str) -> None:
    """Refuse a description that declares more than any model could need, before it is built."""
    kinds = {"model": str, "build_kwargs": dict, "ptq": dict, "quantizers": dict, "compensation": list,
             "tensors": dict}
    wrong = [f"{key} ({kind.__name__})" for key, kind in kinds.items() if not isinstance(description.get(key), kind)]
    if wrong:
        raise InputError(f"{where} is incomplete or malformed: missing or mistyped {', '.join(wrong)}")
    problems = [f"{key} may not be set (the saved tensors are the weights)" for key in FORBIDDEN_BUILD_ARGS
                if key in description["build_kwargs"]]
    # Each quantiser saves a step and each compensated block a weight and a bias, all checksummed.
    tensors, compensation = len(description["tensors"]), description["compensation"]
    if len(description["quantizers"]) > tensors or 2 * len(compensation) > tensors:
        problems.append(f"{len(description['quantizers'])} quantisers and {len(compensation)} compensated blocks "
                        f"for {tensors} tensors")
    sizes = ("in", "out", "kernel_size", "stride", "groups")
    for spec in compensation:
        if not isinstance(spec, dict) or not isinstance(spec.get("fp16_eval"), bool) or any(
                not isinstance(spec.get(k, 1), int) or not 1 <= spec.get(k, 1) <= MAX_BUILD_NUMBER for k in sizes):
            problems.append(f"compensation entry {str(spec)[:80]} (sizes are integers in 1..{MAX_BUILD_NUMBER}, "
                            "fp16_eval true or false)")
    paths = [spec.get("path") for spec in compensation if isinstance(spec, dict)]
    if len(set(map(str, paths))) != len(paths):
        problems.append("a block is compensated twice")
    problems += saved_build_problems(description["model"], description["build_kwargs"], description["tensors"])
    if problems:
        raise InputError(f"{where} declares what no saved model needs: {_listing(problems)}")


def saved_build_problems(model_name: str, build_kwargs: dict[str, Any], tensors: Collection[str]) -> list[str]:
    """Why a save of ``model_name`` built with ``build_kwargs`` and holding ``tensors`` (their names) would be
    refused for its builder arguments: the bounds, and the registered model's own check. Empty: none. A run that
    saves at its end calls this first, so a model it cannot save is refused before the compute."""
    try:
        check = get_model_entry(model_name).check_saved_args
    except ValueError as err:
        return [str(err)]
    problems = _build_arg_problems(build_kwargs)
    return problems + (check(build_kwargs, tensors) if check is not None else [])


def _build_arg_problems(build_kwargs: dict[str, Any]) -> list[str]:
    """Numbers and list lengths of the builder arguments beyond their bounds, nested configs included."""
    problems, stack = [], [("", build_kwargs)]
    while stack:
        prefix, mapping = stack.pop()
        for key, value in mapping.items():
            if isinstance(value, dict):
                stack.append((f"{prefix}{key}.", value))
                continue
            values = value if isinstance(value, list) else [value]
            items, limit = (MAX_CONFIG_ITEMS, BUILD_LIMITS.get(key)) if prefix else \
                (MAX_BUILD_ITEMS, BUILD_LIMITS.get(key, MAX_BUILD_NUMBER))
            if len(values) > items:
                problems.append(f"{prefix}{key} lists {len(values)} values (at most {items})")
            elif limit is not None and any(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           and not abs(v) <= limit for v in values):
                problems.append(f"{prefix}{key}={value} is beyond {limit}")
    return problems


def _recognised_save(directory: Path) -> str | None:
    """Why ``directory`` (an existing folder) is not a previous save this function may replace, or None.

    A previous save is exactly the two files save_quantized writes, whose description is the one the tensor
    file was signed with (a ``qwt.json`` of that name alone proves nothing)."""
    names = sorted(p.name for p in directory.iterdir())
    if not names:
        return None  # an empty folder: nothing to lose
    foreign = [n for n in names if n not in (TENSORS, DESCRIPTION)]
    if foreign:
        shown = ", ".join(foreign[:_SHOWN]) + (f", … {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else "")
        return f"it holds files a save did not write ({shown})"
    if names != sorted((TENSORS, DESCRIPTION)) or any((directory / n).is_symlink() or not (directory / n).is_file()
                                                      for n in names):
        return f"it holds {', '.join(names)} but not a complete save ({TENSORS} and {DESCRIPTION} as plain files)"
    description = directory / DESCRIPTION
    try:
        with safe_open(str(directory / TENSORS), framework="pt") as f:
            signed = (f.metadata() or {}).get(_HASH_KEY)
        raw = description.read_bytes() if description.stat().st_size <= MAX_DESCRIPTION_BYTES else b""
    except (SafetensorError, OSError) as err:
        return f"its files cannot be read ({err})"
    if signed is None or signed != hashlib.sha256(raw).hexdigest():
        return f"its {DESCRIPTION} is not the description its {TENSORS} was saved with"
    return None


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies safetensors can write: a tensor that shares storage with an earlier one (a language model's
    tied input embedding and output head) is cloned; loading fills both from equal values."""
    out, seen = {}, set()
    for key, value in state.items():
        value = value.detach().contiguous().cpu()
        ptr = value.untyped_storage().data_ptr() if value.numel() else None
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def check_save_target(directory: str | Path) -> Path:
    """A folder ``save_quantized`` may write: new, empty, or a previous save it replaces; never other content.

    Checked again by :func:`save_quantized` itself; callers with a ``--save`` flag call it before any compute.
    """
    directory = Path(directory)
    if directory.is_symlink():
        raise InputError(f"{directory} is a symbolic link; pass the folder it points to "
                         f"({os.path.realpath(directory)}) or a new path")
    if directory.exists():
        if not directory.is_dir():
            raise InputError(f"{directory} exists and is not a folder; refusing to replace it")
        reason = _recognised_save(directory)
        if reason is not None:
            raise InputError(f"{directory} is not a saved QwT model that a new save may replace: {reason}; "
                             "choose a new folder or move those files away")
    return directory


def save_quantized(model: nn.Module, directory: str | Path, model_name: str, config: PTQConfig,
                   build_kwargs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write the model to ``directory`` atomically (a temporary folder renamed into place).

    ``model_name`` + ``build_kwargs`` + ``config`` must rebuild exactly this model's structure and quantisers;
    a disagreement (e.g. a W6A6 model with a W4A4 config, or another architecture) is refused, not saved. The
    config is saved resolved for the model's family (``PTQConfig()``: its default baseline, by name). A model
    quantised by :func:`qwt.quantize` remembers its config, and ``config`` must be that one (a GPTQ model rounded
    with ``act_order`` is not saved as one rounded without); a model quantised by hand gets the structural check.
    ``directory`` may be new, an empty folder, or a previous save holding nothing else (which is replaced);
    anything else is refused, naming the files a save did not write.
    """
    config = config.for_family(get_model_entry(model_name).family)
    directory = check_save_target(directory)
    affine = next((name for name, m in model.named_modules() if isinstance(m, ChannelAffine)), None)
    if affine is not None:
        raise InputError(f"{affine} carries channel-wise compensation, which the saved format does not describe; "
                         "export the model to ONNX instead (qwt.export folds it into the weights)")
    ran = applied_config(model)
    if ran is not None and ran.to_dict() != config.to_dict():
        raise InputError(f"the model was quantised with {ran}, not with the config passed, {config}: save it with "
                         "the config it was quantised with (qwt.ptq.applied_config(model))")
    state = _untied(model.state_dict())
    description = {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "build_kwargs": build_kwargs or {},
        "ptq": config.to_dict(),
        "quantizers": _describe_quantizers(model),
        "compensation": _describe_compensation(model),
        "tensors": {key: tensor_sha256(tensor) for key, tensor in state.items()},
        "extra": extra or {},
        "torch": torch.__version__,
    }
    where = f"model to save as {model_name!r} with build_kwargs {description['build_kwargs']}"
    _check_declared(description, where)
    _verify(description, state, where)
    text = json.dumps(description, indent=2)
    target = Path(os.path.abspath(directory))  # "." has no name to put a sibling next to
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        metadata = {"format": "pt", _HASH_KEY: hashlib.sha256(text.encode()).hexdigest()}
        save_file(state, str(tmp / TENSORS), metadata=metadata)
        (tmp / DESCRIPTION).write_text(text)
        _move_into_place(tmp, target)
    except BaseException:
        for name in (TENSORS, DESCRIPTION):
            (tmp / name).unlink(missing_ok=True)
        if tmp.exists():
            tmp.rmdir()
        raise
    return directory


def _move_into_place(new: Path, directory: Path) -> None:
    """Rename ``new`` to ``directory``. A previous save there is first renamed aside and checked again (nothing
    may have been added since :func:`check_save_target`); only its two files are deleted, and it is put back
    if the rename fails. No folder is deleted with its contents."""
    if not directory.exists():
        os.rename(new, directory)  # fails, deleting nothing, if a non-empty folder appeared meanwhile
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{directory.name}.replaced-", dir=directory.parent))
    os.rename(directory, aside)  # onto the empty folder mkdtemp made: replaces it
    try:
        reason = _recognised_save(aside)
        if reason is not None:
            raise InputError(f"{directory} changed while saving and is no longer a previous save: {reason}")
        os.rename(new, directory)
    except BaseException:
        os.rename(aside, directory)
        raise
    for name in (TENSORS, DESCRIPTION):
        (aside / name).unlink(missing_ok=True)
    try:
        aside.rmdir()
    except OSError:
        warnings.warn(f"{aside}: files appeared in the replaced save while saving; kept there", stacklevel=3)


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors, on the CPU: their size is bounded by the file's, which the safetensors header must match."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise InputError(f"{path} cannot be read as safetensors ({err}); the file is truncated or damaged") from None


def _checksum_problems(state: dict[str, torch.Tensor], digests: dict[str, Any]) -> list[str]:
    problems = _one_sided(digests, state, "missing {}", "unexpected {}")
    return problems + [f"{key} does not match its SHA-256 (the tensor's bytes changed since it was saved)"
                       for key, tensor in state.items() if key in digests and tensor_sha256(tensor) != digests[key]]


def load_quantized(directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized`; it comes back in eval mode with quantisation on.

    Everything is checked before the model is built: the description's bounds, its SHA-256 against the one in
    the tensor file, every tensor's SHA-256, dtype, shape and values against the description and the config
    (on a ``meta``-device structure). A damaged file, or a forged one holding values the format cannot mean, is
    refused naming what is wrong (see the module docstring for what a consistent forgery can still change). The
    model remembers the saved config (:func:`qwt.ptq.applied_config`).
    """
    directory = Path(directory)
    for name in (TENSORS, DESCRIPTION):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: is {directory} a folder written by save_quantized?")
    where = str(directory / DESCRIPTION)
    description, digest = _read_description(directory / DESCRIPTION)
    _check_declared(description, where)
    state, metadata = _read_tensors(directory / TENSORS)
    if metadata.get(_HASH_KEY) != digest:
        raise InputError(f"{directory / DESCRIPTION} is not the description saved with {directory / TENSORS} "
                         "(its SHA-256 differs from the one stored in the tensor file): edited, or from another save")
    damaged = _checksum_problems(state, description["tensors"])
    if damaged:
        raise InputError(f"{directory / TENSORS} is damaged: {_listing(damaged)}")
    _verify(description, state, where)
    model = _skeleton(description, where)
    _described_settings(model, description["quantizers"])
    setattr(model, APPLIED_CONFIG, PTQConfig.from_dict(description["ptq"]))
    _reference_state(model, state)
    model.load_state_dict(state, strict=True)
    model.to(map_location).eval()
    set_quant_state(model, weight=True, act=True)
    return model
