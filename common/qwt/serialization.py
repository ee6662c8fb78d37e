"""Save and load a quantised, compensated model: ``model.safetensors`` + ``qwt.json``.

The tensors hold everything that calibration and fitting produced (reparameterised weights, quantiser Δ/z,
compensation W/b); the JSON says how to rebuild the module structure around them: registry name and builder
arguments, the PTQ config, every quantiser's kind, bit width, axis and log floor as read from the model itself,
and which blocks carry which compensation. Saving refuses a config or model name that disagrees with the model;
loading refuses tensors whose dtype, shape or values do not fit the description, and a description that is not
the one saved with the tensors (its SHA-256 is stored in the tensor file). Nothing is unpickled on load.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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
from .quant.quantizers import LogSqrt2Quantizer, Quantizer, UniformQuantizer, check_bits
from .quant.rtn import MinMaxWeightQuantizer
from .utils import all_finite

TENSORS, DESCRIPTION = "model.safetensors", "qwt.json"
FORMAT_VERSION = 3
_HASH_KEY = "qwt_description_sha256"
_SHOWN = 5  # differences listed in an error message


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
        out[name] = spec | {setting: getattr(q, setting) for setting in q.settings}
    return out


def _skeleton(description: dict[str, Any], where: str) -> nn.Module:
    """The module structure a description implies: built, quantised by its config, compensation wrappers in place.

    A description that cannot be built (a block path the architecture lacks, a malformed entry) is refused
    naming ``where`` it came from.
    """
    try:
        return _build(description)
    except (AttributeError, KeyError, TypeError, RuntimeError) as err:
        raise InputError(f"{where} does not describe a buildable model ({type(err).__name__}: {err})") from None


def _build(description: dict[str, Any]) -> nn.Module:
    entry = get_model_entry(description["model"])
    model = entry.build(pretrained=False, **description["build_kwargs"])
    config = PTQConfig.from_dict(description["ptq"])
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
    """How the quantisers a config builds differ from the model's (reparameterisation may turn a channel-wise
    input quantiser into a per-tensor one; that is not a difference)."""
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
        elif isinstance(q, MinMaxWeightQuantizer) and q.group_size != spec["group_size"]:
            diffs.append(f"{name}: the model's weight group size is {spec['group_size']}, the config's {q.group_size}")
    return diffs


def _listing(diffs: list[str]) -> str:
    more = f"; … {len(diffs) - _SHOWN} more" if len(diffs) > _SHOWN else ""
    return "; ".join(diffs[:_SHOWN]) + more


def _quantizer_buffer(key: str, quantizers: dict[str, Any]) -> str | None:
    owner, _, leaf = key.rpartition(".")
    return owner if owner in quantizers and leaf in ("delta", "zero_point") else None


def _check_tensors(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                   quantizers: dict[str, dict[str, Any]], where: str) -> None:
    """Every tensor has the dtype and shape the structure implies and finite values; refuse otherwise."""
    problems = _one_sided(reference, state, "missing {}", "unexpected {}")
    for key, tensor in state.items():
        ref = reference.get(key)
        if ref is None:
            continue
        owner = _quantizer_buffer(key, quantizers)
        shape = tuple(quantizers[owner]["shape"]) if owner else tuple(ref.shape)
        if tensor.dtype != ref.dtype:
            problems.append(f"{key} is {tensor.dtype}, expected {ref.dtype}")
        elif tuple(tensor.shape) != shape:
            problems.append(f"{key} has shape {tuple(tensor.shape)}, expected {shape}")
        elif tensor.is_floating_point() and not all_finite(tensor):
            problems.append(f"{key} holds NaN or Inf")
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
                module.bias = nn.Parameter(torch.empty(module.out_features))
    return model.state_dict()


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
    """A folder ``save_quantized`` may write: new, or a previous save it replaces; never other content."""
    directory = Path(directory)
    if directory.exists() and not (directory / DESCRIPTION).is_file():
        raise InputError(f"{directory} exists and is not a saved QwT model; refusing to replace it")
    return directory


def save_quantized(model: nn.Module, directory: str | Path, model_name: str, config: PTQConfig,
                   build_kwargs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write the model to ``directory`` atomically (a temporary folder renamed into place).

    ``model_name`` + ``build_kwargs`` + ``config`` must rebuild exactly this model's structure and quantisers;
    a disagreement (e.g. a W6A6 model with a W4A4 config, or another architecture) is refused, not saved.
    """
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
        "extra": extra or {},
        "torch": torch.__version__,
    }
    where = f"model to save as {model_name!r} with build_kwargs {description['build_kwargs']}"
    skeleton = _skeleton(description, where)
    diffs = _quantizer_differences(skeleton, description["quantizers"])
    if diffs:
        raise InputError(f"the model's quantisers disagree with {model_name!r} + {config}: {_listing(diffs)}")
    _check_tensors(state, _reference_state(skeleton, state), description["quantizers"], where)
    text = json.dumps(description, indent=2)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        metadata = {"format": "pt", _HASH_KEY: hashlib.sha256(text.encode()).hexdigest()}
        save_file(state, str(tmp / TENSORS), metadata=metadata)
        (tmp / DESCRIPTION).write_text(text)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _read_description(path: Path) -> tuple[dict[str, Any], str]:
    raw = path.read_bytes()
    try:
        description = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not valid JSON ({err}); the file is damaged") from None
    if not isinstance(description, dict):
        raise InputError(f"{path} does not hold a QwT model description")
    if description.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: unsupported format_version {description.get('format_version')} "
                         f"(this version reads {FORMAT_VERSION}; re-save the model)")
    return description, hashlib.sha256(raw).hexdigest()


def _read_tensors(path: Path, device: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise InputError(f"{path} cannot be read as safetensors ({err}); the file is truncated or damaged") from None


def load_quantized(directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized`; it comes back in eval mode with quantisation on."""
    directory = Path(directory)
    for name in (TENSORS, DESCRIPTION):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: is {directory} a folder written by save_quantized?")
    description, digest = _read_description(directory / DESCRIPTION)
    state, metadata = _read_tensors(directory / TENSORS, str(map_location))
    if metadata.get(_HASH_KEY) != digest:
        raise InputError(f"{directory / DESCRIPTION} is not the description saved with {directory / TENSORS} "
                         "(its SHA-256 differs from the one stored in the tensor file): edited, or from another save")
    model = _skeleton(description, str(directory / DESCRIPTION))
    try:
        quantizers = description["quantizers"]
        for name, q in model.named_modules():
            if isinstance(q, Quantizer):
                spec = quantizers[name]
                if spec["kind"] != q.kind:
                    raise InputError(f"{directory / DESCRIPTION}: {name} is {spec['kind']}, the structure has "
                                     f"{q.kind}")
                q.n_bits = check_bits(spec["n_bits"])
                for setting in q.settings:
                    setattr(q, setting, spec[setting])
    except (KeyError, TypeError) as err:
        raise InputError(
            f"{directory / DESCRIPTION} is incomplete or malformed ({type(err).__name__}: {err})") from None
    _check_tensors(state, _reference_state(model, state), quantizers, str(directory / TENSORS))
    model.load_state_dict(state, strict=True)
    model.to(map_location).eval()
    set_quant_state(model, weight=True, act=True)
    return model
