"""QwT's block-wise procedure: fit and attach one compensation per block, in order (docs/algorithm.md#qwt).

For block i with input X_i on the already-compensated quantised path, the target is FP-block(X_i) −
quantised-block(X_i) (the authors'); the fit is closed form; R² ≤ threshold or i < start_block leaves a zero
compensation. With ``QwTConfig.propagation`` α > 0 the FP model's own hidden states X_i^fp are carried beside the
quantised ones (a second feature store), and the target becomes α·FP-block(X_i^fp) + (1 − α)·FP-block(X_i) −
quantised-block(X_i): block i then also corrects the error that reached its input, which the authors' target
never sees (docs/llm_compensation.md). On sequence features (a language model's windows) each block reports the
share of its target energy held by attention-sink rows, and ``exclude_sinks`` leaves those rows out of the fit.
X_{i+1} is the compensated quantised output, computed as the authors do: with the FP32 compensation in their
summation order (the FP16 product is for evaluation only). Each block runs twice per batch (FP and quantised):
the quantised output is kept and the compensation added once solved, instead of a third forward.

One loop walks the plan for both compensation forms; a form is the per-block fit it plugs in (:data:`BlockFit`):
the authors' dense form here (and its reduced-rank variant, ``QwTConfig.rank``: :mod:`qwt.compensation.lowrank`),
the channel-wise form in :mod:`qwt.compensation.channelwise`.
"""
from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..inputs import InputCheck, check_images
from ..quant.modules import quant_state, set_quant_state, swap_module
from ..typed_fields import check_fields
from .channelwise import ChannelAffine, channelwise_block_fit
from .features import DISK, FeatureStore, FeatureStores
from .guard import HeldOutGuard, compensation_batches, heldout_batches
from .modules import Compensated, ConvCompensated, LinearCompensated, LowRankCompensated
from .sinks import DEFAULT_NORM_MULTIPLE, SinkEnergy, sink_mask
from .targets import fit_rows, propagated_target
from .solver import (SOLVER_MODES, FitResult, GroupedConvLeastSquares, LinearLeastSquares, SingularSystemError,
                     SolverMode)

Form = Literal["linear", "conv"]


@dataclass(frozen=True)
class Step:
    """A module on the path from stem to head: a block to compensate, or a transition (e.g. patch merging).

    ``call`` runs the module on a feature tensor when it needs more than ``module(x)`` (e.g. mmdet's Swin blocks
    take the spatial shape too); it receives the compensated wrapper once the block is compensated.
    """

    path: str
    compensate: bool = True
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None

    def run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x) if self.call is None else self.call(module, x)


def stage_steps(stages: Iterable[nn.Module], prefix: str) -> list[Step]:
    """Steps of a staged network (Swin, ConvNeXt): each stage's downsampling layer, when it has one, runs
    quantised but uncompensated; then every block of the stage is compensated."""
    steps: list[Step] = []
    for s, stage in enumerate(stages):
        if not isinstance(stage.downsample, nn.Identity):
            steps.append(Step(f"{prefix}.{s}.downsample", compensate=False))
        steps.extend(Step(f"{prefix}.{s}.blocks.{j}") for j in range(len(stage.blocks)))
    return steps


@dataclass
class BlockPlan:
    """How QwT walks a model: ``stem`` maps images to the first block's input, then ``steps`` in order."""

    stem: Callable[[torch.Tensor], torch.Tensor]
    steps: list[Step]
    form: Form
    #: refuses inputs the stem does not take (images by default; token ids for language models)
    check_inputs: InputCheck = check_images
    #: features are windows of tokens (batch, tokens, channels) that may hold attention sinks (qwt.compensation.sinks)
    sequence: bool = False


