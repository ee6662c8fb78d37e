"""Save and load a quantised, compensated model: ``model.safetensors`` + ``qwt.json``.

The tensors hold everything that calibration and fitting produced (reparameterised weights, quantiser Δ/z,
compensation W/b); the JSON says how to rebuild the module structure around them: registry name and builder
arguments, the PTQ config, every quantiser's kind, bit width, grid, axis and log floor as read from the model
itself, which blocks carry which compensation, and the SHA-256 of every tensor's bytes. The SHA-256 of the JSON is
stored in the tensor file, so neither file can be edited or swapped alone.

Saving and loading apply the same checks: the config must build exactly the described quantisers, every tensor
must have the dtype and shape the structure implies, finite values and its recorded checksum, and quantiser
parameters must be possible ones (Δ > 0, zero points an integer on the quantiser's grid). On load, what the
description declares is bounded (size, nesting, builder arguments) and the structure is first built on the
``meta`` device, so a forged description is refused before any memory is allocated for it. Nothing is
unpickled. Saving writes a fresh temporary folder and renames it into place; it replaces only a previous save
that holds nothing else, and never deletes a file it did not write.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterable
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
from .ptq import PTQConfig
from .ptq.surgery import quantize_modules
from .quant.modules import set_quant_state, swap_module
from .quant.quantizers import (GRIDS, SYMMETRIC_GRIDS, LogSqrt2Quantizer, Quantizer, RoundingQuantizer,
                               UniformQuantizer, _to_rows)
from .quant.rtn import MinMaxWeightQuantizer
from .utils import all_finite

TENSORS, DESCRIPTION = "model.safetensors", "qwt.json"
#: 4: per-tensor SHA-256 (``tensors``) and the uniform quantisers' ``grid`` in the description.
FORMAT_VERSION = 4
_HASH_KEY = "qwt_description_sha256"
_SHOWN = 5  # differences listed in an error message

#: Bounds on what a description may declare, checked before anything is built. A real description is a few
#: hundred kB (one entry per quantiser and block) and a few levels deep; the builder arguments are those of the
#: registered models (the largest timm ImageNet models stay far inside these).
MAX_DESCRIPTION_BYTES = 16 * 2**20
MAX_NESTING = 8
BUILD_LIMITS = {"img_size": 2048, "patch_size": 2048, "in_chans": 64, "embed_dim": 16384, "depth": 256,
                "num_heads": 256, "num_classes": 100_000, "mlp_ratio": 64}
#: Any other integer or float a builder argument declares, and any list's length.
MAX_BUILD_NUMBER, MAX_BUILD_ITEMS = 100_000, 16
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
    """How the quantisers a config builds differ from the described ones (reparameterisation may turn a
    channel-wise input quantiser into a per-tensor one; that is not a difference)."""
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
        elif isinstance(q, LogSqrt2Quantizer) and q.floor != spec["floor"]:
            diffs.append(f"{name}: the model's log floor is {spec['floor']}, the config's {q.floor}")
        elif isinstance(q, UniformQuantizer) and spec["channel_axis"] not in (q.channel_axis, None):
            diffs.append(f"{name}: the model's channel axis is {spec['channel_axis']}, the config's {q.channel_axis}")
        elif isinstance(q, UniformQuantizer) and spec["grid"] not in GRIDS:
            diffs.append(f"{name}: unknown grid {spec['grid']!r}")
        elif isinstance(q, MinMaxWeightQuantizer) and q.group_size != spec["group_size"]:
            diffs.append(f"{name}: the model's weight group size is {spec['group_size']}, the config's {q.group_size}")
    return diffs


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


def _quantizer_value_problems(skeleton: nn.Module, state: dict[str, torch.Tensor],
                              quantizers: dict[str, dict[str, Any]]) -> list[str]:
    """Quantiser parameters no calibration can produce.

    Every step Δ is > 0. A uniform zero point is an integer (unless reparameterisation averaged channel-wise
    ones into a per-tensor one), exactly L/2 on the symmetric grids and within [0, L−1] on the zero-included
    one. The authors' affine grid places z outside [0, L−1] when the calibration data lie on one side of zero,
    so there the bound comes from the data the file holds: a weight quantiser's grid [−zΔ, (L−1−z)Δ] reaches
    each row of its weight to within one step (calibration puts the grid's ends within Δ/2 of quantiles of
    the row). Finiteness is checked with the other tensors.
    """
    problems = []
    for name, q in skeleton.named_modules():
        if not isinstance(q, Quantizer) or f"{name}.delta" not in state:
            continue
        spec, delta = quantizers[name], state[f"{name}.delta"]
        if not bool((delta > 0).all()):
            problems.append(f"{name}.delta holds a step ≤ 0")
            continue
        if not isinstance(q, UniformQuantizer) or f"{name}.zero_point" not in state:
            continue
        zero, levels = state[f"{name}.zero_point"], 2 ** spec["n_bits"]
        reparameterised = spec["channel_axis"] is None and q.channel_axis is not None
        if not reparameterised and not _is_integer(zero):
            problems.append(f"{name}.zero_point holds a non-integer zero point")
        elif spec["grid"] in SYMMETRIC_GRIDS and not bool((zero == levels // 2).all()):
            problems.append(f"{name}.zero_point is not {levels // 2}, the symmetric grid's zero point")
        elif spec["grid"] == "zero_included" and not bool(((zero >= 0) & (zero <= levels - 1)).all()):
            problems.append(f"{name}.zero_point lies outside the grid 0..{levels - 1}")
        elif name.endswith(".weight_quantizer") and not _grid_reaches_weights(
                state.get(name.removesuffix("_quantizer")), delta, zero, levels, spec["channel_axis"]):
            problems.append(f"{name}: its grid does not reach the weights it quantises (zero point or step "
                            "out of range)")
    return problems


def _grid_reaches_weights(weight: torch.Tensor | None, delta: torch.Tensor, zero: torch.Tensor, levels: int,
                          channel_axis: int | None) -> bool:
    if weight is None or not weight.is_floating_point() or weight.numel() == 0:
        return True
    rows = _to_rows(weight.detach().double(), channel_axis)
    if delta.numel() not in (1, rows.shape[0]) or zero.numel() not in (1, rows.shape[0]):
        return True  # a shape problem, reported with the other tensors
    d, z = delta.double().reshape(-1), zero.double().reshape(-1)
    low, high = -z * d, (levels - 1 - z) * d
    return bool(((low <= rows.amax(1) + d) & (high >= rows.amin(1) - d)).all())


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
            problems = _quantizer_value_problems(skeleton, state, quantizers)
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
    for key, value in description["build_kwargs"].items():
        values = value if isinstance(value, list) else [value]
        limit = BUILD_LIMITS.get(key, MAX_BUILD_NUMBER)
        if len(values) > MAX_BUILD_ITEMS:
            problems.append(f"{key} lists {len(values)} values (at most {MAX_BUILD_ITEMS})")
        elif any(isinstance(v, (int, float)) and not isinstance(v, bool) and not abs(v) <= limit for v in values):
            problems.append(f"{key}={value} is beyond {limit}")
    if problems:
        raise InputError(f"{where} declares what no saved model needs: {_listing(problems)}")


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
    config is saved resolved for the model's family (``PTQConfig()``: its default baseline, by name).
    ``directory`` may be new, an empty folder, or a previous save holding nothing else (which is replaced);
    anything else is refused, naming the files a save did not write.
    """
    config = config.for_family(get_model_entry(model_name).family)
    directory = check_save_target(directory)
    affine = next((name for name, m in model.named_modules() if isinstance(m, ChannelAffine)), None)
    if affine is not None:
        raise InputError(f"{affine} carries channel-wise compensation, which the saved format does not describe; "
                         "export the model to ONNX instead (qwt.export folds it into the weights)")
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
    (on a ``meta``-device structure). A damaged or forged file is refused naming what is wrong.
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
    for name, q in model.named_modules():
        if isinstance(q, Quantizer):  # the described settings (checked against the config by _verify)
            spec = description["quantizers"][name]
            for setting in q.settings:
                setattr(q, setting, spec[setting])
    _reference_state(model, state)
    model.load_state_dict(state, strict=True)
    model.to(map_location).eval()
    set_quant_state(model, weight=True, act=True)
    return model
