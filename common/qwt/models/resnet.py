"""torchvision ResNet-18/50/101: the ``resnet`` family, with the checkpoints the authors used.

Weights come from ``checkpoint`` only: BRECQ's ``resnet18_imagenet.pth.tar`` / ``resnet50_imagenet.pth.tar``
(torchvision key layout, possibly wrapped in ``{"model"|"state_dict": ...}``) or torchvision's
``resnet101-63fe2227.pth``. Files are read with ``weights_only=True``.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import nn

from ..compensation.blockwise import BlockPlan, Step
from ..data.imagenet import Preprocessing
from ..family import Family, register_family
from ..ptq.config import PTQConfig
from ..ptq.surgery import LayerRule, cnn_rule
from .checkpoint import load_into
from .registry import ModelEntry, register_model

RESNET_WEIGHTS_HINT = {
    "resnet18": "BRECQ resnet18_imagenet.pth.tar",
    "resnet50": "BRECQ resnet50_imagenet.pth.tar",
    "resnet101": "torchvision resnet101-63fe2227.pth",
}


def build_resnet(name: str, pretrained: bool = True, checkpoint: str | Path | None = None, smoke: bool = False,
                 num_classes: int = 1000) -> nn.Module:
    """``smoke`` only allows random init (the architecture is already small enough for 32×32 CPU runs)."""
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if checkpoint is not None:
        load_into(model, checkpoint)
    elif pretrained and not smoke:
        raise FileNotFoundError(
            f"{name}: ImageNet weights are not downloaded here; pass --checkpoint with {RESNET_WEIGHTS_HINT[name]}")
    return model.eval()


def resnet_layer_rule(model: nn.Module, config: PTQConfig) -> LayerRule:
    return cnn_rule(config, stem="conv1", classifier=lambda name: name == "fc")


def resnet_plan(model: nn.Module) -> BlockPlan:
    """Stem = conv1 → bn1 → relu → maxpool; every BasicBlock/Bottleneck of layer1..layer4 is compensated."""

    def stem(images: torch.Tensor) -> torch.Tensor:
        return model.maxpool(model.relu(model.bn1(model.conv1(images))))

    steps = [Step(f"layer{s}.{j}") for s in range(1, 5) for j in range(len(getattr(model, f"layer{s}")))]
    return BlockPlan(stem=stem, steps=steps, form="conv")


def resnet_residual_branches(model: nn.Module, path: str) -> list[str]:
    """BasicBlock: ``conv2``; Bottleneck: ``conv3`` (the ``downsample`` shortcut is not a branch of ``f(x)``)."""
    return ["conv3" if isinstance(model.get_submodule(path), torchvision.models.resnet.Bottleneck) else "conv2"]


RESNET = register_family(Family(
    name="resnet", matches=lambda m: isinstance(m, torchvision.models.ResNet), layer_rule=resnet_layer_rule,
    plan=resnet_plan, default_baseline="percentile", classifier=("fc",),
    residual_branches=resnet_residual_branches))

PREPROCESSING = Preprocessing(0.875)

for _name, _hint in RESNET_WEIGHTS_HINT.items():
    register_model(ModelEntry(_name, RESNET, partial(build_resnet, _name),
                              f"torchvision {_name} (ImageNet; weights via --checkpoint)", PREPROCESSING))
