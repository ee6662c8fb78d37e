"""Keep freed memory in the process, so the large tensors of every batch reuse warm pages.

glibc serves each allocation above its mmap threshold (at most 32 MiB) with fresh pages from the kernel and
returns them on free, and gives freed memory at the top of its heap back above a trim threshold (128 KiB by
default); either way a tensor of a few hundred MiB costs a page fault per 4 KiB, every batch. On this project's
2-core CPU the faults made an FP forward of ResNet-50 about 40 % slower, and the calibration, which makes more
such temporaries per unit of compute, slower still. Results do not change: this only decides where memory
comes from.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_MMAP_THRESHOLD = 1 << 30  # allocations up to 1 GiB come from the heap
_TRIM_THRESHOLD = 2**31 - 1  # keep up to 2 GiB of freed memory at the heap top (mallopt takes a C int)

_retained = False


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"))


def retain_freed_memory() -> bool:
    """On Linux with glibc, serve allocations up to 1 GiB from the heap and keep up to 2 GiB of freed memory.

    Process-wide and permanent: the resident set stays near its peak instead of shrinking between batches (the
    peak can grow a little: a freed block serves only allocations that fit in it). The command-line entry points
    call it; call it in your own scripts for the same speed. Returns whether it is in effect (False on other
    platforms, where it does nothing).
    """
    global _retained
    if _retained:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = _libc()
    _retained = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _retained


def release_freed_memory() -> None:
    """Give the freed heap memory back to the kernel now (glibc ``malloc_trim``), e.g. before measuring how much
    memory a phase adds: otherwise memory retained from earlier phases hides part of it."""
    if _retained:
        _libc().malloc_trim(0)


def freed_memory_retained() -> bool:
    """Whether :func:`retain_freed_memory` is in effect in this process (recorded with results)."""
    return _retained
