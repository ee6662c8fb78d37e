"""QwT block plan for mmdet's Swin backbone at the compensation resolution (spec §5.2).

The authors fit the compensation on 224×224 images: every Swin block of every stage is compensated, patch
merging is run quantised but not compensated, and the neck and heads are left alone. mmdet's Swin blocks take
the token grid shape and rebuild the shifted-window mask from it on each call, so the plan only has to pass each
stage's grid (56, 28, 14, 7 for 224 input). The fitted maps are token-wise, so the model then applies them at
any test resolution.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from qwt.compensation import BlockPlan, Step

HW = tuple[int, int]

#: Side of the square images the authors fit the compensation on.
COMP_SIZE = 224


def _run_block(block: nn.Module, x: torch.Tensor, hw_shape: HW) -> torch.Tensor:
    return block(x, hw_shape)


def _run_merging(merging: nn.Module, x: torch.Tensor, hw_shape: HW) -> torch.Tensor:
    return merging(x, hw_shape)[0]


def _downscale(hw: HW, stride: int) -> HW:
    return math.ceil(hw[0] / stride), math.ceil(hw[1] / stride)


def swin_plan(backbone: nn.Module, image_hw: HW = (COMP_SIZE, COMP_SIZE)) -> BlockPlan:
    """Steps through ``backbone`` (mmdet ``SwinTransformer``) for inputs of ``image_hw`` pixels.

    Paths are relative to the backbone; pass the backbone to :func:`qwt.apply_qwt`.
    """
    if backbone.use_abs_pos_embed:
        raise ValueError("Swin with an absolute position embedding is not supported (the paper's models have none)")
    first = _downscale(image_hw, backbone.patch_embed.projection.stride[0])

    def stem(images: torch.Tensor) -> torch.Tensor:
        x, grid = backbone.patch_embed(images)
        if tuple(grid) != first:
            raise ValueError(f"compensation images must be {image_hw[0]}×{image_hw[1]}, "
                             f"got {tuple(images.shape[-2:])}")
        return backbone.drop_after_pos(x)

    steps: list[Step] = []
    hw = first
    for s, stage in enumerate(backbone.stages):
        steps += [Step(f"stages.{s}.blocks.{j}", call=partial(_run_block, hw_shape=hw))
                  for j in range(len(stage.blocks))]
        if stage.downsample is not None:
            steps.append(Step(f"stages.{s}.downsample", compensate=False, call=partial(_run_merging, hw_shape=hw)))
            hw = _downscale(hw, stage.downsample.sampler.stride[0])
    return BlockPlan(stem=stem, steps=steps, form="linear")
