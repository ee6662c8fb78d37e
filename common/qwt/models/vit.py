"""QwT plan for timm ViT / DeiT (distilled too): tokens through ``blocks``, nothing compensated after them."""
from __future__ import annotations

import torch
from torch import nn

from ..compensation.blockwise import BlockPlan, Step


def vit_plan(model: nn.Module) -> BlockPlan:
    """Stem = patch-embed, class/dist tokens, position embedding (timm 1.x ``_pos_embed``), pre-norm."""

    def stem(images: torch.Tensor) -> torch.Tensor:
        x = model._pos_embed(model.patch_embed(images))
        x = model.patch_drop(x) if hasattr(model, "patch_drop") else x
        return model.norm_pre(x) if hasattr(model, "norm_pre") else x

    return BlockPlan(stem=stem, steps=[Step(f"blocks.{i}") for i in range(len(model.blocks))], form="linear")
