"""Each row's peak memory, as the run protocol records it."""
from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import torch

from ..allocator import release_freed_memory


def _vm_hwm_mb() -> float | None:
    """The process's peak resident memory as the kernel keeps it (Linux), None where there is no such record."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return None if match is None else int(match[1]) / 1024


class PeakMemory:
    """Each row's peak memory: CUDA's peak allocated memory, or on CPU the process's peak resident memory (the
    kernel's high-water mark, which writing 5 to /proc/self/clear_refs resets to the current use). Where neither
    can be reset, ``per_row`` is False and :meth:`read_mb` is the running maximum over the run (labelled so)."""

    def __init__(self, device: str) -> None:
        self.device, self.cuda = device, device.startswith("cuda")
        self.per_row = self.cuda or (self._clear_cpu_peak() and _vm_hwm_mb() is not None)

    @staticmethod
    def _clear_cpu_peak() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def reset(self) -> None:
        """Start a row: its peak is counted from the memory in use now (freed memory the allocator retains for
        speed, :func:`qwt.allocator.retain_freed_memory`, is given back first, so it does not count)."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.per_row:
            release_freed_memory()
            self._clear_cpu_peak()

    def read_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.per_row:
            return _vm_hwm_mb()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
