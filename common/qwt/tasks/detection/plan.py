"""The ``mmdet_swin`` family: a Swin Mask / Cascade Mask R-CNN, quantised whole, compensated in its backbone.

Quantisation (docs/algorithm.md#detection): every ``Conv2d`` and ``Linear`` of the detector (backbone, FPN,
RPN, box and mask heads) gets per-output-channel W-bit weights and a per-tensor A-bit input, except the
patch-embed conv (8-bit input) and the backbone's Linear layers fed by a LayerNorm (channel-wise input, folded
into the LayerNorm by RepQ-ViT's reparameterisation); both attention matmuls of every window attention are
quantised, the post-softmax operand with log-√2. ``ConvTranspose2d``, norms, RoIAlign and NMS stay FP.

Compensation: the authors fit it on 224×224 images; every Swin block of every stage is compensated, patch
merging runs quantised but uncompensated, and the neck and heads are left alone. mmdet's Swin blocks take the
token grid shape and rebuild the shifted-window mask from it on each call, so the plan passes each stage's grid
(56, 28, 14, 7 for 224 input). The fitted maps are token-wise, so they apply unchanged at any test resolution.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from mmdet.models.backbones.swin import SwinTransformer, WindowMSA
from torch import nn

from ...compensation import BlockPlan, Step
from ...family import Family, register_family
from ...ptq import PTQConfig
from ...ptq.surgery import LayerRule, token_rule
from ...quant import QuantWindowAttention

HW = tuple[int, int]

#: Side of the square images the authors fit the compensation on.
COMP_SIZE = 224
#: (LayerNorm, following Linear) of mmdet's Swin: block attention input, block FFN input, patch merging.
NORM_LINEAR_PAIRS: tuple[tuple[str, str], ...] = (("norm1", "attn.w_msa.qkv"), ("norm2", "ffn.layers.0.0"),
                                                  ("norm", "reduction"))
_POST_LAYERNORM = tuple(f".{linear}" for _, linear in NORM_LINEAR_PAIRS)


def _attention(module: nn.Module) -> type[nn.Module] | None:
    """mmdet's ``WindowMSA`` computes what the library's Swin attention does (q·scale @ kᵀ + relative bias +
    shift mask, softmax, @ v, proj), so the library's quantised module takes it over."""
    return QuantWindowAttention if isinstance(module, WindowMSA) else None


def detector_layer_rule(model: nn.Module, config: PTQConfig) -> LayerRule:
    return token_rule(config, attention=_attention, embed=lambda name: "embed" in name, classifier=lambda name: False,
                      post_norm=lambda name: name.startswith("backbone.") and name.endswith(_POST_LAYERNORM),
                      other_convs=True)


def _run_block(block: nn.Module, x: torch.Tensor, hw_shape: HW) -> torch.Tensor:
    return block(x, hw_shape)


def _run_merging(merging: nn.Module, x: torch.Tensor, hw_shape: HW) -> torch.Tensor:
    return merging(x, hw_shape)[0]


def _downscale(hw: HW, stride: int) -> HW:
    return math.ceil(hw[0] / stride), math.ceil(hw[1] / stride)


def mmdet_swin_plan(detector: nn.Module, image_hw: HW = (COMP_SIZE, COMP_SIZE)) -> BlockPlan:
    """Steps through the detector's Swin backbone for inputs of ``image_hw`` pixels (paths from the detector)."""
    backbone = detector.backbone
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
        steps += [Step(f"backbone.stages.{s}.blocks.{j}", call=partial(_run_block, hw_shape=hw))
                  for j in range(len(stage.blocks))]
        if stage.downsample is not None:
            steps.append(Step(f"backbone.stages.{s}.downsample", compensate=False,
                              call=partial(_run_merging, hw_shape=hw)))
            hw = _downscale(hw, stage.downsample.sampler.stride[0])
    return BlockPlan(stem=stem, steps=steps, form="linear")


def detector_forward(model: nn.Module, batch: dict) -> object:
    """The detector's calibration forward: one test step on a data batch."""
    return model.test_step(batch)


MMDET_SWIN = register_family(Family(
    name="mmdet_swin", matches=lambda m: isinstance(getattr(m, "backbone", None), SwinTransformer),
    layer_rule=detector_layer_rule, plan=mmdet_swin_plan, default_baseline="repq_vit",
    norm_linear_pairs=NORM_LINEAR_PAIRS))
