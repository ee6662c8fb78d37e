"""Quantised attention for timm's ViT/DeiT ``Attention`` and Swin ``WindowAttention``.

The two attention products become :class:`QuantMatMul` modules so their operands can be quantised. The op order
is the one of timm 0.4.12 that RepQ-ViT calibrated on: ViT computes ``(q @ kᵀ) * scale`` (timm 1.x scales q
first, which would put q on a different grid); Swin scales q first, then adds the relative-position bias and the
shift mask. Both modules take over the original's sub-modules, so state-dict keys stay the same.
"""
from __future__ import annotations

import torch
from torch import nn

from .modules import QuantMatMul


class QuantAttention(nn.Module):
    """Takes over a timm ``Attention``'s sub-modules (state-dict keys unchanged) and adds matmul1/matmul2."""

    def __init__(self, attn: nn.Module, matmul1: QuantMatMul, matmul2: QuantMatMul) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        identity = nn.Identity()
        self.qkv, self.proj = attn.qkv, attn.proj
        self.q_norm = getattr(attn, "q_norm", identity)
        self.k_norm = getattr(attn, "k_norm", identity)
        self.norm = getattr(attn, "norm", identity)
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.matmul1, self.matmul2 = matmul1, matmul2

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
        if attn_mask is not None:
            attn = attn + attn_mask
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.matmul2(attn, v).transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(self.norm(x)))


class QuantWindowAttention(nn.Module):
    """Swin window attention (timm 1.x ``WindowAttention``, mmdet's ``WindowMSA``) with quantised matmuls."""

    def __init__(self, attn: nn.Module, matmul1: QuantMatMul, matmul2: QuantMatMul) -> None:
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.window_area = attn.relative_position_index.shape[0]
        self.relative_position_bias_table = attn.relative_position_bias_table
        persistent = "relative_position_index" in attn.state_dict()
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=persistent)
        self.qkv, self.proj = attn.qkv, attn.proj
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.matmul1, self.matmul2 = matmul1, matmul2

    def _rel_pos_bias(self) -> torch.Tensor:
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.matmul1(q * self.scale, k.transpose(-2, -1)) + self._rel_pos_bias()
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.view(-1, windows, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.matmul2(attn, v).transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(x))
