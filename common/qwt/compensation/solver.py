"""Closed-form least squares for the compensation: T ≈ A·Θ with A = [features, 1].

``streaming`` (default) accumulates AᵀA, AᵀT and the sums R² needs batch by batch in FP64, so memory does not grow
with the number of calibration images, then solves by Cholesky (pseudo-inverse with a warning if the Gram matrix
is singular). ``streaming_fp32`` (opt-in) computes each batch's products in FP32 and accumulates them in FP64:
about half the memory traffic, for slightly different sums, which can move an R² near 0 across the gate.
``reference`` keeps every batch and reproduces the authors' arithmetic bit for bit: FP32, one 2-D explicit
inverse per channel group, ``inv(AᵀA + λI) @ Aᵀ @ T`` evaluated left to right, and R² computed in FP32
from the prediction ``X·W + b`` (tokens) or ``conv2d(X, W, b)`` (grouped conv), with the same tensor shapes.

Two feature layouts share the machinery: token features (..., C) for linear compensation, and unfolded conv
patches split into channel groups for grouped-conv compensation (one independent system per group).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from ..utils import all_finite
from .lowrank import reduced_rank, stored_rank

#: ``streaming``: FP64 products and sums, Cholesky; ``streaming_fp32``: the same with each batch's products in
#: FP32 (faster; different results, see docs/algorithm.md); ``reference``: the authors' FP32 arithmetic, bit for bit.
SolverMode = Literal["streaming", "streaming_fp32", "reference"]
SOLVER_MODES: tuple[str, ...] = get_args(SolverMode)


@dataclass
class FitResult:
    """Θ split into the compensation's weight and bias, and the fit's pooled R². A reduced-rank fit
    (:mod:`qwt.compensation.lowrank`) also gives its factors, ``weight`` = ``down`` @ ``up`` (rounded once from
    FP64), and the share of the dense map's energy they keep."""

    weight: torch.Tensor
    bias: torch.Tensor
    r2: float
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    energy_kept: float | None = None


class SingularSystemError(RuntimeError):
    pass


#: An in-sample R² this close to 1 is an interpolation, not a compensation (real blocks fit R² ≈ 0.1–0.6).
_INTERPOLATION_R2 = 1 - 1e-4


_INPUTS, _TARGETS = "inputs (block input features)", "targets (FP block output − quantised block output)"


def _require_finite_features(t: torch.Tensor, what: str) -> None:
    if not all_finite(t):
        raise ValueError(
            f"non-finite values (NaN/Inf) in the compensation {what}; the quantised block diverged or the inputs "
            "are corrupt. Check the calibration images and the PTQ calibration (e.g. with fewer bits disabled)."
        )


