"""What ``quantize`` and ``apply_qwt`` accept: checked up front, so a wrong input is refused in one line instead of
failing deep inside a layer, or (integer images) calibrating every quantiser on the wrong range without a word.

A family names the check for its models' inputs (:attr:`qwt.Family.check_inputs`, and the same on its
:class:`~qwt.compensation.BlockPlan`): images for vision models, token ids for language models."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .errors import InputError
from .utils import all_finite


def check_images(images: torch.Tensor, what: str) -> torch.Tensor:
    """Refuse a tensor that is not a non-empty (N, C, H, W) batch of floating-point images."""
    if not images.is_floating_point():
        raise InputError(f"{what} are {images.dtype}: pass floating-point images normalised as for the FP model "
                         "(e.g. images.float() / 255, then the model's mean and std)")
    if images.dim() != 4:
        raise InputError(f"{what} have shape {tuple(images.shape)}: expected a batch (N, C, H, W); "
                         "add the batch axis with images.unsqueeze(0)")
    if images.shape[0] == 0:
        raise InputError(f"{what} are empty (0 images): pass at least one image")
    return images


def check_token_ids(ids: torch.Tensor, what: str) -> torch.Tensor:
    """Refuse a tensor that is not a non-empty (N, T) batch of integer token ids."""
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise InputError(f"{what} are {ids.dtype}: pass integer token ids from the model's tokenizer")
    if ids.dim() != 2:
        raise InputError(f"{what} have shape {tuple(ids.shape)}: expected a batch of windows (N, T); "
                         "add the batch axis with ids.unsqueeze(0)")
    if ids.numel() == 0:
        raise InputError(f"{what} are empty: pass at least one window of at least one token")
    return ids


def check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    """Refuse a floating-point tensor holding NaN or Inf, naming it: downstream it surfaces as something else
    (a quantiser's calibration error, or GPTQ's "not positive definite" under weights-only settings)."""
    if t.is_floating_point() and not all_finite(t):
        count = int((~torch.isfinite(t)).sum())
        raise InputError(f"{what} hold {count} NaN or Inf value(s): pass finite inputs (check how they were "
                         "loaded and normalised)")
    return t


#: (tensor, what it is) → the tensor, or InputError.
InputCheck = Callable[[torch.Tensor, str], torch.Tensor]


def check_float32_model(model: nn.Module) -> None:
    """Refuse a model whose parameters are not FP32: the quantiser searches and QwT's fit assume FP32 inputs."""
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if dtypes:
        raise InputError(f"the model has {', '.join(dtypes)} parameters: quantise an FP32 model "
                         "(call model.float() first)")
