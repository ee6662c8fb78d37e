"""W8A8 for integer kernels: calibration for the target and the QDQ view of a quantised model.

An integer kernel needs what the library's default quantisers do not guarantee: symmetric 8-bit weights
(per output channel), activations per tensor with an integer zero point inside the UINT8 range, a uniform
post-softmax quantiser, BatchNorm folded into the conv before it, and a quantised conv output where that
output goes to a residual add (onnxruntime only fuses a conv whose output is quantised). :func:`calibrate_w8a8`
builds such a model with the library's percentile search restricted to those grids; :func:`qdq_view`
temporarily swaps every quantiser for ``torch.fake_quantize_*`` calls that export as ONNX QuantizeLinear /
DequantizeLinear pairs.

The symmetric weight codes −128..127 can be stored two ways (:data:`WEIGHT_DTYPES`), which select different
onnxruntime CPU kernels for the same arithmetic. ``int8`` selects the UINT8×INT8 kernels; on x86 CPUs without
VNNI they multiply with ``vpmaddubsw``, which adds each pair of products into a saturating 16-bit integer, and
2·255·127 > 32767: large activation codes times large weight codes come out clipped. With VNNI (AVX-512 VNNI,
AVX-VNNI) or AMX the products are added in 32 bits: exact, and about 1.9× as fast as ``uint8`` (DeiT-S and
ResNet-50 at batch 32 on an AMD Zen 4 CPU, docs/deploy.md). ``uint8``
(codes + 128, zero point 128) selects the UINT8×UINT8 kernels, which widen both operands to 16 bits before
multiplying and so do not saturate on any CPU, at some cost in speed. The default ``auto``
(:func:`resolve_weight_dtype`) picks ``int8`` where this machine has VNNI or AMX and ``uint8`` elsewhere; name
the dtype explicitly when the file is for another machine.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from ..compensation.modules import compensation_precision
from ..environment import cpu_flags
from ..family import Family, family_of, get_family
from ..ptq import PTQConfig, calibrate
from ..ptq import act_quantizer, quantize_modules
from ..quant.modules import QuantConv2d, QuantModule, quant_modules, swap_module
from ..quant.quantizers import Quantizer, RoundingQuantizer, UniformQuantizer

W8A8 = PTQConfig(baseline="percentile", w_bits=8, a_bits=8)
_ACT_RANGE = (0, 255)
WeightDtype = Literal["auto", "uint8", "int8"]
#: Storage of the symmetric 8-bit weight codes: (code range, zero point). Same values, different kernels.
WEIGHT_DTYPES: dict[str, tuple[tuple[int, int], int]] = {"uint8": ((0, 255), 128), "int8": ((-128, 127), 0)}
#: CPU flags whose INT8 dot products add in 32 bits, so that UINT8×INT8 kernels do not saturate.
INT8_EXACT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def resolve_weight_dtype(weight_dtype: str = "auto") -> str:
    """``uint8`` or ``int8``: ``auto`` becomes ``int8`` where this CPU has VNNI or AMX, else ``uint8``."""
    if weight_dtype == "auto":
        return "int8" if set(cpu_flags() or ()) & set(INT8_EXACT_FLAGS) else "uint8"
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weight_dtype {weight_dtype!r}; choose auto, {', '.join(WEIGHT_DTYPES)}")
    return weight_dtype


class OutputQuantized(nn.Module, QuantModule):
    """A layer whose output is quantised too (the conv before a residual add, so it runs as QLinearConv)."""

    def __init__(self, layer: nn.Module, output_quantizer: Quantizer) -> None:
        super().__init__()
        self.layer, self.output_quantizer = layer, output_quantizer

    def activation_quantizers(self) -> list[Quantizer]:
        return [self.output_quantizer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quantizer(self.layer(x))


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm2d into the Conv2d registered just before it (in place); returns the pair count.

    A plain BatchNorm becomes ``Identity``; timm's ``BatchNormAct2d`` keeps its dropout and activation.
    """
    pairs = []
    for parent in model.modules():
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                pairs.append((parent, conv, bn_name, bn))
    for parent, conv, bn_name, bn in pairs:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
        after = [getattr(bn, a) for a in ("drop", "act") if isinstance(getattr(bn, a, None), nn.Module)]
        setattr(parent, bn_name, nn.Sequential(*after) if after else nn.Identity())
    return len(pairs)


def _quantize_residual_outputs(model: nn.Module, family: Family) -> None:
    """Give each CNN block's residual-branch convs (main branch and shortcut) an 8-bit output quantiser."""
    if family.residual_branches is None:
        raise ValueError(f"the {family.name} family does not name its residual branches (Family.residual_branches): "
                         "W8A8 export cannot tell which conv outputs feed a residual add")
    for step in family.plan(model).steps:
        if not step.compensate:
            continue  # a transition (downsampling), not a residual block
        block = model.get_submodule(step.path)
        if not getattr(block, "has_skip", True):
            continue  # no residual add: the next block's input quantiser follows directly
        names = family.residual_branches(model, step.path)
        names += [n for n, m in block.named_modules() if n.startswith("downsample") and isinstance(m, nn.Conv2d)]
        for name in names:
            swap_module(block, name, OutputQuantized(block.get_submodule(name), act_quantizer(8)))


