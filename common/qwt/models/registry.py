"""Model registry: a name gives a builder, its family and (for ImageNet models) its preprocessing."""
from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data.imagenet import Preprocessing
from ..family import Family
from ..registry import Registry


#: (a saved model's builder arguments, the names of its saved tensors) → what is wrong with them (empty: nothing).
SavedArgsCheck = Callable[[dict[str, Any], Collection[str]], list[str]]


def fixed_build(name: str) -> SavedArgsCheck:
    """The check of an entry whose builder takes overrides a save never needs: every argument is refused (one that
    leaves every tensor's shape as it is, such as an activation function, would change what the weights compute)."""
    def check(build_kwargs: dict[str, Any], tensors: Collection[str]) -> list[str]:
        return [f"{key} may not be set: {name} is built from its own fixed config" for key in build_kwargs]

    return check


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
    #: Refuses builder arguments a saved model may not declare, before anything is built (see SavedArgsCheck);
    #: None: the builder's own signature refuses unknown arguments, and qwt.serialization's bounds apply.
    check_saved_args: SavedArgsCheck | None = None

_REGISTRY: Registry[ModelEntry] = Registry("model")


def register_model(entry: ModelEntry) -> ModelEntry:
    return _REGISTRY.add(entry.name, entry)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_entry(name: str) -> ModelEntry:
    return _REGISTRY.lookup(name)


def create_model(name: str, pretrained: bool = True, **kwargs) -> nn.Module:
    return get_model_entry(name).build(pretrained=pretrained, **kwargs)
