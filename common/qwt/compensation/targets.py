"""What a block's compensation is fitted towards, and on which rows.

The authors' target for block i is FP-block(x) − quantised-block(x) on the quantised path's input x: it repairs
the block's own error only. The error-propagating target (``QwTConfig.propagation`` α > 0) blends in the FP
model's own output, FP-block(x_fp), so that block i also pulls back the error that earlier blocks left in its input
(the FP stream x_fp is a second feature store walked beside the quantised one). ``exclude_sinks`` leaves
attention-sink rows (:mod:`qwt.compensation.sinks`) out of the rows a fit and its guard see.
"""
from __future__ import annotations

import torch


def fit_rows(sinks: torch.Tensor | None, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows a fit takes from each of ``tensors`` (batch, tokens, ·), or flattened (batch·tokens, ·): all of
    them, or only those that are not ``sinks`` (``exclude_sinks``), as (rows, ·)."""
    if sinks is None:
        return tensors
    keep = ~sinks.to(tensors[0].device)
    return tuple(t.reshape(*keep.shape, -1)[keep] for t in tensors)


def propagated_target(y_fp: torch.Tensor, y_stream: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """α·FP-block(x_fp) + (1 − α)·FP-block(x_q) as ``lerp`` (exactly ``y_stream`` at α = 1); ``y_fp`` itself
    without an FP stream (α = 0, the authors' target)."""
    return y_fp if y_stream is None else torch.lerp(y_fp, y_stream, alpha)
