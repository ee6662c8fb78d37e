"""The module structure a description implies: the registered model, quantised by the saved config, with its
compensation wrappers (dense, channel-wise) in place and its quantisers given their described settings."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..compensation.channelwise import ChannelAffine
from ..compensation.modules import ConvCompensated, LinearCompensated, LowRankCompensated
from ..errors import InputError
from ..models import get_model_entry
from ..ptq import PTQConfig
from ..ptq.surgery import quantize_modules
from ..quant.modules import swap_module
from ..quant.quantizers import Quantizer
from .describe import branch_end


def build_skeleton(description: dict[str, Any], where: str, device: str = "cpu") -> nn.Module:
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
        swap_module(model, spec["path"], _wrapper(model.get_submodule(spec["path"]), spec))
    return model


def _wrapper(module: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """``module`` wrapped as ``spec`` describes, the compensation's tensors zero (gains one) until loaded."""
    if spec["form"] == "channelwise":
        after, channels = branch_end(module, spec["path"])
        if (after, channels) != (spec["after"], spec["channels"]):
            raise ValueError(f"{spec['path']} is a {after} layer of {channels} output channels, not the "
                             f"{spec['after']} layer of {spec['channels']} its channel-wise correction is saved for")
        return ChannelAffine(module, torch.ones(channels), torch.zeros(channels))
    if spec["form"] == "linear":
        return LinearCompensated.zeros(module, spec["in"], spec["out"], spec["fp16_eval"])
    if spec["form"] == "lowrank":
        return LowRankCompensated.zeros(module, spec["in"], spec["rank"], spec["out"], spec["fp16_eval"])
    return ConvCompensated.zeros(module, spec["in"], spec["out"], spec["kernel_size"], spec["stride"],
                                 spec["groups"], spec["fp16_eval"])


def give_described_settings(model: nn.Module, quantizers: dict[str, dict[str, Any]]) -> None:
    """Give every quantiser of ``model`` its described settings (checked against the config by
    :func:`qwt.serialization.verify.quantizer_differences`); one the description lacks keeps the config's."""
    for name, q in model.named_modules():
        if isinstance(q, Quantizer):
            spec = quantizers[name]
            for setting in q.settings:
                setattr(q, setting, spec.get(setting, getattr(q, setting)))


def reference_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The skeleton's state dict, plus the biases reparameterisation gave bias-free Linears (Swin's patch-merging
    reduction): created on the skeleton too, so ``load_state_dict`` can fill them."""
    for key in state:
        owner, _, leaf = key.rpartition(".")
        if leaf == "bias" and key not in model.state_dict():
            module = model.get_submodule(owner) if owner else model
            if getattr(module, "bias", "absent") is None and isinstance(module, nn.Linear):
                module.bias = nn.Parameter(torch.empty(module.out_features, device=module.weight.device))
    return model.state_dict()
