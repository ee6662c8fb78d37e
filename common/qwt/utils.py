"""Seeds, phase timing and a fast finiteness check."""
from __future__ import annotations

import math
import random
import time

import numpy as np
import torch


def seed_everything(seed: int = 0) -> None:
    """Seed python, numpy and torch (CPU and CUDA), as the reference scripts do."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite, usually in one reduction instead of several elementwise passes.

    A NaN or an infinity makes the sum NaN or infinite, so a finite sum proves every value finite; only a sum
    that is not (an overflow of finite values, or a real NaN/Inf) is checked value by value.
    """
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class PhaseTimer:
    """Wall time per named phase; synchronises CUDA so GPU timings are real."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = self._now()

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def restart(self) -> None:
        self._last = self._now()

    def __call__(self, name: str) -> float:
        """Close the phase ``name`` (time since the previous mark) and return its seconds."""
        now = self._now()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now
        return self.phases[name]

    @property
    def total(self) -> float:
        return sum(self.phases.values())