class _LeastSquares:
    """Per-group normal equations with R² statistics. Subclasses turn (x, t) into (A, T) of shape (G, rows, ·)."""

    def __init__(self, groups: int, ridge: float, mode: SolverMode, relative_ridge: float = 0.0) -> None:
        if mode not in SOLVER_MODES:
            raise ValueError(f"unknown solver mode {mode!r}; choose one of {', '.join(SOLVER_MODES)}")
        if relative_ridge and mode == "reference":
            raise ValueError("relative_ridge needs a streaming solver (the reference solver has the authors' "
                             "absolute ridge only)")
        self.groups, self.ridge, self.mode, self.relative_ridge = groups, ridge, mode, relative_ridge
        self.gram: torch.Tensor | None = None  # (G, d, d)
        self.cross: torch.Tensor | None = None  # (G, d, o)
        self.t_sq = torch.zeros((), dtype=torch.float64)
        self.t_sum: torch.Tensor | None = None  # sums over the R² mean axis
        self.t_count = 0
        self.rows = 0  # rows of each group's system
        self.shape: tuple[int, int] | None = None  # (unknowns, outputs) of each group's system
        self.chunks: list[tuple[torch.Tensor, torch.Tensor]] = []

    # -- subclass hooks --------------------------------------------------------------------------------------
    def _design(self, x: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, T) in ``dtype``, each written in one pass (the conversion is exact: FP32 values fit FP64)."""
        raise NotImplementedError

    def _mean_axis_sum(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Sum of t over the axis R²'s mean is taken over, and how many values each sum has."""
        raise NotImplementedError

    def _split(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _join(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`_split`: (G, unknowns, outputs)."""
        raise NotImplementedError

    def _system(self, x: torch.Tensor, t: torch.Tensor) -> tuple[int, int, int]:
        """(rows, unknowns, outputs) that one batch adds to each group's system."""
        raise NotImplementedError

    def _solve_reference(self, x: torch.Tensor, t: torch.Tensor, name: str) -> FitResult:
        """The authors' solve on all features ``x`` and targets ``t`` (concatenated batches)."""
        raise NotImplementedError

    # -- accumulation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, x: torch.Tensor, t: torch.Tensor) -> None:
        """Add one batch; a batch that is refused (non-finite values) leaves the system unchanged."""
        rows, unknowns, outputs = self._system(x, t)
        if self.mode == "reference":
            _require_finite_features(x, _INPUTS)
            _require_finite_features(t, _TARGETS)
            self.chunks.append((x.float(), t.float()))
        else:
            self._accumulate(*self._batch_statistics(x, t))
        self.rows += rows
        self.shape = (unknowns, outputs)

    def _accumulate(self, gram: torch.Tensor, cross: torch.Tensor, t_sum: torch.Tensor, count: int,
                    t_sq: torch.Tensor) -> None:
        # The finiteness checks read the sums instead of the features: AᵀA's diagonal holds Σx² and t_sq holds
        # Σt², which no finite FP32 value can overflow in FP64, so each is finite exactly when its input is (with
        # FP32 products, values beyond 1.8e19 overflow and are refused too).
        _require_finite_features(gram, _INPUTS)
        _require_finite_features(t_sq, _TARGETS)
        self.t_sum = t_sum if self.t_sum is None else self.t_sum + t_sum
        self.t_count += count
        self.t_sq = self.t_sq.to(t_sq.device) + t_sq
        if self.gram is None:
            self.gram, self.cross = gram, cross
        else:  # in place: the same sums as gram + Δgram, without a new (G, d, d) tensor per batch
            self.gram.add_(gram)
            self.cross.add_(cross)

    def _batch_statistics(self, x: torch.Tensor, t: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """One batch's AᵀA, AᵀT, target sums over R²'s mean axis, their count, and ΣT², all in FP64."""
        if self.mode == "streaming_fp32":  # FP32 products: half the memory traffic, single-precision GEMMs
            a, target = self._design(x, t, torch.float32)
            at = a.transpose(1, 2)
            t_sum, count = self._mean_axis_sum(t)
            return ((at @ a).double(), (at @ target).double(), t_sum.double(), count,
                    t.square().sum(dtype=torch.float64))
        t64 = t.to(torch.float64, copy=True)  # a copy: squared in place below
        t_sum, count = self._mean_axis_sum(t64)
        a, target = self._design(x, t64, torch.float64)
        at = a.transpose(1, 2)
        gram, cross = at @ a, at @ target
        return gram, cross, t_sum, count, t64.pow_(2).sum()  # squared last: the linear target is a view of t64

    def reduce(self) -> None:
        """Sum the statistics over processes (torch.distributed), so every rank solves the union's system."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        if self.mode == "reference":
            raise RuntimeError("the reference solver gathers features; use the streaming solver with torch.distributed")
        count = torch.tensor(float(self.t_count), dtype=torch.float64, device=self.gram.device)
        for tensor in (self.gram, self.cross, self.t_sq, self.t_sum, count):
            dist.all_reduce(tensor)
        self.t_count = int(count.item())

    # -- solving ---------------------------------------------------------------------------------------------
    def underdetermined(self) -> str | None:
        """Fewer rows than unknowns: any fit is exact on the rows it saw (R² ≈ 1 in-sample), a pure overfit."""
        if self.shape is None:
            raise ValueError("no data: call update() with at least one batch before solve()")
        if self.rows < self.shape[0]:
            return f"{self.rows} rows for {self.shape[0]} unknowns per group (use more compensation images)"
        return None

    @torch.no_grad()
    def interpolates(self, r2: float) -> str | None:
        """A rank-deficient system fitted (almost) exactly: the rows span fewer directions than there are
        unknowns and the fit reproduces them, as with duplicated or constant images. (A rank deficiency alone is
        harmless: a LayerNorm's outputs are always collinear with the bias column.)"""
        if r2 < _INTERPOLATION_R2:
            return None
        gram = self._reference_gram() if self.mode == "reference" else self.gram
        rank = int(torch.linalg.matrix_rank(gram, hermitian=True).min())
        if rank < self.shape[0]:
            return (f"rank-deficient features (rank {rank} of {self.shape[0]}) fitted exactly (R² = {r2:.6f}): "
                    "duplicated rows, e.g. constant images")
        return None

    def _reference_gram(self) -> torch.Tensor:
        gram = None
        for x, t in self.chunks:
            a = self._design(x, t, torch.float64)[0]
            g = a.transpose(1, 2) @ a
            gram = g if gram is None else gram + g
        return gram

    def zero_result(self) -> FitResult:
        """A zero compensation of this system's shape (a block left unchanged)."""
        unknowns, outputs = self.shape
        weight, bias = self._split(torch.zeros(self.groups, unknowns, outputs))
        return FitResult(weight=weight, bias=bias, r2=math.nan)

    def _ss_tot(self) -> float:
        return float(self.t_sq - self.t_sum.pow(2).sum() / self.t_count)

    @torch.no_grad()
    def solve(self, name: str = "compensation") -> FitResult:
        """Solve the accumulated system; ``name`` (e.g. the block path) labels warnings and errors."""
        if self.mode == "reference":
            if not self.chunks:
                raise ValueError("no data: call update() with at least one batch before solve()")
            x = torch.cat([c[0] for c in self.chunks])
            t = torch.cat([c[1] for c in self.chunks])
            return self._solve_reference(x, t, name)
        if self.t_sum is None:
            raise ValueError("no data: call update() with at least one batch before solve()")
        theta, lhs = self._solve_streaming(name)
        theta, extra = self._reduce(theta, lhs)
        ss_res = self._residual(theta)
        ss_tot = self._ss_tot()
        r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else -math.inf
        weight, bias = self._split(theta.float())
        return FitResult(weight=weight, bias=bias, r2=r2, **extra)

    def _reduce(self, theta: torch.Tensor, lhs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The map actually fitted from the dense solution Θ* (FP64) and G + λI, and FitResult's extra fields:
        Θ* itself here; the reduced-rank map in :class:`LinearLeastSquares` with a rank."""
        return theta, {}

    def _solve_streaming(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Θ* and G + λI, both FP64."""
        gram, cross = self.gram, self.cross
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        lhs = gram + self.ridge_used() * eye
        chol, info = torch.linalg.cholesky_ex(lhs)
        if int(info.max()) == 0:
            theta = torch.cholesky_solve(cross, chol)
        else:
            warnings.warn(
                f"{name}: least-squares system is singular or not positive definite (constant or duplicated "
                "feature channels?); falling back to the minimum-norm pseudo-inverse solution", RuntimeWarning)
            theta = torch.linalg.pinv(lhs, hermitian=True) @ cross
        _require_finite_features(theta, "solution")
        return theta, lhs

    def ridge_used(self) -> float | torch.Tensor:
        """λ added to each group's diagonal: the absolute ridge, plus ``relative_ridge`` × the mean of the
        feature columns' Σx² (the Gram diagonal without the ones column), per group ((G, 1, 1))."""
        if not self.relative_ridge:
            return self.ridge
        diagonal = self.gram.diagonal(dim1=-2, dim2=-1)[:, :-1]
        return self.ridge + self.relative_ridge * diagonal.mean(-1).reshape(-1, 1, 1)

    def _residual(self, theta: torch.Tensor) -> float:
        """Σ‖T − AΘ‖² = ΣT² − 2·⟨Θ, AᵀT⟩ + ⟨Θ, AᵀA·Θ⟩ over the accumulated rows, all in FP64."""
        ss_res = self.t_sq - 2 * (theta * self.cross).sum() + (theta * (self.gram @ theta)).sum()
        return float(ss_res.clamp_min(0))

    @torch.no_grad()
    def error(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> float:
        """Squared error Σ‖T − c(x)‖² of the compensation (weight, bias) on the rows accumulated here (streaming
        statistics), or ΣT², the error without compensation, when none is given. The held-out guard scores a
        fit on rows it was not fitted on this way, without another pass over them."""
        if self.mode == "reference" or self.t_sum is None:
            raise ValueError("error() needs streaming statistics of at least one batch")
        if weight is None:
            return float(self.t_sq)
        theta = self._join(weight.to(self.gram), bias.to(self.gram))
        return self._residual(theta)



def _reference_theta(a: torch.Tensor, t: torch.Tensor, ridge: float, name: str) -> torch.Tensor:
    """Θ = inv(AᵀA [+ λI]) @ Aᵀ @ T on 2-D FP32 tensors, left to right, as the authors compute it."""
    at = a.T
    gram = at @ a
    if ridge:
        gram = gram + ridge * torch.eye(gram.shape[0], device=gram.device)
    message = (f"{name}: explicit inverse of the Gram matrix failed (singular system); "
               "use solver='streaming', which falls back to a pseudo-inverse")
    try:
        theta = torch.inverse(gram) @ at @ t
    except torch.linalg.LinAlgError as err:
        raise SingularSystemError(message) from err
    if not torch.isfinite(theta).all():
        raise SingularSystemError(message)
    return theta


def _reference_r2(t: torch.Tensor, prediction: torch.Tensor) -> float:
    """1 − Σ(T − P)² / Σ(T − mean₀(T))² in FP32, the mean over dim 0 of ``t`` as shaped by the caller."""
    ss_tot = torch.sum((t - t.mean(dim=0)).pow(2))
    ss_res = torch.sum((t - prediction).pow(2))
    return float(1 - ss_res / ss_tot)


class LinearLeastSquares(_LeastSquares):
    """Token-wise fit: x (..., C_in), t (..., C_out); pooled R² with the mean over all rows (docs/algorithm.md#r2).

    ``rank``: fit the best map of at most that rank instead of the dense one (:mod:`qwt.compensation.lowrank`,
    from the same statistics; streaming solvers only); R² is then the rank-r map's.
    """

    def __init__(self, ridge: float = 0.0, mode: SolverMode = "streaming", relative_ridge: float = 0.0,
                 rank: int | None = None) -> None:
        if rank is not None and mode == "reference":
            raise ValueError("a reduced-rank compensation needs a streaming solver (the reference solver reproduces "
                             "the authors' dense arithmetic only)")
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be ≥ 1 (or None: the dense map), got {rank}")
        super().__init__(1, ridge, mode, relative_ridge)
        self.rank = rank

    def _reduce(self, theta: torch.Tensor, lhs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.rank is None:
            return theta, {}
        reduced = reduced_rank(theta[0], lhs[0], self.rank)
        return reduced.theta[None], {"down": reduced.down[:-1].float(), "up": reduced.up.float(),
                                     "energy_kept": reduced.energy_kept}

    def zero_result(self) -> FitResult:
        result = super().zero_result()
        if self.rank is None:
            return result
        unknowns, outputs = self.shape
        r = stored_rank(self.rank, unknowns, outputs)
        return replace(result, down=torch.zeros(unknowns - 1, r), up=torch.zeros(r, outputs))

    def _design(self, x: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.reshape(-1, x.shape[-1])
        a = x.new_empty((1, x.shape[0], x.shape[1] + 1), dtype=dtype)
        a[0, :, :-1].copy_(x)
        a[0, :, -1] = 1
        return a, t.reshape(1, -1, t.shape[-1]).to(dtype)

    def _mean_axis_sum(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        rows = t.reshape(-1, t.shape[-1])
        return rows.sum(0), rows.shape[0]

    def _split(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return theta[0, :-1].contiguous(), theta[0, -1].contiguous()

    def _join(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.cat([weight, bias[None]])[None]

    def _system(self, x: torch.Tensor, t: torch.Tensor) -> tuple[int, int, int]:
        return x.numel() // x.shape[-1], x.shape[-1] + 1, t.shape[-1]

    def _solve_reference(self, x: torch.Tensor, t: torch.Tensor, name: str) -> FitResult:
        x = x.reshape(-1, x.shape[-1])
        t = t.reshape(-1, t.shape[-1])
        a = torch.cat([x, torch.ones(x.shape[0], device=x.device).reshape(-1, 1)], dim=-1)
        theta = _reference_theta(a, t, self.ridge, name)
        weight, bias = theta[:-1, :], theta[-1, :]
        return FitResult(weight=weight, bias=bias, r2=_reference_r2(t, x @ weight + bias))


class GroupedConvLeastSquares(_LeastSquares):
    """Grouped-conv fit on unfolded k×k patches, one system per channel group (docs/algorithm.md#grouped-conv).

    x (B, C_in, H, W), t (B, C_out, H', W'); weight comes back as (C_out, C_in/G, k, k). R² takes its mean over
    the batch axis only (per channel and pixel), as the authors' ResNet code does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int,
                 ridge: float = 1e-3, mode: SolverMode = "streaming", relative_ridge: float = 0.0) -> None:
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide both channel counts ({in_channels}, {out_channels})")
        super().__init__(groups, ridge, mode, relative_ridge)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """``F.unfold(x, k, padding=k // 2, stride)`` as (B, C_in·k², L); for k = 1 that is a strided view of x."""
        k, s = self.kernel_size, self.stride
        if k == 1:
            return x[:, :, ::s, ::s].reshape(x.shape[0], x.shape[1], -1)
        return F.unfold(x, k, padding=k // 2, stride=s)

    def _design(self, x: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.groups
        patches = self._patches(x)
        b, columns, length = patches.shape
        if t.shape[-2] * t.shape[-1] != length:
            raise ValueError(f"target spatial size {tuple(t.shape[-2:])} does not match stride {self.stride}")
        # Group-major rows (group, image, position): (G, B·L, C_in·k²/G + 1) with a ones column.
        a = x.new_empty((g, b * length, columns // g + 1), dtype=dtype)
        a[:, :, :-1].view(g, b, length, -1).copy_(patches.reshape(b, g, -1, length).permute(1, 0, 3, 2))
        a[:, :, -1] = 1
        target = t.new_empty((g, b * length, t.shape[1] // g), dtype=dtype)
        target.view(g, b, length, -1).copy_(t.reshape(b, g, -1, length).permute(1, 0, 3, 2))
        return a, target

    def _mean_axis_sum(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        return t.sum(0), t.shape[0]

    def _split(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, k = self.groups, self.kernel_size
        weight = theta[:, :-1, :].transpose(1, 2)  # (G, C_out/G, C_in/G·k²)
        weight = weight.reshape(self.out_channels, self.in_channels // g, k, k).contiguous()
        return weight, theta[:, -1, :].reshape(-1).contiguous()

    def _join(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        g = self.groups
        w = weight.reshape(g, self.out_channels // g, -1).transpose(1, 2)
        return torch.cat([w, bias.reshape(g, 1, -1)], dim=1)

    def _system(self, x: torch.Tensor, t: torch.Tensor) -> tuple[int, int, int]:
        k = self.kernel_size
        return t.shape[0] * t.shape[-2] * t.shape[-1], self.in_channels // self.groups * k * k + 1, \
            self.out_channels // self.groups

    def _solve_reference(self, x: torch.Tensor, t: torch.Tensor, name: str) -> FitResult:
        g, k = self.groups, self.kernel_size
        in_per, out_per = self.in_channels // g, self.out_channels // g
        weights, biases = [], []
        for i in range(g):  # one 2-D system per group: a batched inverse is not bit-identical
            patches = self._patches(x[:, i * in_per:(i + 1) * in_per])
            rows = patches.permute(0, 2, 1).reshape(-1, in_per * k * k)
            target = t[:, i * out_per:(i + 1) * out_per].reshape(t.shape[0], out_per, -1)
            target = target.permute(0, 2, 1).reshape(-1, out_per)
            a = torch.cat([rows, torch.ones(rows.shape[0], 1, device=rows.device)], dim=1)
            theta = _reference_theta(a, target, self.ridge, f"{name} (group {i})")
            weights.append(theta[:-1, :].T)
            biases.append(theta[-1, :])
        weight = torch.cat(weights, dim=0).reshape(self.out_channels, in_per, k, k)
        bias = torch.cat(biases, dim=0)
        prediction = F.conv2d(x, weight, bias, stride=self.stride, padding=k // 2, groups=g)
        return FitResult(weight=weight, bias=bias, r2=_reference_r2(t, prediction))
