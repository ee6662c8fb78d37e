"""Shared command-line plumbing: input checks made before any compute, and one exit code for input errors.

Every entry point (the task ``main.py`` files, the table scripts, ``scripts/demo.py``) runs its work through
:func:`run_cli`, so an input problem prints one ``error:`` line and exits with :data:`INPUT_ERROR` instead of a
traceback, and SIGTERM unwinds like Ctrl-C (temporary folders removed, child runs stopped).
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .allocator import retain_freed_memory
from .errors import InputError

#: Exit status for every input error (argparse uses the same for bad flags).
INPUT_ERROR = 2

#: Errors that mean "fix your input": raised by the checks here, by file access and by config validation.
_INPUT_ERRORS = (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError)


#: Storage failures (disk full, quota, read-only file system): one line, not a traceback; not the user's input.
_STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_cli(fn: Callable[..., Any], *args: Any, retain_memory: bool = True) -> int:
    """Call ``fn(*args)``; input errors → one line on stderr and exit status 2, SIGTERM/SIGINT → 130 after
    ``finally`` blocks and context managers have cleaned up. Returns ``fn``'s int result, else 0. Turns on
    :func:`qwt.allocator.retain_freed_memory` first (faster calibration, same results) unless ``retain_memory``
    is False (a benchmark of the allocator's default)."""
    if retain_memory:
        retain_freed_memory()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        result = fn(*args)
    except _INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return INPUT_ERROR
    except OSError as err:
        if err.errno not in _STORAGE_ERRORS:
            raise
        print(f"error: {err} (nothing half-written is left: results are written whole or not at all)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no record of the unfinished run is marked complete", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return result if isinstance(result, int) else 0


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (image counts, limits)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite float (thresholds; NaN would silently disable every comparison)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def guard_fraction(text: str) -> float:
    """argparse type: the held-out guard's fraction, in [0, 1) (0: no guard)."""
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (0 turns the guard off), got {text}")
    return value


def check_device(device: str, flag: str = "--device") -> str:
    """Refuse a CUDA device that this machine does not have, before anything is built."""
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise InputError(f"{flag} {device!r}: {err}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{flag} {device}: no CUDA GPU is available here; use {flag} cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def check_writable_dir(path: Path, flag: str) -> Path:
    """Make sure ``path`` is (or can become) a writable folder, so a run does not fail after its compute."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: exists and is not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{flag} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: {existing} is not writable")
    return path


#: The lock file a run creates in its output folder; it stays there (removing it would race with the next run).
LOCK_FILE = ".qwt-run.lock"
#: The folders this process holds (real paths).
_HELD: set[str] = set()


@contextmanager
def hold_output_dir(path: Path, flag: str) -> Iterator[Path]:
    """Hold ``path`` for one run: a second run with the same folder is refused (with the holder's pid) instead of
    overwriting its records as it goes. The lock is an ``flock`` on :data:`LOCK_FILE`, released by the OS when
    the process ends however it ends. A run started by the process that holds the folder (the table runner's
    children), or inside this process's own hold (the main job's runs), shares its hold. Folders created here
    are removed again if the run wrote nothing into them."""
    path = Path(path)
    key = os.path.realpath(path)
    if key in _HELD:
        yield path
        return
    created = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot create the lock file {path / LOCK_FILE} ({err.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder = True
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
            pid, _, command = os.pread(fd, 4096, 0).decode(errors="replace").strip().partition(" ")
            if pid != str(os.getppid()):
                raise InputError(f"{flag} {path} is in use by another run (pid {pid or 'unknown'}: {command}); wait "
                                 f"for it to finish or pass another {flag}") from None
            created, holder = [], False  # the holder's folder
        if holder:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {' '.join(sys.argv)[:200]}\n".encode(), 0)
        _HELD.add(key)
        try:
            yield path
        finally:
            _HELD.discard(key)
    finally:
        if created and [p.name for p in path.iterdir()] == [LOCK_FILE]:
            (path / LOCK_FILE).unlink()
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break
        os.close(fd)
