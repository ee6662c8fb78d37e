"""The held-out guard (``QwTConfig.guard_fraction``, not in the paper): a block's compensation is kept only if
it lowers that block's error on compensation batches that were not used to fit it.

Least squares always lowers the error on the rows it was fitted on, so the in-sample R² cannot tell a map that
generalises from one that fits noise (few rows per unknown, a layer whose error is dominated by a handful of
outlier tokens). Scoring the fit on held-out rows can; both compensation forms use it.
"""
from __future__ import annotations

import math


def heldout_batches(count: int, fraction: float) -> set[int]:
    """The batches the held-out guard keeps out of the fit: ``floor(count·fraction)`` of them, spread evenly
    (batch k when ⌊(k+1)·f⌋ > ⌊k·f⌋). A guard that would hold out no batch, or every batch, is refused."""
    if fraction == 0:
        return set()
    held = {k for k in range(count) if math.floor((k + 1) * fraction) > math.floor(k * fraction)}
    if not held or len(held) == count:
        raise ValueError(f"the held-out guard (guard_fraction {fraction}) needs batches both to fit and to hold out; "
                         f"{count} compensation batch(es) give {len(held)} held out: use more batches "
                         "(a smaller batch size or more data) or another fraction")
    return held


def guard_decision(before: float, after: float, batches: int) -> dict:
    """The guard's report: held-out error without and with the compensation, and whether it is kept."""
    return {"heldout_batches": batches, "heldout_error": before, "heldout_error_compensated": after,
            "kept": after < before}
