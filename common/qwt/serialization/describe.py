"""What a model is, as a JSON-able description: its quantisers as the model holds them, which blocks carry which
compensation, the config and builder arguments it was made with, and the SHA-256 of every tensor."""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from ..compensation.modules import ConvCompensated, LinearCompensated
from ..errors import InputError
from ..ptq import PTQConfig
from ..quant.quantizers import Quantizer, RoundingQuantizer

#: 4: per-tensor SHA-256 (``tensors``) and the uniform quantisers' ``grid`` in the description.
FORMAT_VERSION = 4


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes in memory order (as safetensors stores them on a little-endian machine)."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy() if flat.numel() else b"").hexdigest()


def describe(model: nn.Module, state: dict[str, torch.Tensor], model_name: str, config: PTQConfig,
             build_kwargs: dict[str, Any] | None, extra: dict[str, Any] | None) -> dict[str, Any]:
    """The description of ``model`` whose tensors are ``state``: everything needed to rebuild its structure
    around them (checked against them by :func:`qwt.serialization.verify.verify`, not here)."""
    return {
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