@dataclass(frozen=True)
class QwTConfig:
    """QwT settings. Defaults are the authors' (R² > 0 gate, FP16 product at eval, k=1, 64 channels per group),
    except ``solver``: ``streaming`` (FP64, Cholesky); ``reference`` reproduces the authors' FP32 arithmetic;
    ``streaming_fp32`` is ``streaming`` with each batch's products in FP32 (faster; results differ).

    channels_per_group: input channels per group of the grouped-conv compensation (the authors' ``--factor``).
    fp16_eval: the compensation product runs in FP16 at evaluation (the authors' classification code); FP32 if
        False (their detection code).
    """

    start_block: int = 0
    r2_threshold: float = 0.0
    solver: SolverMode = "streaming"
    fp16_eval: bool = True
    ridge: float | None = None  # None: 0 for linear, 1e-3 for grouped conv (the authors' choices)
    kernel_size: int = 1
    channels_per_group: int = 64
    skip_degenerate: bool = True  # False: fit degenerate systems anyway, as the authors' code would
    #: where block features wait between blocks: None (the model's device), a device (e.g. "cpu" on a GPU run),
    #: or "disk" (temporary files: resident memory flat in the number of images; see qwt.compensation.features)
    feature_device: str | None = None
    #: ``dense``: the authors' W x + b beside each block; ``channelwise``: a per-channel gain and bias on each
    #: residual branch's last layer, folded into its weights at export (qwt.compensation.channelwise).
    compensation: Literal["dense", "channelwise"] = "dense"
    #: ``dense`` only, token (linear) blocks, streaming solvers: the best map of at most this rank from the dense
    #: fit's statistics, stored as two thin factors (qwt.compensation.lowrank); None: the full dense map
    rank: int | None = None
    #: held-out guard (not in the paper): this fraction of the compensation batches is held out of each block's
    #: fit, and the compensation is kept only if it lowers the block's error on them; 0 turns it off (default).
    guard_fraction: float = 0.0
    #: α of the error-propagating target α·FP-block(x_fp) + (1 − α)·FP-block(x_q) − block_q(x_q), x_fp the FP
    #: model's own input to the block; 0 is the authors' target (no FP stream is kept)
    propagation: float = 0.0
    #: added to the ridge: this fraction of the mean diagonal of XᵀX (scale-free; streaming solvers only)
    relative_ridge: float = 0.0
    #: sequence features only: leave attention-sink rows (position 0, and inputs whose norm exceeds
    #: ``sink_norm_multiple`` × the window's median) out of the fit and the held-out guard's error
    exclude_sinks: bool = False
    sink_norm_multiple: float = DEFAULT_NORM_MULTIPLE

    def __post_init__(self) -> None:
        # Settings that would make QwT silently do nothing or something undefined are refused here; a start
        # block past the model's last block is checked where the plan is known (check_qwt_config, in fit_compensation).
        # Types first: a string "no" would be taken as true, a NaN threshold would never apply any block.
        check_fields(self, "QwTConfig")
        if self.ridge is not None and not (math.isfinite(self.ridge) and self.ridge >= 0):
            raise ValueError(f"ridge must be ≥ 0 (or None for the authors' default), got {self.ridge}")
        if self.solver not in SOLVER_MODES:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVER_MODES)}")
        if not (math.isfinite(self.guard_fraction) and 0 <= self.guard_fraction < 1):
            raise ValueError(f"guard_fraction must be in [0, 1) (0: no held-out guard), got {self.guard_fraction}")
        if not (math.isfinite(self.propagation) and 0 <= self.propagation <= 1):
            raise ValueError(f"propagation (α of the error-propagating target) must be in [0, 1], got {self.propagation}")
        if not (math.isfinite(self.relative_ridge) and self.relative_ridge >= 0):
            raise ValueError(f"relative_ridge must be ≥ 0, got {self.relative_ridge}")
        if self.relative_ridge and self.solver == "reference":
            raise ValueError("relative_ridge needs a streaming solver: the reference solver reproduces the authors' "
                             "absolute ridge only")
        if not (math.isfinite(self.sink_norm_multiple) and self.sink_norm_multiple > 1):
            raise ValueError(f"sink_norm_multiple must be > 1 (a multiple of the window's median norm), "
                             f"got {self.sink_norm_multiple}")
        if self.start_block < 0:
            raise ValueError(f"start_block must be ≥ 0, got {self.start_block}")
        if self.compensation not in ("dense", "channelwise"):
            raise ValueError(f"unknown compensation {self.compensation!r}; choose 'dense' or 'channelwise'")
        self._check_rank()
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and ≥ 1, got {self.kernel_size}")
        if self.channels_per_group < 1:
            raise ValueError(f"channels_per_group must be ≥ 1, got {self.channels_per_group}")
        if self.feature_device not in (None, DISK):
            try:
                torch.device(self.feature_device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"feature_device must be a torch device (e.g. 'cpu', 'cuda:0'), {DISK!r} or None, "
                                 f"got {self.feature_device!r}") from err

    def _check_rank(self) -> None:
        if self.rank is None:
            return
        if self.rank < 1:
            raise ValueError(f"rank must be ≥ 1 (or None: the full dense map), got {self.rank}")
        if self.compensation != "dense":
            raise ValueError(f"rank {self.rank} reduces the dense map; compensation={self.compensation!r} has none "
                             "(use compensation='dense' or rank=None)")
        if self.solver == "reference":
            raise ValueError(f"rank {self.rank} needs a streaming solver: the reference solver reproduces the "
                             "authors' dense arithmetic only")

    @property
    def form_name(self) -> str:
        """What a run's rows and records call this form: ``dense``, ``channelwise`` or ``rank<r>``."""
        return self.compensation if self.rank is None else f"rank{self.rank}"

    def ridge_for(self, form: Form) -> float:
        if self.ridge is not None:
            return self.ridge
        return 0.0 if form == "linear" else 1e-3


