"""Module surgery: a layer rule maps ``(name, module)`` to its quantised replacement, one walk applies it.

Each model family supplies its rule (see :class:`qwt.family.Family`); the bit decisions themselves live in the
two rule builders below, one for token models (ViT, DeiT, Swin, a detector's Swin backbone) and one for CNNs,
so a change to a bit rule reaches classification and detection alike. Algorithm: docs/algorithm.md#layer-maps.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..quant.modules import QuantConv2d, QuantLinear, QuantMatMul, QuantModule, swap_module
from ..quant.quantizers import LogSqrt2Quantizer, Quantizer, UniformQuantizer
from .config import PTQConfig

#: (name, module) → the quantised replacement, or None to leave the module as it is.
LayerRule = Callable[[str, nn.Module], nn.Module | None]
#: A float attention module → its quantised replacement class, or None if the module is not attention.
AttentionRule = Callable[[nn.Module], type[nn.Module] | None]
NameTest = Callable[[str], bool]


def act_quantizer(bits: int, per_channel: bool = False) -> UniformQuantizer:
    """Activation quantiser: per tensor, or per channel along the last (feature) axis."""
    return UniformQuantizer(bits, channel_axis=-1 if per_channel else None)


def weight_quantizer(bits: int) -> UniformQuantizer:
    """Weight quantiser: per output channel."""
    return UniformQuantizer(bits, channel_axis=0)


def attention_matmuls(config: PTQConfig) -> tuple[QuantMatMul, QuantMatMul]:
    """matmul1 (q @ kᵀ) with uniform operands; matmul2 (attn @ v) with a log-√2 (RepQ-ViT) or uniform
    (percentile) post-softmax quantiser."""
    a = config.a_bits
    softmax_q: Quantizer = LogSqrt2Quantizer(a, config.log_floor) if config.method == "repq_vit" else act_quantizer(a)
    return QuantMatMul(act_quantizer(a), act_quantizer(a)), QuantMatMul(softmax_q, act_quantizer(a))


def token_rule(config: PTQConfig, *, attention: AttentionRule, embed: NameTest, classifier: NameTest,
               post_norm: NameTest, other_convs: bool = False) -> LayerRule:
    """Bits of a token model (RepQ-ViT's map and the QwT authors' variant).

    Attention matmuls at A bits (log-√2 after softmax for RepQ-ViT). The patch-embed conv reads 8-bit input;
    its weights and the classifier are W8A8 under the ``qwt`` map, W/A bits under ``repq_vit``. Linear layers
    fed by a LayerNorm (``post_norm``) get a channel-wise input quantiser for RepQ-ViT's reparameterisation.
    Any other conv is refused unless ``other_convs`` (a detector's neck and heads: W/A bits).
    """
    a, w, qwt_map = config.a_bits, config.w_bits, config.layer_map == "qwt"
    repq = config.method == "repq_vit"
    if config.conv_act_bits not in (None, a):  # it would show in the bit label without changing any layer
        raise ValueError(f"conv_act_bits={config.conv_act_bits} applies to CNNs only; token models quantise "
                         f"every activation at a_bits ({a})")

    def rule(name: str, module: nn.Module) -> nn.Module | None:
        replacement = attention(module)
        if replacement is not None:
            return replacement(module, *attention_matmuls(config))
        if isinstance(module, nn.Conv2d):
            if embed(name):
                return QuantConv2d(module, act_quantizer(8), weight_quantizer(8 if qwt_map else w))
            if not other_convs:
                raise ValueError(f"unexpected Conv2d {name!r} in a token model (only the patch embedding is one)")
            return QuantConv2d(module, act_quantizer(a), weight_quantizer(w))
        if isinstance(module, nn.Linear):
            if qwt_map and classifier(name):
                return QuantLinear(module, act_quantizer(8), weight_quantizer(8))
            return QuantLinear(module, act_quantizer(a, repq and post_norm(name)), weight_quantizer(w))
        return None

    return rule


def cnn_rule(config: PTQConfig, *, stem: str, classifier: NameTest) -> LayerRule:
    """Bits of a CNN under percentile PTQ: stem conv and classifier W8A8, every other conv and Linear at W bits
    with ``conv_act_bits`` (or A) bit inputs. BatchNorm is not folded; activations and adds stay FP."""
    if config.method != "percentile":
        raise ValueError("CNNs are quantised with the 'percentile' method; RepQ-ViT needs LayerNorm → Linear pairs")
    conv_a = config.conv_act_bits or config.a_bits

    def rule(name: str, module: nn.Module) -> nn.Module | None:
        if isinstance(module, nn.Conv2d):
            first = name == stem
            return QuantConv2d(module, act_quantizer(8 if first else conv_a),
                               weight_quantizer(8 if first else config.w_bits))
        if isinstance(module, nn.Linear):
            if classifier(name):
                return QuantLinear(module, act_quantizer(8), weight_quantizer(8))
            return QuantLinear(module, act_quantizer(config.a_bits), weight_quantizer(config.w_bits))
        return None

    return rule


def quantize_modules(model: nn.Module, rule: LayerRule) -> nn.Module:
    """Apply ``rule`` to every module of ``model`` in place (quantisers start disabled and uncalibrated).

    The walk is over a snapshot of the float module tree: a replaced attention module keeps its children, which
    are then replaced in turn. Modules that are already quantised are left alone.
    """
    for name, module in list(model.named_modules()):
        if not name or isinstance(module, QuantModule):
            continue
        new = rule(name, module)
        if new is not None:
            swap_module(model, name, new)
    return model

