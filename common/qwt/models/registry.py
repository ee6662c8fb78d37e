"""Model registry: a name gives a builder, its family and (for ImageNet models) its preprocessing."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.imagenet import Preprocessing
from ..family import Family
from ..registry import Registry


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: Family
    build: Callable[..., nn.Module]  # build(pretrained=..., checkpoint=..., smoke=..., num_classes=...)
    description: str
    preprocessing: Preprocessing | None = None  # ImageNet evaluation transform; None for non-ImageNet models
    reduced: dict = field(default_factory=lambda: {"smoke": True})  # build kwargs of a CPU-sized variant
    reduced_input: tuple[int, ...] = (3, 32, 32)  # one image of that variant
    input_shape: tuple[int, ...] = (3, 224, 224)  # one image of the full model (an ImageNet crop unless named)
    #: a batch of 8 inputs for the reduced variant when they are not images (token ids); None: Gaussian images
    reduced_batch: Callable[[torch.Generator], torch.Tensor] | None = None

_REGISTRY: Registry[ModelEntry] = Registry("model")


def register_model(entry: ModelEntry) -> ModelEntry:
    return _REGISTRY.add(entry.name, entry)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_entry(name: str) -> ModelEntry:
    return _REGISTRY.lookup(name)


def create_model(name: str, pretrained: bool = True, **kwargs) -> nn.Module:
    return get_model_entry(name).build(pretrained=pretrained, **kwargs)
