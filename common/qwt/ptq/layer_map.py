"""Layer maps: which modules become quantised, with which quantisers (spec §1.2 and §2).

A map walks a float model and swaps modules in place. Names follow timm / torchvision conventions, as in the
authors' code (``qkv``/``fc1``/``reduction`` take post-LayerNorm inputs, ``patch_embed`` is the stem of ViTs,
``head`` the classifier).
"""
from __future__ import annotations

from torch import nn

from ..quant.attention import QuantAttention, QuantWindowAttention
from ..quant.modules import QuantConv2d, QuantLinear, QuantMatMul
from ..quant.quantizers import LogSqrt2Quantizer, Quantizer, UniformQuantizer
from .config import PTQConfig

#: Linear layers fed by a LayerNorm: their input quantiser is channel-wise until reparameterisation.
POST_LAYERNORM_LINEARS = ("qkv", "fc1", "reduction")
_WEIGHT_AXIS = 0  # per output channel


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def act_quantizer(bits: int, per_channel: bool = False) -> UniformQuantizer:
    """Activation quantiser: per tensor, or per channel along the last (feature) axis."""
    return UniformQuantizer(bits, channel_axis=-1 if per_channel else None)


def weight_quantizer(bits: int) -> UniformQuantizer:
    """Weight quantiser: per output channel."""
    return UniformQuantizer(bits, channel_axis=_WEIGHT_AXIS)


def attention_matmuls(config: PTQConfig) -> tuple[QuantMatMul, QuantMatMul]:
    """matmul1 (q @ kᵀ) with uniform operands; matmul2 (attn @ v) with a log-√2 (RepQ-ViT) or uniform
    (percentile) post-softmax quantiser."""
    a = config.a_bits
    softmax_q: Quantizer = LogSqrt2Quantizer(a, config.log_floor) if config.method == "repq_vit" else act_quantizer(a)
    return QuantMatMul(act_quantizer(a), act_quantizer(a)), QuantMatMul(softmax_q, act_quantizer(a))


def _attention_class(module: nn.Module) -> type[nn.Module] | None:
    """The quantised replacement for a timm attention module: ViT ``Attention`` or Swin ``WindowAttention``."""
    if isinstance(module, (QuantAttention, QuantWindowAttention)):
        return None
    if not all(hasattr(module, a) for a in ("qkv", "proj", "num_heads", "scale")):
        return None
    return QuantWindowAttention if hasattr(module, "relative_position_bias_table") else QuantAttention


def _is_head(name: str) -> bool:
    # The authors' rule: a Linear whose name contains "head" or "fc." is the classifier.
    return "head" in name or "fc." in name


def quantize_vit_modules(model: nn.Module, config: PTQConfig) -> nn.Module:
    """Swap a ViT/DeiT/Swin's attention, Linear and Conv2d modules for quantised ones (quantisers disabled)."""
    a, w = config.a_bits, config.w_bits
    repq = config.method == "repq_vit"
    for name, module in list(model.named_modules()):
        replacement = _attention_class(module)
        if replacement is not None:
            swap_module(model, name, replacement(module, *attention_matmuls(config)))
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, QuantConv2d)):
            continue
        if isinstance(module, nn.Conv2d):
            if "patch_embed" not in name:
                raise ValueError(f"unexpected Conv2d {name!r} in a ViT-family model (only patch_embed.proj is)")
            w_bits = 8 if config.layer_map == "qwt" else w
            swap_module(model, name, QuantConv2d(module, act_quantizer(8), weight_quantizer(w_bits)))
        elif isinstance(module, nn.Linear):
            if _is_head(name) and config.layer_map == "qwt":
                swap_module(model, name, QuantLinear(module, act_quantizer(8), weight_quantizer(8)))
            else:
                per_channel = repq and name.rsplit(".", 1)[-1] in POST_LAYERNORM_LINEARS
                swap_module(model, name, QuantLinear(module, act_quantizer(a, per_channel), weight_quantizer(w)))
    return model


def quantize_cnn_modules(model: nn.Module, config: PTQConfig) -> nn.Module:
    """Percentile PTQ map for CNNs: every Conv2d and Linear; the stem conv and the classifier at W8A8.

    The stem is the first Conv2d in module order; Linear layers of a CNN are its classifier. BatchNorm is not
    folded (weights are quantised pre-BN), activations and residual adds stay FP.
    """
    if config.method != "percentile":
        raise ValueError("CNNs are quantised with the 'percentile' method; RepQ-ViT needs LayerNorm → Linear pairs")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not isinstance(m, QuantConv2d)]
    if not convs:
        raise ValueError("no Conv2d found: is this a CNN?")
    conv_a = config.conv_act_bits or config.a_bits
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, QuantConv2d)):
            continue
        if isinstance(module, nn.Conv2d):
            stem = name == convs[0]
            swap_module(model, name, QuantConv2d(
                module, act_quantizer(8 if stem else conv_a), weight_quantizer(8 if stem else config.w_bits)))
        elif isinstance(module, nn.Linear):
            swap_module(model, name, QuantLinear(module, act_quantizer(8), weight_quantizer(8)))
    return model
