"""The paper's ImageNet ViT / DeiT / Swin models, built from timm 1.x definitions with user-supplied weights.

Nothing is downloaded: ``checkpoint`` is a safetensors file, a weights-only PyTorch file (timm or the original
DeiT / Swin layouts, converted by timm's own filters) or a big_vision ``.npz`` for the augreg ViTs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
from torch import nn

from .checkpoint import load_into


@dataclass(frozen=True)
class TimmSpec:
    timm_name: str
    preprocessing: str  # key of qwt.data.imagenet.PREPROCESSING
    weights_hint: str  # a file the user can supply


VIT_SPECS: dict[str, TimmSpec] = {
    "vit_small": TimmSpec("vit_small_patch16_224", "vit", "timm vit_small_patch16_224.augreg_in21k_ft_in1k "
                          "model.safetensors, or the augreg S_16-i21k-300ep-...-res_224.npz"),
    "vit_base": TimmSpec("vit_base_patch16_224", "vit", "timm vit_base_patch16_224.augreg_in21k_ft_in1k "
                         "model.safetensors, or the augreg B_16-i21k-300ep-...-res_224.npz"),
    "deit_tiny": TimmSpec("deit_tiny_patch16_224", "deit", "deit_tiny_patch16_224-a1311bcf.pth"),
    "deit_small": TimmSpec("deit_small_patch16_224", "deit", "deit_small_patch16_224-cd65a155.pth"),
    "deit_base": TimmSpec("deit_base_patch16_224", "deit", "deit_base_patch16_224-b5f2ef4d.pth"),
    "deit_tiny_distilled": TimmSpec("deit_tiny_distilled_patch16_224", "deit",
                                    "deit_tiny_distilled_patch16_224-b40b3cf7.pth"),
    "deit_small_distilled": TimmSpec("deit_small_distilled_patch16_224", "deit",
                                     "deit_small_distilled_patch16_224-649709d9.pth"),
    "deit_base_distilled": TimmSpec("deit_base_distilled_patch16_224", "deit",
                                    "deit_base_distilled_patch16_224-df68dfff.pth"),
    "swin_tiny": TimmSpec("swin_tiny_patch4_window7_224", "swin", "swin_tiny_patch4_window7_224.pth"),
    "swin_small": TimmSpec("swin_small_patch4_window7_224", "swin", "swin_small_patch4_window7_224.pth"),
}

#: Reduced shapes of the same classes for smoke runs and tests (random init, 32×32 inputs).
SMOKE_KWARGS: dict[str, dict] = {
    "vit": dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3),
    "deit": dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3),
    "swin": dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2, 2), num_heads=(2, 2, 2)),
}


def _convert(spec: TimmSpec):
    module = timm.models.swin_transformer if spec.preprocessing == "swin" else timm.models.vision_transformer
    return module.checkpoint_filter_fn


def build_timm_vit(name: str, pretrained: bool = True, checkpoint: str | Path | None = None, smoke: bool = False,
                   num_classes: int = 1000) -> nn.Module:
    """Build ``name`` (a key of VIT_SPECS) with drop-path 0 and load ``checkpoint`` if given.

    ``smoke`` builds the same class at a reduced size (32×32 inputs; random init unless a checkpoint is given)
    for CI and tests; otherwise ``pretrained`` without a checkpoint is an error naming the file to supply.
    """
    spec = VIT_SPECS[name]
    kwargs = dict(SMOKE_KWARGS[spec.preprocessing]) if smoke else {}
    model = timm.create_model(spec.timm_name, pretrained=False, drop_path_rate=0.0, num_classes=num_classes,
                              **kwargs)
    if checkpoint is None:
        if pretrained and not smoke:
            raise FileNotFoundError(
                f"{name}: ImageNet weights are not downloaded here; pass --checkpoint with {spec.weights_hint}")
    elif Path(checkpoint).suffix == ".npz":
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} not found")
        timm.models.vision_transformer._load_weights(model, str(checkpoint))
    else:
        load_into(model, checkpoint, _convert(spec))
    return model.eval()
