"""What ``quantize`` and ``apply_qwt`` accept: checked up front, so a wrong input is refused in one line instead of
failing deep inside a layer, or (integer images) calibrating every quantiser on the wrong range without a word."""
from __future__ import annotations

import torch
from torch import nn

from .errors import InputError


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


def check_float32_model(model: nn.Module) -> None:
    """Refuse a model whose parameters are not FP32: the quantiser searches and QwT's fit assume FP32 inputs."""
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if dtypes:
        raise InputError(f"the model has {', '.join(dtypes)} parameters: quantise an FP32 model "
                         "(call model.float() first)")
