"""Detector weights: the paper's mmdet 2.x Swin checkpoints (keys converted) and mmdet 3.x ones (as they are).

The paper used the Swin-Transformer-Object-Detection release (mmdet 2.x layout: ``backbone.layers``,
``attn.qkv``, ``mlp.fc1``, ``patch_embed.proj`` and patch merging over concatenated 2×2 neighbours). mmdet 3.x
names these ``backbone.stages``, ``attn.w_msa.qkv``, ``ffn.layers.0.0``, ``patch_embed.projection`` and gathers
the 2×2 neighbours with ``nn.Unfold`` in another channel order, so the patch-merging LayerNorm and reduction
columns are permuted. Neck and head keys are the same in both.

Files are read weights-only by the library's loader (``torch.load(weights_only=True)``, what recent torch defaults
to and what trips mmengine's loader on checkpoints that carry extra objects). numpy scalars and arrays in mmdet's
checkpoint metadata are allowed for that one call (never globally); anything else is refused, not unpickled.
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...models.checkpoint import StateDict, load_into

_BLOCK_RENAMES = ((re.compile(r"\.attn\."), ".attn.w_msa."), (re.compile(r"\.mlp\.fc1\."), ".ffn.layers.0.0."),
                  (re.compile(r"\.mlp\.fc2\."), ".ffn.layers.1."))
_MERGING = re.compile(r"^backbone\.stages\.\d+\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$")


def numpy_metadata_globals() -> list:
    """numpy objects that checkpoint metadata may hold and that are safe to rebuild: scalars, arrays, dtypes
    (the array/scalar constructors under both their numpy 1.x and 2.x module names)."""
    multiarray = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray")
    allowed: list = [np.ndarray, np.dtype, *(getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType"))]
    for name in ("scalar", "_reconstruct"):
        allowed += [(getattr(multiarray, name), f"numpy.{core}.multiarray.{name}") for core in ("core", "_core")]
    return allowed


def is_mmdet2_swin(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("backbone.layers.") for k in state)


def merging_permutation(in_channels: int) -> torch.Tensor:
    """Index map from mmdet 3.x patch-merging channels to the original ones.

    mmdet 3.x (``nn.Unfold``): channel c of 2×2 offset (dy, dx) sits at 4c + 2dy + dx. The original concatenates
    the four strided slices (0,0), (1,0), (0,1), (1,1) as (dy, dx), so it sits at (2dx + dy)·C + c.
    """
    channels = in_channels // 4
    c = torch.arange(channels).repeat_interleave(4)
    offset = torch.arange(4).repeat(channels)
    dy, dx = offset // 2, offset % 2
    return (2 * dx + dy) * channels + c


def convert_mmdet2_swin(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename (and for patch merging, permute) a mmdet 2.x Swin detector state dict to mmdet 3.x."""
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith("backbone.patch_embed.proj."):
            key = key.replace(".proj.", ".projection.", 1)
        elif key.startswith("backbone.layers."):
            key = key.replace("backbone.layers.", "backbone.stages.", 1)
            if ".blocks." in key:
                for pattern, new in _BLOCK_RENAMES:
                    key = pattern.sub(new, key, count=1)
            elif _MERGING.match(key):
                value = value[..., merging_permutation(value.shape[-1])].contiguous()
        out[key] = value
    return out


def load_detector_weights(model: nn.Module, path: str | Path) -> str:
    """Load ``path`` into ``model`` strictly (every key must match); returns the layout found.

    Reads with the library's weights-only loader, with numpy metadata allowed for this call only.
    """
    layouts: list[str] = []

    def to_mmdet3(state: StateDict, _: nn.Module) -> StateDict:
        layouts.append("mmdet2-swin" if is_mmdet2_swin(state) else "mmdet3")
        return convert_mmdet2_swin(state) if layouts[-1] == "mmdet2-swin" else state

    with torch.serialization.safe_globals(numpy_metadata_globals()):
        load_into(model, path, to_mmdet3)
    return layouts[0]
