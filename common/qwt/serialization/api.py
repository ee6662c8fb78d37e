"""``save_quantized`` and ``load_quantized``: describe, verify and store a model, and the way back."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..models import get_model_entry
from ..ptq import APPLIED_CONFIG, PTQConfig, applied_config
from ..quant.modules import set_quant_state
from .bounds import check_declared
from .describe import describe
from .messages import listing
from .skeleton import build_skeleton, give_described_settings, reference_state
from .store import (DESCRIPTION, HASH_KEY, TENSORS, check_save_target, read_description, read_tensors,
                    require_save_files, untied, write_save)
from .verify import checksum_problems, verify


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
    ran = applied_config(model)
    if ran is not None and ran.to_dict() != config.to_dict():
        raise InputError(f"the model was quantised with {ran}, not with the config passed, {config}: save it with "
                         "the config it was quantised with (qwt.ptq.applied_config(model))")
    state = untied(model.state_dict())
    description = describe(model, state, model_name, config, build_kwargs, extra)
    where = f"model to save as {model_name!r} with build_kwargs {description['build_kwargs']}"
    check_declared(description, where)
    verify(description, state, where)
    write_save(directory, state, json.dumps(description, indent=2))
    return directory


def load_quantized(directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized`; it comes back in eval mode with quantisation on.

    Everything is checked before the model is built: the description's bounds, its SHA-256 against the one in
    the tensor file, every tensor's SHA-256, dtype, shape and values against the description and the config
    (on a ``meta``-device structure). A damaged file, or a forged one holding values the format cannot mean, is
    refused naming what is wrong (see :mod:`qwt.serialization` for what a consistent forgery can still change).
    The model remembers the saved config (:func:`qwt.ptq.applied_config`).
    """
    directory = Path(directory)
    require_save_files(directory)
    where = str(directory / DESCRIPTION)
    description, digest = read_description(directory / DESCRIPTION)
    check_declared(description, where)
    state, metadata = read_tensors(directory / TENSORS)
    if metadata.get(HASH_KEY) != digest:
        raise InputError(f"{directory / DESCRIPTION} is not the description saved with {directory / TENSORS} "
                         "(its SHA-256 differs from the one stored in the tensor file): edited, or from another save")
    damaged = checksum_problems(state, description["tensors"])
    if damaged:
        raise InputError(f"{directory / TENSORS} is damaged: {listing(damaged)}")
    verify(description, state, where)
    model = build_skeleton(description, where)
    give_described_settings(model, description["quantizers"])
    family = get_model_entry(description["model"]).family
    setattr(model, APPLIED_CONFIG, PTQConfig.from_dict(description["ptq"]).for_family(family))
    reference_state(model, state)
    model.load_state_dict(state, strict=True)
    model.to(map_location).eval()
    set_quant_state(model, weight=True, act=True)
    return model
