"""What machine produced a number: the last digits of a result depend on the CPU's kernels and thread count."""
from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .allocator import freed_memory_retained


@lru_cache(maxsize=None)
def cpuinfo_field(name: str) -> str | None:
    """The first ``name : value`` of /proc/cpuinfo (Linux), or None where there is none."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(name):
                return line.split(":", 1)[1].strip()
    return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """CPU model, torch thread count, library versions, the device and the allocator setting (timings depend on
    it, see :mod:`qwt.allocator`): stored with every result record."""
    import timm

    env: dict[str, Any] = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "timm": timm.__version__, "python": platform.python_version(), "device": str(device),
                           "freed_memory_retained": freed_memory_retained()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env
