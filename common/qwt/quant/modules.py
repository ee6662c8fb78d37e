"""Quantised drop-in modules: Linear, Conv2d and the attention matmul.

``QuantLinear`` / ``QuantConv2d`` subclass their float layer and share its parameters, so state-dict keys,
``isinstance`` checks and name-based rules keep working after conversion. Each has an ``input_quantizer`` and a
``weight_quantizer``; ``set_quant_state`` switches them on and off.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import Quantizer


def _fingerprint(tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[int, int, int], ...]:
    """Identity, storage and in-place version of each tensor: changes whenever one is replaced or edited."""
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors)


class QuantModule:
    """Mixin: a module whose quantisers are toggled as one weight group and one activation group.

    The fake-quantised weight is computed once and reused while neither the weight nor its quantiser's
    parameters change (replaced, re-calibrated, edited in place, loaded): every quantised forward otherwise
    repeats the same elementwise passes over the whole weight. In-place edits through ``.data`` escape
    version tracking; call :meth:`clear_weight_cache` after them.
    """

    _weight_cache: tuple[tuple, tuple[torch.Tensor, ...], torch.Tensor] | None = None

    def quantized_weight(self) -> torch.Tensor:
        """``weight_quantizer(weight)``, from the cache unless gradients must flow to the weight."""
        weight, quantizer = self.weight, self.weight_quantizer
        if not (quantizer.enabled and quantizer.calibrated) or (weight.requires_grad and torch.is_grad_enabled()):
            return quantizer(weight)
        sources = (weight, *quantizer.buffers(recurse=False))
        key = (quantizer.n_bits, torch.is_inference_mode_enabled(), _fingerprint(sources))
        if self._weight_cache is None or self._weight_cache[0] != key:
            with torch.no_grad():
                # The sources are kept alive with the key so their ids cannot be reused by new tensors.
                self._weight_cache = (key, sources, quantizer(weight))
        return self._weight_cache[2]

    def clear_weight_cache(self) -> None:
        self._weight_cache = None

    def activation_quantizers(self) -> list[Quantizer]:
        return [q for q in (self.input_quantizer,) if isinstance(q, Quantizer)]

    def weight_quantizers(self) -> list[Quantizer]:
        return [self.weight_quantizer] if hasattr(self, "weight_quantizer") else []

    def set_quant_state(self, weight: bool, act: bool) -> None:
        for q in self.weight_quantizers():
            q.enabled = weight
        for q in self.activation_quantizers():
            q.enabled = act


def _or_float(quantizer: Quantizer | None) -> nn.Module:
    """A quantiser, or an identity where the activation stays in float (weights-only settings)."""
    return nn.Identity() if quantizer is None else quantizer


class QuantLinear(nn.Linear, QuantModule):
    def __init__(self, linear: nn.Linear, input_quantizer: Quantizer | None, weight_quantizer: Quantizer) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.input_quantizer, self.weight_quantizer = _or_float(input_quantizer), weight_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QuantConv2d(nn.Conv2d, QuantModule):
    """Quantised conv; keeps timm's TF-style dynamic 'same' padding (``Conv2dSame``) when the source had it."""

    def __init__(self, conv: nn.Conv2d, input_quantizer: Quantizer | None, weight_quantizer: Quantizer) -> None:
        nn.Module.__init__(self)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "transposed", "output_padding", "groups", "padding_mode"):
            setattr(self, attr, getattr(conv, attr))
        self.weight, self.bias = conv.weight, conv.bias
        self.same_pad = type(conv).__name__ == "Conv2dSame"
        self.input_quantizer, self.weight_quantizer = _or_float(input_quantizer), weight_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(x)
        if self.same_pad:
            from timm.layers import pad_same

            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantMatMul(nn.Module, QuantModule):
    """a @ b with both operands fake-quantised (the attention matmuls of RepQ-ViT)."""

    def __init__(self, a_quantizer: Quantizer | None, b_quantizer: Quantizer | None) -> None:
        super().__init__()
        self.a_quantizer, self.b_quantizer = _or_float(a_quantizer), _or_float(b_quantizer)

    def activation_quantizers(self) -> list[Quantizer]:
        return [q for q in (self.a_quantizer, self.b_quantizer) if isinstance(q, Quantizer)]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a_quantizer(a) @ self.b_quantizer(b)


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the sub-module at dotted path ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quant_modules(model: nn.Module) -> Iterator[tuple[str, QuantModule]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):
            yield name, module


def set_quant_state(model: nn.Module, weight: bool, act: bool) -> None:
    """Switch weight and activation quantisation of every quantised module under ``model``."""
    for _, module in quant_modules(model):
        module.set_quant_state(weight, act)


def _quantizer_states(model: nn.Module) -> list[tuple[Quantizer, bool]]:
    return [(m, m.enabled) for m in model.modules() if isinstance(m, Quantizer)]


@contextmanager
def quant_state(model: nn.Module, weight: bool, act: bool) -> Iterator[None]:
    """Temporarily set the quantisation state (e.g. FP evaluation of a block); restores it on exit."""
    saved = _quantizer_states(model)
    set_quant_state(model, weight, act)
    try:
        yield
    finally:
        for q, enabled in saved:
            q.enabled = enabled
