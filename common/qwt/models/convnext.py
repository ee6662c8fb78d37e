"""timm ConvNeXt: the ``convnext`` family, an example of adding a model that is not in the paper.

A family is one file: how to recognise the model, its layer rule, its QwT plan, and a registered model. Here:
percentile PTQ (stem conv and classifier W8A8, depthwise convs, downsampling convs and the MLP Linears at the
requested bits); QwT compensates every ConvNeXt block with the grouped-conv form on its NCHW output, and runs
the downsampling layers between stages quantised but uncompensated.
"""
from __future__ import annotations

from functools import partial

import timm.models.convnext as timm_convnext
from torch import nn

from ..compensation.blockwise import BlockPlan, stage_steps
from ..data.imagenet import Preprocessing
from ..family import Family, register_family
from ..ptq.config import PTQConfig
from ..ptq.surgery import LayerRule, cnn_rule
from .checkpoint import build_timm
from .registry import ModelEntry, register_model


def convnext_layer_rule(model: nn.Module, config: PTQConfig) -> LayerRule:
    return cnn_rule(config, stem="stem.0", classifier=lambda name: name == "head.fc")


def convnext_plan(model: nn.Module) -> BlockPlan:
    return BlockPlan(stem=model.stem, steps=stage_steps(model.stages, "stages"), form="conv")


def convnext_residual_branches(model: nn.Module, path: str) -> list[str]:
    """The block's MLP ends in ``mlp.fc2`` (a Linear on NHWC maps, or a 1×1 conv with ``conv_mlp``)."""
    return ["mlp.fc2"]


CONVNEXT = register_family(Family(
    name="convnext", matches=lambda m: isinstance(m, timm_convnext.ConvNeXt), layer_rule=convnext_layer_rule,
    plan=convnext_plan, default_baseline="percentile", classifier=("head.fc",),
    residual_branches=convnext_residual_branches))

register_model(ModelEntry(
    "convnext_atto", CONVNEXT,
    partial(build_timm, "convnext_atto", "timm convnext_atto.d2_in1k model.safetensors",
            timm_convnext.checkpoint_filter_fn, {}),
    "timm convnext_atto (ImageNet; weights via --checkpoint; not in the paper)", Preprocessing(0.95)))
