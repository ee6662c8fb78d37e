"""A tiny timm VisionTransformer for Fashion-MNIST.

It is kept a plain timm ``VisionTransformer`` (standard Block/Attention/Mlp with qkv, proj,
fc1, fc2, norm1, norm2) so the quantization code can treat it like any ImageNet ViT, while
being small enough (< 1 MB float32) to ship as a repo asset and to run on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.models.vision_transformer import VisionTransformer

from .registry import ModelEntry, fixed_build, register_model
from .vit import VIT

__all__ = ["CHECKPOINT", "VIT_FMNIST_CONFIG", "vit_fmnist"]

CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "vit_fmnist.safetensors"

# 28x28 input, 4x4 patches -> 49 patch tokens + 1 cls token.
VIT_FMNIST_CONFIG: dict[str, Any] = dict(
    img_size=28,
    patch_size=4,
    in_chans=1,
    num_classes=10,
    embed_dim=64,
    depth=6,
    num_heads=4,
    mlp_ratio=2.0,
    class_token=True,
    global_pool="token",
    drop_path_rate=0.0,
)


def vit_fmnist(pretrained: bool = True, **kwargs: Any) -> VisionTransformer:
    """Build the model in eval mode; with ``pretrained`` load the shipped checkpoint strictly.

    ``kwargs`` override entries of ``VIT_FMNIST_CONFIG`` (e.g. ``drop_path_rate`` for training);
    architecture-changing overrides will not match the checkpoint and fail the strict load.
    """
    model = VisionTransformer(**{**VIT_FMNIST_CONFIG, **kwargs})
    if pretrained:
        if not CHECKPOINT.is_file():
            raise FileNotFoundError(
                f"checkpoint not found: {CHECKPOINT}; it is produced by `python scripts/train_fmnist_vit.py`"
            )
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(CHECKPOINT)), strict=True)
    model.eval()
    return model


register_model(ModelEntry("vit_fmnist", VIT, vit_fmnist,
                          "6-block ViT trained on Fashion-MNIST by scripts/train_fmnist_vit.py (weights shipped)",
                          reduced={}, reduced_input=(1, 28, 28), input_shape=(1, 28, 28),
                          check_saved_args=fixed_build("vit_fmnist")))
