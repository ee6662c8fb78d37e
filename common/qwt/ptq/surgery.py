"""Module surgery: a layer rule maps ``(name, module)`` to its quantised replacement, one walk applies it.

Each model family supplies its rule (see :class:`qwt.family.Family`); the bit decisions themselves live in the
two rule builders below, one for token models (ViT, DeiT, Swin, a detector's Swin backbone) and one for CNNs,
so a change to a bit rule reaches classification and detection alike. Which quantiser sits at each place is
the baseline's choice (:class:`qwt.ptq.baselines.Baseline`) in a config resolved for the model's family
(:meth:`PTQConfig.for_family`); with ``a_bits=16`` no activation is quantised.
Algorithm: docs/algorithm.md#layer-maps.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..quant.modules import QuantConv2d, QuantLinear, QuantMatMul, QuantModule, swap_module
from ..quant.quantizers import Quantizer
from .baselines import Baseline
from .config import PTQConfig

#: (name, module) → the quantised replacement, or None to leave the module as it is.
LayerRule = Callable[[str, nn.Module], nn.Module | None]
#: A float attention module → its quantised replacement class, or None if the module is not attention.
AttentionRule = Callable[[nn.Module], type[nn.Module] | None]
NameTest = Callable[[str], bool]


class _Activations:
    """The activation quantisers a rule places: the baseline's, or none at all for weights-only settings."""

    def __init__(self, config: PTQConfig) -> None:
        self.baseline: Baseline = config.resolved_baseline().activation_baseline()
        self.off = config.float_activations

    def __call__(self, bits: int) -> Quantizer | None:
        return None if self.off else self.baseline.activation_quantizer(bits)

    def post_norm(self, bits: int) -> Quantizer | None:
        return None if self.off else self.baseline.post_norm_quantizer(bits)

    def softmax(self, bits: int, log_floor: float | None) -> Quantizer | None:
        return None if self.off else self.baseline.softmax_quantizer(bits, log_floor)


def attention_matmuls(config: PTQConfig) -> tuple[QuantMatMul, QuantMatMul]:
    """matmul1 (q @ kᵀ) with activation operands; matmul2 (attn @ v) with the baseline's post-softmax
    quantiser (log-√2 for RepQ-ViT, uniform for percentile)."""
    act, a = _Activations(config), config.a_bits
    return QuantMatMul(act(a), act(a)), QuantMatMul(act.softmax(a, config.log_floor), act(a))


def token_rule(config: PTQConfig, *, attention: AttentionRule, embed: NameTest, classifier: NameTest,
               post_norm: NameTest, other_convs: bool = False) -> LayerRule:
    """Bits of a token model (RepQ-ViT's map and the QwT authors' variant).

    Attention matmuls at A bits. The patch-embed conv reads 8-bit input; its weights and the classifier are
    W8A8 under the ``qwt`` map, W/A bits under ``repq_vit``. Linear layers fed by a LayerNorm (``post_norm``)
    get the baseline's post-norm quantiser (channel-wise for RepQ-ViT's reparameterisation).
    Any other conv is refused unless ``other_convs`` (a detector's neck and heads: W/A bits).
    """
    a, w, qwt_map = config.a_bits, config.w_bits, config.layer_map == "qwt"
    act, weight = _Activations(config), config.resolved_baseline().weight_quantizer
    if config.conv_act_bits not in (None, a):  # it would show in the bit label without changing any layer
        raise ValueError(f"conv_act_bits={config.conv_act_bits} applies to CNNs only; token models quantise "
                         f"every activation at a_bits ({a})")

    def rule(name: str, module: nn.Module) -> nn.Module | None:
        replacement = attention(module)
        if replacement is not None:
            return replacement(module, *attention_matmuls(config))
        if isinstance(module, nn.Conv2d):
            if embed(name):
                return QuantConv2d(module, act(8), weight(8 if qwt_map else w))
            if not other_convs:
                raise ValueError(f"unexpected Conv2d {name!r} in a token model (only the patch embedding is one)")
            return QuantConv2d(module, act(a), weight(w))
        if isinstance(module, nn.Linear):
            if qwt_map and classifier(name):
                return QuantLinear(module, act(8), weight(8))
            return QuantLinear(module, act.post_norm(a) if post_norm(name) else act(a), weight(w))
        return None

    return rule


def cnn_rule(config: PTQConfig, *, stem: str, classifier: NameTest) -> LayerRule:
    """Bits of a CNN: stem conv and classifier W8A8, every other conv and Linear at W bits with
    ``conv_act_bits`` (or A) bit inputs. BatchNorm is not folded; activations and adds stay FP."""
    conv_a = config.conv_act_bits or config.a_bits
    act, weight = _Activations(config), config.resolved_baseline().weight_quantizer

    def rule(name: str, module: nn.Module) -> nn.Module | None:
        if isinstance(module, nn.Conv2d):
            first = name == stem
            return QuantConv2d(module, act(8 if first else conv_a), weight(8 if first else config.w_bits))
        if isinstance(module, nn.Linear):
            if classifier(name):
                return QuantLinear(module, act(8), weight(8))
            return QuantLinear(module, act(config.a_bits), weight(config.w_bits))
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
