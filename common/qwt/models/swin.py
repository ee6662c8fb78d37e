"""QwT plan for timm 1.x Swin: every block of every stage; patch merging runs quantised, uncompensated.

timm 1.x puts PatchMerging at the start of stages 1–3 (timm 0.4.12 at the end of stages 0–2); walking the
stages in order gives the authors' sequence either way: last block of a stage → merging → next stage.
Features stay NHWC; the linear compensation acts on the channel axis.
"""
from __future__ import annotations

from torch import nn

from ..compensation.blockwise import BlockPlan, Step


def swin_plan(model: nn.Module) -> BlockPlan:
    steps: list[Step] = []
    for s, stage in enumerate(model.layers):
        if not isinstance(stage.downsample, nn.Identity):
            steps.append(Step(f"layers.{s}.downsample", compensate=False))
        steps.extend(Step(f"layers.{s}.blocks.{j}") for j in range(len(stage.blocks)))
    return BlockPlan(stem=model.patch_embed, steps=steps, form="linear")