def set_integer_grids(model: nn.Module) -> None:
    """Weights: symmetric per channel; activations: zero on the grid. Resets them so the next pass re-calibrates."""
    for _, module in quant_modules(model):
        for q in module.weight_quantizers():
            q.grid = "symmetric"
            q.reset()
        for q in module.activation_quantizers():
            if not isinstance(q, UniformQuantizer):
                raise ValueError(f"{type(q).__name__} has no integer kernel; W8A8 deployment needs uniform "
                                 "quantisers (the 'percentile' method)")
            q.grid = "zero_included"
            q.reset()


def calibrate_w8a8(fp_model: nn.Module, calib_images: torch.Tensor, *, family: Family | str | None = None) -> nn.Module:
    """A W8A8 copy of ``fp_model`` laid out and calibrated for integer kernels (percentile search).

    The layer rule comes from the model's family (recognised from the model unless given). CNNs (families whose
    compensation form is ``conv``) get BatchNorm folded and quantised residual-branch outputs. The copy is
    returned with quantisation on, ready for :func:`qwt.apply_qwt` and for ``export_onnx(..., mode="w8a8")``.
    """
    model = copy.deepcopy(fp_model).eval()
    fam = family_of(model) if family is None else get_family(family) if isinstance(family, str) else family
    cnn = fam.plan(model).form == "conv"
    if cnn:
        fold_batchnorm(model)
    quantize_modules(model, fam.layer_rule(model, W8A8))
    if cnn:
        _quantize_residual_outputs(model, fam)
    set_integer_grids(model)
    calibrate(model, calib_images)
    return model


class _ActivationQDQ(nn.Module):
    def __init__(self, q: UniformQuantizer) -> None:
        super().__init__()
        self.scale, self.zero_point = float(q.delta), int(q.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, *_ACT_RANGE)


class _WeightQDQ(nn.Module):
    #: Read by ``QuantModule.quantized_weight``: "not calibrated" keeps it from caching the QDQ weight, so the
    #: tracer records the QuantizeLinear/DequantizeLinear pair on every export.
    enabled, calibrated = True, False

    def __init__(self, q: UniformQuantizer, dtype: WeightDtype) -> None:
        super().__init__()
        self.axis = q.channel_axis % q.delta.dim()
        self.code_range, zero_point = WEIGHT_DTYPES[dtype]
        self.register_buffer("scale", q.delta.reshape(-1).float().clone())
        self.register_buffer("zero_point", torch.full((self.scale.numel(),), zero_point, dtype=torch.int32))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_channel_affine(w, self.scale, self.zero_point, self.axis, *self.code_range)


class _SamePadThenQDQ(nn.Module):
    """TF 'same' padding moved before the input QDQ (0 is on the grid, so the result is unchanged): the
    Pad then no longer sits between DequantizeLinear and Conv, where it would block the integer fusion."""

    def __init__(self, conv: QuantConv2d, qdq: _ActivationQDQ) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.qdq = qdq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from timm.layers import pad_same

        return self.qdq(pad_same(x, self.kernel_size, self.stride, self.dilation))


def _check(q: Quantizer, where: str, weight: bool) -> None:
    """Refuse a quantiser that has no exact INT8/UINT8 equivalent, naming the fix."""
    hint = "calibrate the model with qwt.export.calibrate_w8a8, or export it with mode='simulate'"
    if not isinstance(q, UniformQuantizer) or q.n_bits != 8 or not q.calibrated or not q.enabled:
        raise ValueError(f"{where}: {q!r} is not an enabled, calibrated 8-bit uniform quantiser; {hint}")
    z = q.zero_point
    if weight:
        if q.channel_axis is None or not bool((z == 128).all()):
            raise ValueError(f"{where}: weights need a symmetric per-channel grid (zero point 0); {hint}")
        if isinstance(q, RoundingQuantizer) and q.offset.numel():
            raise ValueError(f"{where}: the QDQ view rounds weights to nearest and would drop GPTQ's rounding; "
                             "export this model with mode='simulate'")
    elif q.delta.numel() != 1 or float(z) != round(float(z)) or not 0 <= float(z) <= 255:
        raise ValueError(f"{where}: activations need one scale and an integer zero point in 0..255 "
                         f"(got {q.delta.numel()} scales, z={z.flatten()[:3].tolist()}); {hint}")


@contextmanager
def qdq_view(model: nn.Module, compensation_half: bool = False,
             weight_dtype: WeightDtype = "auto") -> Iterator[nn.Module]:
    """Swap every quantiser for its QDQ equivalent (and set the compensation precision) while inside.

    ``weight_dtype`` only chooses how the weight codes are stored (see the module docstring): the view
    computes the same values with either.
    """
    weight_dtype = resolve_weight_dtype(weight_dtype)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    moved_pads: list[QuantConv2d] = []
    try:
        for name, module in list(quant_modules(model)):
            weights = {id(q) for q in module.weight_quantizers()}
            for attr, q in list(module.named_children()):
                if not isinstance(q, Quantizer):
                    continue
                is_weight = id(q) in weights
                _check(q, f"{name}.{attr}", is_weight)
                qdq = _WeightQDQ(q, weight_dtype) if is_weight else _ActivationQDQ(q)
                if attr == "input_quantizer" and getattr(module, "same_pad", False):
                    qdq, module.same_pad = _SamePadThenQDQ(module, qdq), False
                    moved_pads.append(module)
                setattr(module, attr, qdq)
                swapped.append((module, attr, q))
        with compensation_precision(model, compensation_half):
            yield model
    finally:
        for module, attr, q in swapped:
            setattr(module, attr, q)
        for conv in moved_pads:
            conv.same_pad = True
