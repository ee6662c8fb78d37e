"""Fake quantisers: the asymmetric uniform one, the log-√2 one of RepQ-ViT, and a uniform weight quantiser
whose rounding an algorithm decided (GPTQ).

Both calibrate lazily: the first tensor they see while enabled sets their parameters, which then stay frozen.
Parameters live in buffers (empty until calibrated), so a calibrated model round-trips through a state dict.
Rounding is round-half-to-even (``torch.round``) with a straight-through gradient, so QwT* can train through
frozen quantisers.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import nn

from ..errors import InputError
from ..utils import all_finite
from .percentile import PERCENTILES, row_quantiles

MIN_BITS, MAX_BITS = 2, 8

#: Grid family a uniform quantiser searches over: ``affine`` is the authors' (any offset, possibly outside the
#: code range); ``zero_included`` keeps 0 on the grid so z is a valid unsigned integer zero point (integer
#: kernels); ``symmetric`` fixes z at L/2 so the codes are signed integers with zero point 0 (INT8 weights),
#: with Δ = max|x|/(L/2 − 1) so that ±max|x| are both codes (−L/2 is left for clipped values: the restricted
#: range of INT8 weights); ``symmetric_full`` also fixes z at L/2 but spreads ±max|x| over every code,
#: Δ = 2·max|x|/(L − 1), as published GPTQ's symmetric grid does (at 3 bits Δ = 2·max/7 rather than max/3).
Grid = Literal["affine", "zero_included", "symmetric", "symmetric_full"]
GRIDS: tuple[str, ...] = get_args(Grid)
#: The grids whose zero point is fixed at L/2 (signed codes, zero point 0).
SYMMETRIC_GRIDS = ("symmetric", "symmetric_full")

#: The reference search starts from this score and keeps a candidate only on strict improvement.
_INITIAL_SCORE = 1e10


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even; the gradient passes straight through."""
    if x.requires_grad and torch.is_grad_enabled():
        return _RoundSTE.apply(x)
    return torch.round(x)


def check_bits(n_bits: int) -> int:
    """Refuse bit widths the quantisers are not meant for, with the valid range in the message."""
    if not isinstance(n_bits, int) or isinstance(n_bits, bool) or not MIN_BITS <= n_bits <= MAX_BITS:
        raise ValueError(f"bit width must be an integer in {MIN_BITS}..{MAX_BITS}, got {n_bits!r}")
    return n_bits


