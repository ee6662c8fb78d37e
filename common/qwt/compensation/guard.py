"""The held-out guard (``QwTConfig.guard_fraction``, not in the paper): a block's compensation is kept only if
it lowers that block's error on compensation batches that were not used to fit it.

Least squares always lowers the error on the rows it was fitted on, so the in-sample R² cannot tell a map that
generalises from one that fits noise (few rows per unknown, a layer whose error is dominated by a handful of
outlier tokens). Scoring the fit on held-out rows can; both compensation forms use it (:class:`HeldOutGuard`).

Which batches are held out is decided here only: :func:`compensation_batches` is the split of the inputs that
:func:`qwt.compensation.fit_compensation` fits on, :func:`heldout_batches` picks the held-out ones, and
:func:`heldout_inputs` gives a caller those inputs (e.g. to score a model on them, as
:func:`qwt.compensation.model_guard` does) without splitting anything itself.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from ..errors import InputError


def compensation_batches(images: torch.Tensor | Iterable, batch_size: int) -> Iterable[torch.Tensor]:
    """The batches QwT fits on, in order: a tensor split into ``batch_size`` rows each, or an iterable's batches
    (a DataLoader's ``(images, labels)`` give their images)."""
    if isinstance(images, torch.Tensor):
        return images.split(batch_size)
    return (b[0] if isinstance(b, (tuple, list)) else b for b in images)


def heldout_batches(count: int, fraction: float) -> frozenset[int]:
    """The batches the held-out guard keeps out of the fit: ``floor(count·fraction)`` of them, spread evenly
    (batch k when ⌊(k+1)·f⌋ > ⌊k·f⌋). A guard that would hold out no batch, or every batch, is refused."""
    if fraction == 0:
        return frozenset()
    held = frozenset(k for k in range(count) if math.floor((k + 1) * fraction) > math.floor(k * fraction))
    if not held or len(held) == count:
        raise ValueError(f"the held-out guard (guard_fraction {fraction}) needs batches both to fit and to hold out; "
                         f"{count} compensation batch(es) give {len(held)} held out: use more batches "
                         "(a smaller batch size or more data) or another fraction")
    return held


def heldout_inputs(images: torch.Tensor, batch_size: int, fraction: float) -> torch.Tensor:
    """The rows of ``images`` that ``fit_compensation(…, images, QwTConfig(guard_fraction=fraction), batch_size)``
    holds out of every block's fit, in order (none when ``fraction`` is 0). Any tensor split the same way works:
    labels give the held-out rows' labels. An iterable (a DataLoader) may give other batches on another pass, so
    it is refused: use the indices the fit returns (``BlockReports.heldout``) on the batches it saw."""
    if not isinstance(images, torch.Tensor):
        raise InputError(f"heldout_inputs takes a tensor of inputs, got {type(images).__name__}: another pass over an "
                         "iterable may give other batches; pick the batches fit_compensation reports as held out "
                         "(its result's .heldout) instead")
    batches = list(compensation_batches(images, batch_size))
    held = heldout_batches(len(batches), fraction)
    return torch.cat([batches[k] for k in sorted(held)]) if held else images[:0]


def guard_decision(before: float, after: float, batches: int) -> dict:
    """The guard's report: held-out error without and with the compensation, and whether it is kept."""
    return {"heldout_batches": batches, "heldout_error": before, "heldout_error_compensated": after,
            "kept": after < before}


class Statistics(Protocol):
    """Streaming statistics of a compensation's fit (the dense solvers, the channel-wise affine fit)."""

    def update(self, *batch: torch.Tensor) -> None: ...

    def reduce(self) -> None: ...

    def error(self, *correction: torch.Tensor) -> Any: ...


class HeldOutGuard:
    """One fit's held-out guard (a dense block's, a channel-wise layer's): the held-out batches' rows go to
    ``statistics`` (FP64, never fitted on) instead of the fit's, then the fitted correction is kept only if it
    lowers their error."""

    def __init__(self, heldout: frozenset[int], statistics: Statistics) -> None:
        self.heldout, self.statistics = heldout, statistics

    def route(self, k: int, fit: Statistics) -> Statistics:
        """Where batch ``k``'s rows go: the guard's statistics or ``fit``'s."""
        return self.statistics if k in self.heldout else fit

    def judge(self, keep: bool, record: dict, key: str, *correction: torch.Tensor) -> bool:
        """``keep``, and with the guard on whether ``correction`` lowers the held-out error, the decision then
        written to ``record[key]``."""
        if not self.heldout:
            return keep
        self.statistics.reduce()
        record[key] = guard_decision(float(self.statistics.error()), float(self.statistics.error(*correction)),
                                     len(self.heldout))
        return keep and record[key]["kept"]