_RANK_FORM = re.compile(r"rank([0-9]+)")


def parse_form(name: str) -> dict:
    """The QwTConfig fields of a form named as :attr:`QwTConfig.form_name` names it: ``dense``, ``channelwise``,
    ``rank<r>`` (r ≥ 1)."""
    if name in ("dense", "channelwise"):
        return {"compensation": name, "rank": None}
    match = _RANK_FORM.fullmatch(name)
    if match is None or int(match[1]) < 1:
        raise ValueError(f"unknown QwT form {name!r}; choose dense, channelwise or rank<R> (R ≥ 1, e.g. rank64)")
    return {"compensation": "dense", "rank": int(match[1])}


def check_qwt_config(config: QwTConfig, blocks: int | None = None, batches: int | None = None) -> None:
    """Refuse a ``start_block`` at or past the last of ``blocks`` compensated blocks (QwT would change nothing),
    and a held-out guard that ``batches`` compensation batches cannot serve; callers check before any compute.
    (QwTConfig refuses its other bad settings itself.)"""
    if blocks is not None and config.start_block >= blocks:
        raise ValueError(f"start_block {config.start_block} is past the last block: the model has {blocks} "
                         f"compensated blocks (0..{blocks - 1}), so QwT would change nothing")
    if batches is not None:
        heldout_batches(batches, config.guard_fraction)


def compensated_blocks(plan: BlockPlan) -> int:
    """How many blocks of ``plan`` get a compensation (transitions such as patch merging do not)."""
    return sum(step.compensate for step in plan.steps)


@dataclass
class BlockReport:
    index: int
    path: str
    r2: float
    applied: bool
    seconds: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["r2"] = None if math.isinf(self.r2) or math.isnan(self.r2) else self.r2
        return d


class BlockReports(list):
    """What :func:`fit_compensation` returns: one :class:`BlockReport` per compensated block, in order (a list),
    and ``heldout``, the indices of the compensation batches (in the order given) that the held-out guard kept
    out of every block's fit; empty with the guard off. A caller scoring a model on those batches takes them from
    here (or, for a tensor, from :func:`qwt.compensation.heldout_inputs`), never from a split of its own."""

    def __init__(self, reports: Iterable[BlockReport] = (), heldout: Iterable[int] = ()) -> None:
        super().__init__(reports)
        self.heldout: tuple[int, ...] = tuple(sorted(heldout))


