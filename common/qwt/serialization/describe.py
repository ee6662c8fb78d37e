"""What a model is, as a JSON-able description: its quantisers as the model holds them, which blocks carry which
compensation (a dense or reduced-rank wrapper around a block, or a channel-wise correction after a residual
branch's last layer), the config and builder arguments it was made with, and the SHA-256 of every tensor."""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from ..compensation.channelwise import ChannelAffine
from ..compensation.modules import ConvCompensated, LinearCompensated, LowRankCompensated
from ..errors import InputError
from ..ptq import PTQConfig
from ..quant.quantizers import Quantizer, RoundingQuantizer

#: 4: per-tensor SHA-256 (``tensors``) and the uniform quantisers' ``grid`` in the description.
FORMAT_VERSION = 4
#: What a channel-wise correction may follow (:func:`branch_end`).
BRANCH_ENDS = ("linear", "conv", "norm")


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


def branch_end(layer: nn.Module, path: str) -> tuple[str, int]:
    """What kind of layer a channel-wise correction follows (one of :data:`BRANCH_ENDS`) and how many output
    channels it corrects: a Linear's or a Conv2d's, or a norm's with one weight per channel (Gemma 3's post-branch
    norms). Saving describes both; loading checks them against the layer the structure has at that path."""
    if isinstance(layer, nn.Linear):
        return "linear", layer.out_features
    if isinstance(layer, nn.Conv2d):
        return "conv", layer.out_channels
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return "norm", weight.numel()
    raise InputError(f"{path}: a channel-wise correction follows a {type(layer).__name__}, which has no "
                     "per-channel output (a Linear, a Conv2d or a norm with one weight per channel)")


def _describe_compensation(model: nn.Module) -> list[dict[str, Any]]:
    """Every compensation, outer before inner (``named_modules`` order), so that the structure is rebuilt by
    wrapping each path in turn: a correction inside a dense-compensated block names the path through the
    wrapper."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, ChannelAffine):
            out.append({"path": name, "form": "channelwise", "after": branch_end(module.layer, name)[0],
                        "channels": module.gain.numel()})
        elif isinstance(module, ConvCompensated):
            w = module.comp_weight
            out.append({"path": name, "form": "conv", "in": w.shape[1] * module.groups, "out": w.shape[0],
                        "kernel_size": w.shape[-1], "stride": module.stride, "groups": module.groups,
                        "fp16_eval": module.fp16_eval})
        elif isinstance(module, LowRankCompensated):
            out.append({"path": name, "form": "lowrank", "in": module.comp_down.shape[0],
                        "rank": module.comp_down.shape[1], "out": module.comp_up.shape[1],
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
