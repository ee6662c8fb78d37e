"""timm ViT / DeiT (distilled too): the ``vit`` family and the paper's ImageNet models.

QwT walks the tokens through ``blocks``; nothing after them is compensated. Patch-embed and the classifier
head(s) keep 8 bits under the QwT layer map; qkv and fc1 read LayerNorm outputs and are reparameterised.
"""
from __future__ import annotations

from functools import partial

import timm.models.vision_transformer as timm_vit
import torch
from torch import nn

from ..compensation.blockwise import BlockPlan, Step
from ..data.imagenet import INCEPTION_MEAN, INCEPTION_STD, Preprocessing
from ..family import Family, register_family
from ..ptq.config import PTQConfig
from ..ptq.surgery import LayerRule, token_rule
from ..quant.attention import QuantAttention
from .checkpoint import build_timm
from .registry import ModelEntry, register_model

NORM_LINEAR_PAIRS = (("norm1", "attn.qkv"), ("norm2", "mlp.fc1"))
CLASSIFIER = ("head", "head_dist")


def _attention(module: nn.Module) -> type[nn.Module] | None:
    return QuantAttention if isinstance(module, timm_vit.Attention) else None


def vit_layer_rule(model: nn.Module, config: PTQConfig) -> LayerRule:
    return token_rule(config, attention=_attention, embed=lambda name: name == "patch_embed.proj",
                      classifier=lambda name: name in CLASSIFIER,
                      post_norm=lambda name: name.endswith((".attn.qkv", ".mlp.fc1")))


def transformer_residual_branches(model: nn.Module, path: str) -> list[str]:
    """A timm transformer block (ViT, DeiT, Swin) writes its two residual adds through these layers."""
    return ["attn.proj", "mlp.fc2"]


def vit_plan(model: nn.Module) -> BlockPlan:
    """Stem = patch-embed, class/dist tokens, position embedding (timm 1.x ``_pos_embed``), pre-norm."""

    def stem(images: torch.Tensor) -> torch.Tensor:
        x = model._pos_embed(model.patch_embed(images))
        x = model.patch_drop(x) if hasattr(model, "patch_drop") else x
        return model.norm_pre(x) if hasattr(model, "norm_pre") else x

    return BlockPlan(stem=stem, steps=[Step(f"blocks.{i}") for i in range(len(model.blocks))], form="linear")


VIT = register_family(Family(
    name="vit", matches=lambda m: isinstance(m, timm_vit.VisionTransformer), layer_rule=vit_layer_rule,
    plan=vit_plan, default_baseline="repq_vit", norm_linear_pairs=NORM_LINEAR_PAIRS, classifier=CLASSIFIER,
    residual_branches=transformer_residual_branches))

#: DeiT: crop 0.875, ImageNet statistics; augreg ViT: crop 0.9, mean = std = 0.5.
DEIT_PREPROCESSING = Preprocessing(0.875)
AUGREG_PREPROCESSING = Preprocessing(0.9, INCEPTION_MEAN, INCEPTION_STD)
#: Reduced shape of the same classes for smoke runs and tests (random init, 32×32 inputs).
SMOKE_KWARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)

_PAPER_MODELS = {  # name: (timm name, preprocessing, weights the user supplies)
    "vit_small": ("vit_small_patch16_224", AUGREG_PREPROCESSING, "timm vit_small_patch16_224.augreg_in21k_ft_in1k "
                  "model.safetensors, or the augreg S_16-i21k-300ep-...-res_224.npz"),
    "vit_base": ("vit_base_patch16_224", AUGREG_PREPROCESSING, "timm vit_base_patch16_224.augreg_in21k_ft_in1k "
                 "model.safetensors, or the augreg B_16-i21k-300ep-...-res_224.npz"),
    "deit_tiny": ("deit_tiny_patch16_224", DEIT_PREPROCESSING, "deit_tiny_patch16_224-a1311bcf.pth"),
    "deit_small": ("deit_small_patch16_224", DEIT_PREPROCESSING, "deit_small_patch16_224-cd65a155.pth"),
    "deit_base": ("deit_base_patch16_224", DEIT_PREPROCESSING, "deit_base_patch16_224-b5f2ef4d.pth"),
    "deit_tiny_distilled": ("deit_tiny_distilled_patch16_224", DEIT_PREPROCESSING,
                            "deit_tiny_distilled_patch16_224-b40b3cf7.pth"),
    "deit_small_distilled": ("deit_small_distilled_patch16_224", DEIT_PREPROCESSING,
                             "deit_small_distilled_patch16_224-649709d9.pth"),
    "deit_base_distilled": ("deit_base_distilled_patch16_224", DEIT_PREPROCESSING,
                            "deit_base_distilled_patch16_224-df68dfff.pth"),
}

for _name, (_timm_name, _pre, _hint) in _PAPER_MODELS.items():
    register_model(ModelEntry(
        _name, VIT, partial(build_timm, _timm_name, _hint, timm_vit.checkpoint_filter_fn, SMOKE_KWARGS),
        f"timm {_timm_name} (ImageNet; weights via --checkpoint)", _pre))