def conv_groups(in_channels: int, out_channels: int, channels_per_group: int) -> int:
    """Groups for the grouped-conv compensation: C_in // channels_per_group as the authors, lowered to a common
    divisor of both channel counts when needed."""
    target = max(in_channels // channels_per_group, 1)
    common = math.gcd(in_channels, out_channels)
    return max(g for g in range(1, target + 1) if common % g == 0)


def infer_stride(in_size: int, out_size: int) -> int:
    if out_size == in_size:
        return 1
    if out_size == math.ceil(in_size / 2):
        return 2
    raise ValueError(f"block maps spatial size {in_size} to {out_size}; only stride 1 or 2 can be compensated")


def _fitter(form: Form, x: torch.Tensor, y: torch.Tensor, config: QwTConfig):
    ridge = config.ridge_for(form)
    if form == "linear":
        return LinearLeastSquares(ridge, config.solver, config.relative_ridge, config.rank), {}
    stride = infer_stride(x.shape[-1], y.shape[-1])
    groups = conv_groups(x.shape[1], y.shape[1], config.channels_per_group)
    fit = GroupedConvLeastSquares(x.shape[1], y.shape[1], config.kernel_size, stride, groups, ridge, config.solver,
                                  config.relative_ridge)
    return fit, {"stride": stride, "groups": groups, "kernel_size": config.kernel_size}


def _wrap(form: Form, block: nn.Module, result: FitResult, meta: dict, fp16_eval: bool) -> Compensated:
    if result.down is not None:
        return LowRankCompensated(block, result.down, result.up, result.bias, fp16_eval)
    if form == "linear":
        return LinearCompensated(block, result.weight, result.bias, fp16_eval)
    return ConvCompensated(block, result.weight, result.bias, meta["stride"], meta["groups"], fp16_eval)


def _zeroed(result: FitResult) -> FitResult:
    """``result``'s tensors as zeros of the same shapes and devices: a compensation left out."""
    def zero(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.zeros_like(t)

    return replace(result, weight=zero(result.weight), bias=zero(result.bias), down=zero(result.down),
                   up=zero(result.up))


def _solve(fit: LinearLeastSquares | GroupedConvLeastSquares, name: str,
           skip_degenerate: bool) -> tuple[FitResult, str | None]:
    """The fit, or a zero compensation and the reason when the system is degenerate (and that is checked)."""
    if not skip_degenerate:
        return fit.solve(name), None
    reason = fit.underdetermined()
    if reason is None:
        try:
            result = fit.solve(name)
        except SingularSystemError as err:
            reason = str(err)
        else:
            reason = fit.interpolates(result.r2)
            if reason is None:
                return result, None
    warnings.warn(f"{name}: compensation left out: {reason}", RuntimeWarning)
    return fit.zero_result(), reason


@dataclass
class BlockInputs:
    """What a block's fit reads. ``feats`` holds the block's input batches on the quantised path where they wait
    between blocks (:class:`FeatureStore`), ``fp_feats`` the FP model's own (only with ``propagation`` > 0); each
    batch is fetched to ``device`` when used, and the fit replaces batch k by the next step's input as soon as
    batch k is done, so at most two copies exist. The ``heldout`` batches (the guard's,
    :func:`qwt.compensation.guard.heldout_batches`) are left out of the fit and only judge it
    (:class:`qwt.compensation.guard.HeldOutGuard`). ``sequence``: the features are token windows (sink rows)."""

    feats: FeatureStore
    fp_feats: FeatureStore | None
    device: torch.device
    heldout: frozenset[int]
    sequence: bool

    def fp_stream(self, k: int) -> torch.Tensor | None:
        return None if self.fp_feats is None else self.fp_feats.get(k, self.device)


#: Fits one block's compensation and attaches it in place: (model, step, inputs, block index) → (R², applied,
#: report extras). One per compensation form.
BlockFit = Callable[[nn.Module, Step, BlockInputs, int], tuple[float, bool, dict]]
#: (model, block path) → the last layer of each residual branch of that block (see :class:`qwt.Family`).
ResidualBranches = Callable[[nn.Module, str], list[str]]


def dense_block_fit(form: Form, config: QwTConfig) -> BlockFit:
    """The authors' form: ``out = block_q(x) + W x + b`` beside the block, fitted on FP-block(x) − block_q(x)."""

    def fit_block(model: nn.Module, step: Step, inputs: BlockInputs, index: int):
        module, feats, device = model.get_submodule(step.path), inputs.feats, inputs.device
        outputs, fit, guard, meta = feats.sibling(), None, None, {}
        energy = SinkEnergy(config.sink_norm_multiple) if inputs.sequence else None
        for k in range(len(feats)):
            x, x_fp = feats.get(k, device), inputs.fp_stream(k)
            with quant_state(module, weight=False, act=False):
                y_fp = step.run(module, x)
                y_stream = None if x_fp is None else step.run(module, x_fp)
            y_q = step.run(module, x)
            if fit is None:
                fit, meta = _fitter(form, x, y_q, config)
                # the guard's rows: FP64 statistics whatever the solver
                guard = HeldOutGuard(inputs.heldout, _fitter(form, x, y_q, replace(config, solver="streaming"))[0])
            y_fp = propagated_target(y_fp, y_stream, config.propagation)
            shared = y_fp.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
            target = y_fp - y_q if shared else y_fp.sub_(y_q)  # in the FP output's buffer unless that is x
            sinks = None if energy is None else sink_mask(x, config.sink_norm_multiple)
            if energy is not None:
                energy.add(target, sinks)
            guard.route(k, fit).update(*fit_rows(sinks if config.exclude_sinks else None, x, target))
            outputs.put(k, y_q)
            if y_stream is not None:
                inputs.fp_feats.put(k, y_stream)
        del x, x_fp, y_fp, y_stream, y_q, target
        fit.reduce()
        if energy is not None:
            meta["sinks"] = energy.report()
        result, reason = _solve(fit, step.path, config.skip_degenerate)
        if reason is not None:
            meta = {**meta, "skipped": reason}
        if result.down is not None:
            meta.update(rank=result.down.shape[1], energy_kept=result.energy_kept)
        applied = reason is None and result.r2 > config.r2_threshold and index >= config.start_block
        # judged on the map the wrapper applies: a reduced-rank fit's weight is its rank-r product
        applied = guard.judge(applied, meta, "guard", result.weight, result.bias)
        wrapper = _wrap(form, module, result if applied else _zeroed(result), meta, config.fp16_eval)
        swap_module(model, step.path, wrapper)
        for k in range(len(feats)):  # batch k's input and output are freed as we go
            y = wrapper.add_fp32(outputs.get(k, device), feats.get(k, device))
            outputs.release(k)
            feats.put(k, y)
        return result.r2, applied, meta

    return fit_block


def remove_compensation(model: nn.Module, path: str) -> None:
    """Take block ``path``'s compensation out of ``model`` (in place): the dense wrapper gives its block back,
    channel-wise corrections give their layers back; the quantised block is left as PTQ made it."""
    block = model.get_submodule(path)
    if isinstance(block, Compensated):
        swap_module(model, path, block.block)
        block = block.block
    for name, module in list(block.named_modules()):
        if isinstance(module, ChannelAffine):
            swap_module(block, name, module.layer)


@torch.no_grad()
def fit_compensation(model: nn.Module, plan: BlockPlan, images: torch.Tensor | Iterable,
                     config: QwTConfig = QwTConfig(), batch_size: int = 32, progress: bool = True, *,
                     residual_branches: ResidualBranches | None = None) -> BlockReports:
    """Attach a fitted compensation to every block of ``plan`` (in place); returns one report per block and the
    batches the held-out guard (``config.guard_fraction``) kept out of the fit (:class:`BlockReports`).

    ``model`` must be quantised and calibrated. ``images`` is a tensor (split into ``batch_size`` batches) or
    an iterable of batches, e.g. a DataLoader. Between blocks the features of all batches wait on
    ``config.feature_device`` (``"cpu"`` keeps GPU memory flat in the number of images, ``"disk"`` keeps the
    process's memory flat; each batch is fetched to the model's device when used) and at most two copies exist:
    a block's input and its output.
    ``config.compensation == "channelwise"`` needs ``residual_branches`` (the family's). Most callers use
    :func:`qwt.apply_qwt`, which takes the plan and the residual branches from the model's family.
    """
    check_qwt_config(config, compensated_blocks(plan))
    if config.rank is not None and plan.form != "linear":
        raise ValueError(f"rank {config.rank}: a reduced-rank compensation is a token (linear) map; this model's "
                         f"blocks take a {plan.form} compensation (use rank=None)")
    if config.exclude_sinks and not plan.sequence:
        raise ValueError("exclude_sinks needs token-sequence features (a language model's plan); this plan's "
                         "features have no attention-sink rows")
    if config.compensation == "channelwise":
        if residual_branches is None:
            raise ValueError("channel-wise compensation needs residual_branches: which layer ends each residual "
                             "branch of a block (qwt.apply_qwt takes it from the model's family)")
        fit_block = channelwise_block_fit(residual_branches, config)
    else:
        fit_block = dense_block_fit(plan.form, config)
    model.eval()
    set_quant_state(model, weight=True, act=True)
    with FeatureStores(config.feature_device) as stores:
        feats = stores.new()
        fp_feats = stores.new() if config.propagation else None
        device = _stems(model, plan, compensation_batches(images, batch_size), feats, fp_feats)
        inputs = BlockInputs(feats, fp_feats, device, heldout_batches(len(feats), config.guard_fraction),
                             plan.sequence)
        reports, index = BlockReports(heldout=inputs.heldout), 0
        for step in tqdm(plan.steps, desc="QwT blocks", disable=not progress, leave=False):
            if not step.compensate:
                _transition(model, step, inputs)
                continue
            start = time.perf_counter()
            r2, applied, meta = fit_block(model, step, inputs, index)
            reports.append(BlockReport(index, step.path, r2, applied, time.perf_counter() - start, meta))
            index += 1
    return reports


def _stems(model: nn.Module, plan: BlockPlan, batches: Iterable, feats: FeatureStore,
           fp_feats: FeatureStore | None) -> torch.device:
    """Fill ``feats`` with the first block's input of every batch on the quantised path, and ``fp_feats`` (when
    kept) with the FP model's; returns the device the features are computed on."""
    device = None
    for k, batch in enumerate(batches):
        if isinstance(batch, torch.Tensor):
            plan.check_inputs(batch, "compensation inputs")
        x = plan.stem(batch)
        if device is None:
            device = x.device
        feats.put(k, x)
        if fp_feats is not None:
            with quant_state(model, weight=False, act=False):
                fp_feats.put(k, plan.stem(batch))
    if device is None:
        raise ValueError("no compensation images: pass at least one batch")
    return device


def _transition(model: nn.Module, step: Step, inputs: BlockInputs) -> None:
    """Run an uncompensated step (e.g. patch merging) on every batch: quantised, and in FP on the FP stream."""
    module = model.get_submodule(step.path)
    for k in range(len(inputs.feats)):
        inputs.feats.put(k, step.run(module, inputs.feats.get(k, inputs.device)))
        if inputs.fp_feats is not None:
            with quant_state(module, weight=False, act=False):
                inputs.fp_feats.put(k, step.run(module, inputs.fp_stream(k)))
