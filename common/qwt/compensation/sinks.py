"""Attention-sink rows of a token sequence, for the compensation's diagnostics and its ``exclude_sinks`` option.

A decoder language model forms a massive activation on a few tokens of each window (the first one above all, the
"attention sink"), orders of magnitude above the other tokens' hidden states. A static activation grid clips it,
so that token can hold almost all of a layer's squared error, and an unweighted least-squares fit (and a guard that
scores the same summed error) then serves that one token at the other tokens' expense. This module says which rows
are sinks and how much of a fit's target energy they hold (docs/llm_compensation.md has the measurements).

A row is a sink when it is position 0 of its window, or when its input's norm exceeds ``multiple`` times the median
input norm of its window. Only sequence features (batch, tokens, channels) have sinks: the plan says so
(``BlockPlan.sequence``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: A row whose input norm exceeds this multiple of its window's median norm is a sink (massive activations sit
#: two to three orders of magnitude above the median; ordinary tokens stay within a few times of it).
DEFAULT_NORM_MULTIPLE = 20.0


def sink_mask(x: torch.Tensor, multiple: float = DEFAULT_NORM_MULTIPLE) -> torch.Tensor:
    """(batch, tokens) booleans: position 0 of each window, and every token whose norm exceeds ``multiple`` ×
    its window's median token norm. ``x`` is (batch, tokens, channels)."""
    norms = torch.linalg.vector_norm(x.float(), dim=-1)
    mask = norms > multiple * norms.median(dim=-1, keepdim=True).values
    mask[:, 0] = True
    return mask


@dataclass
class SinkEnergy:
    """Running shares of a fit's target energy Σ‖t‖² held by sink rows: position 0, and the norm outliers at
    other positions."""

    multiple: float = DEFAULT_NORM_MULTIPLE
    total: float = 0.0
    position0: float = 0.0
    outliers: float = 0.0
    outlier_rows: int = 0
    rows: int = 0

    def add(self, target: torch.Tensor, mask: torch.Tensor) -> None:
        """Add one batch's target and its sink rows (:func:`sink_mask` of its input); the target holds the same
        tokens, as (batch, tokens, channels) or flattened to (batch·tokens, channels) (OPT's MLP)."""
        energy = target.double().reshape(*mask.shape, -1).square().sum(-1)
        mask = mask.to(energy.device)
        self.total += float(energy.sum())
        self.position0 += float(energy[:, 0].sum())
        rest = mask.clone()
        rest[:, 0] = False
        self.outliers += float(energy[rest].sum())
        self.outlier_rows += int(rest.sum())
        self.rows += mask.numel()

    def report(self) -> dict[str, float | int | None]:
        """Shares of the target energy (None without energy), the outlier row count and the rule's multiple."""
        def share(part: float) -> float | None:
            return part / self.total if self.total > 0 and math.isfinite(self.total) else None

        return {"position0_share": share(self.position0), "outlier_share": share(self.outliers),
                "sink_share": share(self.position0 + self.outliers), "outlier_rows": self.outlier_rows,
                "rows": self.rows, "norm_multiple": self.multiple}

