"""timm 1.x Swin: the ``swin`` family and the paper's ImageNet Swin-T/S.

QwT compensates every block of every stage; patch merging runs quantised and uncompensated. timm 1.x puts
PatchMerging at the start of stages 1–3 (timm 0.4.12 at the end of stages 0–2); walking the stages in order
gives the authors' sequence either way: last block of a stage → merging → next stage. Features stay NHWC; the
linear compensation acts on the channel axis.
"""
from __future__ import annotations

from functools import partial

import timm.models.swin_transformer as timm_swin
from torch import nn

from ..compensation.blockwise import BlockPlan, stage_steps
from ..data.imagenet import Preprocessing
from ..family import Family, register_family
from ..ptq.config import PTQConfig
from ..ptq.surgery import LayerRule, token_rule
from ..quant.attention import QuantWindowAttention
from .checkpoint import build_timm
from .vit import transformer_residual_branches
from .registry import ModelEntry, register_model

NORM_LINEAR_PAIRS = (("norm1", "attn.qkv"), ("norm2", "mlp.fc1"), ("norm", "reduction"))
CLASSIFIER = ("head.fc",)


def _attention(module: nn.Module) -> type[nn.Module] | None:
    return QuantWindowAttention if isinstance(module, timm_swin.WindowAttention) else None


def swin_layer_rule(model: nn.Module, config: PTQConfig) -> LayerRule:
    return token_rule(config, attention=_attention, embed=lambda name: name == "patch_embed.proj",
                      classifier=lambda name: name in CLASSIFIER,
                      post_norm=lambda name: name.endswith((".attn.qkv", ".mlp.fc1", ".reduction")))


def timm_swin_plan(model: nn.Module) -> BlockPlan:
    return BlockPlan(stem=model.patch_embed, steps=stage_steps(model.layers, "layers"), form="linear")


SWIN = register_family(Family(
    name="swin", matches=lambda m: isinstance(m, timm_swin.SwinTransformer), layer_rule=swin_layer_rule,
    plan=timm_swin_plan, default_baseline="repq_vit", norm_linear_pairs=NORM_LINEAR_PAIRS,
    classifier=CLASSIFIER, residual_branches=transformer_residual_branches))

PREPROCESSING = Preprocessing(0.9)
SMOKE_KWARGS = dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2, 2), num_heads=(2, 2, 2))

for _name, _timm_name in (("swin_tiny", "swin_tiny_patch4_window7_224"),
                          ("swin_small", "swin_small_patch4_window7_224")):
    register_model(ModelEntry(
        _name, SWIN, partial(build_timm, _timm_name, f"{_timm_name}.pth", timm_swin.checkpoint_filter_fn,
                             SMOKE_KWARGS),
        f"timm {_timm_name} (ImageNet; weights via --checkpoint)", PREPROCESSING))
