"""The model-level half of the held-out guard (not in the paper): the compensated model is kept only if it scores
better than the uncompensated one on held-out inputs, else its compensation is cut to its first blocks or dropped.

The per-block guard (:mod:`qwt.compensation.guard`) scores each block on its own input; blocks that each improve
can still compose into a worse model, and only the model's output shows it. The score is the caller's (held-out
perplexity for a language model, a loss or an error rate for a classifier), computed on inputs no block was
fitted on: :func:`qwt.compensation.heldout_inputs`.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .blockwise import BlockReport, remove_compensation

#: Depths :func:`model_guard` tries when the fully compensated model fails it, as fractions of the compensated
#: blocks: compensation on the first round(L·f) blocks only.
GUARD_DEPTHS = (3 / 4, 1 / 2, 1 / 4)

#: A model's score on the held-out inputs; lower is better.
Score = Callable[[nn.Module], float]


def _check_depths(depths: Sequence[float]) -> None:
    bad = [f for f in depths if not 0 < f < 1]
    if bad:
        raise ValueError(f"model_guard depths are fractions of the compensated blocks in (0, 1), got {bad}; "
                         f"e.g. {GUARD_DEPTHS}")


def _scores_by_depth(model: nn.Module, reports: Sequence[BlockReport], score: Score, base_score: float,
                     depths: Sequence[float]) -> dict[int, float]:
    """The score of ``model`` with compensation on its first ``depth`` blocks, for every depth tried: all blocks,
    and, when that is not below ``base_score``, each of ``depths`` (on copies; ``model`` is left as it is)."""
    tried = {len(reports): score(model)}
    if tried[len(reports)] < base_score:
        return tried
    for fraction in depths:
        depth = round(len(reports) * fraction)
        if depth in tried or depth == 0:
            continue
        candidate = copy.deepcopy(model)
        for report in reports[depth:]:
            remove_compensation(candidate, report.path)
        tried[depth] = score(candidate)
        del candidate
    return tried


def model_guard(base: nn.Module, model: nn.Module, reports: Sequence[BlockReport], score: Score, base_score: float,
                depths: Sequence[float] = GUARD_DEPTHS) -> tuple[nn.Module, dict[str, Any]]:
    """(the model to keep, the decision) for ``model``, ``base`` compensated by QwT (``reports``, in block order).

    ``score(model)`` is lower for a better model, on held-out inputs; ``base_score`` is ``score(base)``. The
    compensated model is kept if it scores below ``base_score``. Else its compensation is kept on the first
    ``round(L·f)`` of its L blocks only, for the ``f`` in ``depths`` that scores lowest, if that is below
    ``base_score``; else ``base`` is returned. The dropped blocks lose their compensation in ``model`` (in place)
    and their reports are marked not applied, with ``extra["dropped_by_model_guard"]``. The decision:
    ``heldout_score`` (the base's), ``heldout_score_by_depth`` (each depth tried), ``depth`` (blocks kept
    compensated, 0: the base) and ``kept``.

    A classifier's caller can score the distance to the FP model's logits on the held-out images (docs/algorithm.md,
    section 6.9, has the recipe).
    """
    _check_depths(depths)
    tried = _scores_by_depth(model, reports, score, base_score, depths)
    depth = min(tried, key=tried.get)
    if tried[depth] >= base_score:
        depth = 0
    for report in reports[depth:]:
        if depth:
            remove_compensation(model, report.path)
        report.applied, report.extra["dropped_by_model_guard"] = False, True
    decision = {"heldout_score": base_score, "heldout_score_by_depth": {str(k): v for k, v in sorted(tried.items())},
                "depth": depth, "kept": depth > 0}
    return (model if depth else base), decision