def _needs_grad(x: torch.Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def uniform_fake_quant(x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, levels: int) -> torch.Tensor:
    """x̂ = (clamp(round(x/Δ) + z, 0, L−1) − z)·Δ; z is added after rounding (it may be fractional)."""
    if _needs_grad(x):
        q = torch.clamp(round_ste(x / delta) + zero_point, 0, levels - 1)
        return (q - zero_point) * delta
    # Inference: the same ops in the same order on one buffer — bit-identical, about 3x faster on CPU.
    q = x / delta
    return q.round_().add_(zero_point).clamp_(0, levels - 1).sub_(zero_point).mul_(delta)


def nearest_codes(x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, levels: int) -> torch.Tensor:
    """clamp(round(x/Δ) + z, 0, L−1): the round-to-nearest codes of :func:`uniform_fake_quant`, as a new tensor."""
    return (x / delta).round_().add_(zero_point).clamp_(0, levels - 1)


def log_sqrt2_fake_quant(x: torch.Tensor, delta: torch.Tensor, levels: int, floor: float | None) -> torch.Tensor:
    """x̂ = Δ·2^(−q/2) with q = round(−2·log2(x/Δ)); codes ≥ L (and exact zeros) map to 0."""
    if _needs_grad(x):
        ratio = x / delta
        if floor is not None:
            ratio = ratio.clamp_min(floor)
        q_int = round_ste(-2.0 * torch.log2(ratio))
        overflow = q_int >= levels
        q = torch.clamp(q_int, 0, levels - 1)
        odd = (q % 2) * (math.sqrt(2) - 1) + 1
        return (2 ** (-1 * torch.ceil(q / 2)) * odd * delta).masked_fill(overflow, 0)
    # Inference: the same values with in-place ops.
    q = x / delta
    if floor is not None:
        q.clamp_min_(floor)
    q.log2_().mul_(-2.0).round_()
    if torch.jit.is_tracing():  # the ONNX simulation export writes the decoding as elementwise ops
        overflow = q >= levels
        return _decode_log_sqrt2(q.clamp_(0, levels - 1), delta).masked_fill_(overflow, 0)
    # Every element is one of L codes, 0 (code ≥ L) or NaN (a NaN or negative input): decode the L codes once,
    # with the same elementwise ops, and look each element up.
    codes = torch.arange(levels, dtype=q.dtype, device=q.device)
    table = torch.cat([_decode_log_sqrt2(codes, delta), q.new_tensor([0.0, math.nan])])
    index = _small_ints_as_int32(q.clamp_(0, levels).nan_to_num_(levels + 1))
    return table.index_select(0, index.reshape(-1)).reshape(x.shape)


#: 2^23: adding it to an integer 0 ≤ n < 2^23 in FP32 is exact and leaves n in the low mantissa bits, above
#: the bit pattern of 2^23 itself.
_MANTISSA_SHIFT = float(2**23)
_MANTISSA_SHIFT_BITS = int(torch.tensor(_MANTISSA_SHIFT, dtype=torch.float32).view(torch.int32))


def _small_ints_as_int32(q: torch.Tensor) -> torch.Tensor:
    """The integer-valued FP32 tensor ``q`` (values in [0, 2^23)) as int32, in q's own buffer: two in-place
    passes instead of a conversion into a new tensor. FP64 or other dtypes take the plain conversion."""
    if q.dtype != torch.float32:
        return q.to(torch.int32)
    return q.add_(_MANTISSA_SHIFT).view(torch.int32).sub_(_MANTISSA_SHIFT_BITS)


def _decode_log_sqrt2(q: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Δ·2^(−⌈q/2⌉)·(√2 if q is odd else 1), in place on integer codes q ∈ [0, L−1]. For these codes
    q % 2 == 2·(⌈q/2⌉ − q/2) exactly, which costs a quarter of a float remainder on CPU."""
    half = q.div_(2)
    odd = torch.ceil(half).sub_(half).mul_(2).mul_(math.sqrt(2) - 1).add_(1)
    return half.ceil_().mul_(-1).exp2_().mul_(odd).mul_(delta)


def _to_rows(x: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
    """View x as (channels, values-per-channel), or (1, numel) for a per-tensor quantiser."""
    if channel_axis is None:
        return x.reshape(1, -1)
    return x.movedim(channel_axis, 0).reshape(x.shape[channel_axis], -1)


def _param_shape(x: torch.Tensor, channel_axis: int | None) -> tuple[int, ...]:
    if channel_axis is None:
        return ()
    shape = [1] * x.dim()
    shape[channel_axis] = x.shape[channel_axis]
    return tuple(shape)


def _require_finite_calibration(x: torch.Tensor, what: str) -> None:
    if not all_finite(x):
        raise ValueError(
            f"{what}: calibration tensor contains NaN or Inf; check the input images and the FP model "
            "(a NaN upstream poisons every quantiser after it)"
        )


def search_uniform(rows: torch.Tensor, n_bits: int, grid: Grid = "affine") -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile-MSE search of (Δ, z) for every row at once; returns two (rows,) tensors."""
    levels = 2**n_bits
    quantiles = row_quantiles(rows, [1.0 - p for p in PERCENTILES] + list(PERCENTILES))
    k = len(PERCENTILES)
    best_score = torch.full((rows.shape[0],), _INITIAL_SCORE, dtype=rows.dtype, device=rows.device)
    best_delta = torch.zeros_like(best_score)
    best_zero = torch.zeros_like(best_score)
    for i in range(k):
        lo, hi = quantiles[:, i], quantiles[:, k + i]
        if grid in SYMMETRIC_GRIDS:
            hi = torch.maximum(lo.abs(), hi.abs())
            # symmetric: codes −L/2..L/2−1, Δ = max|x| / (L/2 − 1); symmetric_full: Δ = 2·max|x| / (L − 1)
            lo = -hi * (levels // 2) / (levels // 2 - 1) if grid == "symmetric" else -hi
        elif grid == "zero_included":
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        delta = (hi - lo) / (levels - 1)
        # A constant row has hi == lo; the reference divides by zero. Pick the grid that represents it exactly.
        degenerate = delta <= 0
        if degenerate.any():
            delta = torch.where(degenerate, lo.abs().clamp_min(1e-8) / (levels - 1), delta)
        zero = torch.full_like(delta, levels // 2) if grid in SYMMETRIC_GRIDS else torch.round(-lo / delta)
        # (x̂ − x)² equals (x − x̂)² bit for bit; computed on x̂'s buffer to spare two temporaries.
        score = uniform_fake_quant(rows, delta[:, None], zero[:, None], levels).sub_(rows).pow_(2).mean(dim=1)
        better = score < best_score
        best_score = torch.where(better, score, best_score)
        best_delta = torch.where(better, delta, best_delta)
        best_zero = torch.where(better, zero, best_zero)
    return best_delta, best_zero


def search_log_sqrt2(flat: torch.Tensor, n_bits: int, floor: float | None) -> torch.Tensor:
    """Percentile-MSE search of the log-√2 quantiser's single Δ."""
    levels = 2**n_bits
    candidates = row_quantiles(flat.reshape(1, -1), PERCENTILES)[0]
    best_score, best_delta = _INITIAL_SCORE, candidates[0]
    for delta in candidates:
        score = log_sqrt2_fake_quant(flat, delta, levels, floor).sub_(flat).pow_(2).mean()
        if score < best_score:
            best_score, best_delta = score, delta
    return best_delta


class Quantizer(nn.Module):
    """Common state: bit width, on/off switch, lazily filled parameter buffers.

    ``kind`` names the class in saved models; ``settings`` are the attributes (besides ``n_bits``) a saved model
    records and restores, so a quantiser type describes itself to :mod:`qwt.serialization`, which compares each
    with the value the saved PTQ config builds. ``adjustable_settings`` names the settings a step after surgery
    may legitimately change, with the values it may give them (a saved value among these is no disagreement).
    """

    kind: str = ""
    settings: tuple[str, ...] = ()
    adjustable_settings: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def __init__(self, n_bits: int) -> None:
        super().__init__()
        self.n_bits = check_bits(n_bits)
        self.enabled = False
        self.register_buffer("delta", torch.empty(0))

    @property
    def levels(self) -> int:
        return 2**self.n_bits

    @property
    def calibrated(self) -> bool:
        return self.delta.numel() > 0

    def reset(self) -> None:
        """Forget the parameters; the next enabled forward calibrates again."""
        for name, _ in self.named_buffers(recurse=False):
            setattr(self, name, torch.empty(0, device=self.delta.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not x.is_floating_point():  # the float layer would refuse it; rounding would silently accept it
            raise InputError(f"{type(self).__name__} got a {x.dtype} tensor: the model takes floating-point images "
                             "normalised as for the FP model")
        if not self.calibrated:
            with torch.no_grad():
                _require_finite_calibration(x, type(self).__name__)
                self.calibrate(x.detach())
        return self.fake_quant(x)

    def calibrate(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Parameters are shaped by calibration (per-channel, per-tensor, or reparameterised): adopt saved shapes.
        for name, buf in list(self.named_buffers(recurse=False)):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != buf.shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=buf.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


class UniformQuantizer(Quantizer):
    """Asymmetric uniform quantiser, per tensor (``channel_axis=None``) or per channel along one axis."""

    kind = "uniform"
    settings = ("channel_axis", "grid")
    #: RepQ-ViT's reparameterisation makes a channel-wise quantiser per tensor; integer-kernel calibration
    #: (qwt.export.calibrate_w8a8) picks the grid.
    adjustable_settings = {"channel_axis": (None,), "grid": GRIDS}

    def __init__(self, n_bits: int, channel_axis: int | None = None, grid: Grid = "affine") -> None:
        super().__init__(n_bits)
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
        self.channel_axis = channel_axis
        self.grid = grid
        self.register_buffer("zero_point", torch.empty(0))

    def calibrate(self, x: torch.Tensor) -> None:
        delta, zero = search_uniform(_to_rows(x, self.channel_axis), self.n_bits, self.grid)
        shape = _param_shape(x, self.channel_axis)
        self.set_params(delta.reshape(shape), zero.reshape(shape))

    def set_params(self, delta: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.delta = delta.detach().clone()
        self.zero_point = zero_point.detach().clone()

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return uniform_fake_quant(x, self.delta, self.zero_point, self.levels)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        if self.calibrated and self.delta.dim() == 0:  # reparameterised channel-wise quantiser: per tensor now
            self.channel_axis = None

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, channel_axis={self.channel_axis}, grid={self.grid}, enabled={self.enabled}"


class RoundingQuantizer(UniformQuantizer):
    """Uniform weight quantiser with a rounding decided per weight by an algorithm (GPTQ):
    x̂ = (clamp(clamp(round(x/Δ) + z, 0, L−1) + r, 0, L−1) − z)·Δ with an integer offset r per element (int16
    buffer).

    The offsets make the quantiser map the layer's float weight onto the algorithm's codes, so the float weight
    stays the layer's weight (what QwT fits towards with quantisation off) while the quantised weight is the
    algorithm's, bit for bit. Without offsets (before the algorithm ran) it is the plain uniform quantiser.
    ``group_size``: the algorithm gave every static group of that many columns its own grid (Δ and z then have
    the weight's shape); None: one grid per channel.
    """

    kind = "uniform_rounding"
    settings = ("channel_axis", "grid", "group_size")

    def __init__(self, n_bits: int, channel_axis: int | None = 0, grid: Grid = "affine",
                 group_size: int | None = None) -> None:
        super().__init__(n_bits, channel_axis, grid)
        self.group_size = group_size
        self.register_buffer("offset", torch.empty(0, dtype=torch.int16))

    def reset(self) -> None:
        super().reset()
        self.offset = torch.empty(0, dtype=torch.int16, device=self.delta.device)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest codes of ``x`` on this grid, as :meth:`fake_quant` computes them."""
        return nearest_codes(x, self.delta, self.zero_point, self.levels)

    def set_codes(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """Make the quantiser map ``x`` (the float weight) to the integer ``codes`` (0..L−1, a float tensor)."""
        self.offset = (codes - self.codes(x)).to(torch.int16)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset.numel() == 0:
            return super().fake_quant(x)
        offset = self.offset.to(x.dtype)
        # The offsets were set for one float weight; once it moves (QwT* fine-tunes it) round-to-nearest's code
        # plus the offset can leave 0..L−1, so the sum is clamped again. For the weight they were set for the
        # sum is the algorithm's code, already in range: the clamp changes nothing there.
        if _needs_grad(x):
            q = torch.clamp(round_ste(x / self.delta) + self.zero_point, 0, self.levels - 1) + offset
            return (q.clamp(0, self.levels - 1) - self.zero_point) * self.delta
        return self.codes(x).add_(offset).clamp_(0, self.levels - 1).sub_(self.zero_point).mul_(self.delta)


class LogSqrt2Quantizer(Quantizer):
    """Log-√2 quantiser for post-softmax attention.

    ``floor`` clamps x/Δ before log2: the QwT authors' copy uses 1e-6 (tiny values then decode to Δ·2⁻²⁰ at
    A ≥ 6 bits instead of 0); RepQ-ViT has no floor (``None``). Identical at A ≤ 5 bits.
    """

    kind = "log_sqrt2"
    settings = ("floor",)

    def __init__(self, n_bits: int, floor: float | None = 1e-6) -> None:
        super().__init__(n_bits)
        self.floor = floor

    def calibrate(self, x: torch.Tensor) -> None:
        self.delta = search_log_sqrt2(x.reshape(-1), self.n_bits, self.floor).reshape(())

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return log_sqrt2_fake_quant(x, self.delta, self.levels, self.floor)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, floor={self.floor}, enabled={self.enabled}"
