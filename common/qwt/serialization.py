"""Save and load a quantised, compensated model: ``model.safetensors`` + ``qwt.json``.

The tensors hold everything that calibration and fitting produced (reparameterised weights, quantiser Δ/z,
compensation W/b); the JSON says how to rebuild the module structure around them: registry name and builder
arguments, the PTQ config, and which blocks carry which compensation. Nothing is unpickled on load.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .compensation.modules import Compensated, ConvCompensated, LinearCompensated
from .models import get_model_entry
from .ptq import PTQConfig
from .ptq.surgery import quantize_modules
from .quant.modules import set_quant_state, swap_module

TENSORS, DESCRIPTION = "model.safetensors", "qwt.json"
FORMAT_VERSION = 2


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


def save_quantized(model: nn.Module, directory: str | Path, model_name: str, config: PTQConfig,
                   build_kwargs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write the model to ``directory`` atomically (a temporary folder renamed into place)."""
    get_model_entry(model_name)  # fail early on an unknown name
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    description = {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "build_kwargs": build_kwargs or {},
        "ptq": config.to_dict(),
        "compensation": _describe_compensation(model),
        "extra": extra or {},
        "torch": torch.__version__,
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        save_file(state, str(tmp / TENSORS), metadata={"format": "pt"})
        (tmp / DESCRIPTION).write_text(json.dumps(description, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_quantized(directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized`; it comes back in eval mode with quantisation on."""
    directory = Path(directory)
    for name in (TENSORS, DESCRIPTION):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: is {directory} a folder written by save_quantized?")
    description = json.loads((directory / DESCRIPTION).read_text())
    if description.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory / DESCRIPTION}: unsupported format_version {description.get('format_version')}")
    entry = get_model_entry(description["model"])
    config = PTQConfig.from_dict(description["ptq"])
    model = entry.build(pretrained=False, **description["build_kwargs"])
    quantize_modules(model, entry.family.layer_rule(model, config))
    state = load_file(str(directory / TENSORS), device=str(map_location))
    for spec in description["compensation"]:
        block = model.get_submodule(spec["path"])
        if spec["form"] == "linear":
            wrapper: Compensated = LinearCompensated.zeros(block, spec["in"], spec["out"], spec["fp16_eval"])
        else:
            wrapper = ConvCompensated.zeros(block, spec["in"], spec["out"], spec["kernel_size"], spec["stride"],
                                            spec["groups"], spec["fp16_eval"])
        swap_module(model, spec["path"], wrapper)
    # Reparameterisation may have given a bias-free Linear a bias (Swin's patch-merging reduction).
    for key in state:
        owner, _, leaf = key.rpartition(".")
        if leaf == "bias" and key not in model.state_dict():
            module = model.get_submodule(owner)
            if getattr(module, "bias", "absent") is None:
                module.bias = nn.Parameter(torch.empty_like(state[key]))
    model.load_state_dict(state, strict=True)
    model.to(map_location).eval()
    set_quant_state(model, weight=True, act=True)
    return model
