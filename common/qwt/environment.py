"""What machine produced a number: the last digits of a result depend on the CPU's kernels and thread count."""
from __future__ import annotations

import os
import platform
import re
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


#: /proc/cpuinfo flags that decide which kernels run: torch's dispatch (AVX2, AVX-512), the integer dot products
#: of onnxruntime's and oneDNN's INT8 kernels (VNNI), Intel's matrix units (AMX).
KERNEL_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
#: Environment variables that override the instruction set torch, MKL or oneDNN would pick.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def cpu_flags() -> list[str] | None:
    """The :data:`KERNEL_FLAGS` this CPU has (Linux /proc/cpuinfo), or None where the flags cannot be read."""
    flags = cpuinfo_field("flags")
    return None if flags is None else [f for f in KERNEL_FLAGS if f in flags.split()]


def cpu_capability() -> str | None:
    """The instruction set torch's CPU kernels dispatch to ("DEFAULT", "AVX2", "AVX512", ...), None if unknown."""
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    try:
        return None if get is None else str(get())
    except RuntimeError:
        return None


def _config_version(pattern: str) -> str | None:
    """A version from torch's build summary (``torch.__config__.show()``), the one place every torch names it."""
    try:
        match = re.search(pattern, torch.__config__.show())
    except (AttributeError, RuntimeError):
        return None
    return match.group(1) if match else None


def kernel_libraries() -> dict[str, Any]:
    """The instruction set behind a run's last digits: torch's dispatch, the CPU's flags, MKL and oneDNN versions,
    and any environment variable that overrides them (only those set)."""
    mkl = getattr(torch.backends, "mkl", None)
    return {"cpu_capability": cpu_capability(), "cpu_flags": cpu_flags(),
            "mkl": _config_version(r"Math Kernel Library Version ([\d.]+)") if mkl and mkl.is_available() else None,
            "onednn": _config_version(r"(?:MKL-DNN|oneDNN) v([\d.]+)"),
            "kernel_env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}}


def kernels_note(env: dict[str, Any]) -> str:
    """One line for a table's header or footnote: which kernels produced the numbers."""
    flags = env.get("cpu_flags")
    note = f"torch CPU kernels {env.get('cpu_capability') or 'unknown'}"
    if flags:
        note += f" (CPU flags: {', '.join(flags)})"
    if env.get("kernel_env"):
        note += "; set: " + ", ".join(f"{k}={v}" for k, v in env["kernel_env"].items())
    return note


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """CPU model, torch thread count, library versions, the device, the allocator setting (timings depend on it,
    see :mod:`qwt.allocator`) and the instruction set (:func:`kernel_libraries`; the last digits of a result depend
    on it): stored with every result record."""
    import timm

    env: dict[str, Any] = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "timm": timm.__version__, "python": platform.python_version(), "device": str(device),
                           "freed_memory_retained": freed_memory_retained(), **kernel_libraries()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env
