"""The two files of a save on disk: written into a fresh temporary folder renamed into place, replacing only a
previous save that holds nothing else; read back with the description's size and nesting bounded."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import InputError
from .bounds import MAX_DESCRIPTION_BYTES, MAX_NESTING, json_depth
from .describe import FORMAT_VERSION
from .messages import listing

TENSORS, DESCRIPTION = "model.safetensors", "qwt.json"
#: The tensor file's metadata entry holding the SHA-256 of the description it was saved with.
HASH_KEY = "qwt_description_sha256"


def check_save_target(directory: str | Path) -> Path:
    """A folder ``save_quantized`` may write: new, empty, or a previous save it replaces; never other content.

    Checked again by :func:`save_quantized` itself; callers with a ``--save`` flag call it before any compute.
    """
    directory = Path(directory)
    if directory.is_symlink():
        raise InputError(f"{directory} is a symbolic link; pass the folder it points to "
                         f"({os.path.realpath(directory)}) or a new path")
    if directory.exists():
        if not directory.is_dir():
            raise InputError(f"{directory} exists and is not a folder; refusing to replace it")
        reason = _recognised_save(directory)
        if reason is not None:
            raise InputError(f"{directory} is not a saved QwT model that a new save may replace: {reason}; "
                             "choose a new folder or move those files away")
    return directory


def _recognised_save(directory: Path) -> str | None:
    """Why ``directory`` (an existing folder) is not a previous save this function may replace, or None.

    A previous save is exactly the two files save_quantized writes, whose description is the one the tensor
    file was signed with (a ``qwt.json`` of that name alone proves nothing)."""
    names = sorted(p.name for p in directory.iterdir())
    if not names:
        return None  # an empty folder: nothing to lose
    foreign = [n for n in names if n not in (TENSORS, DESCRIPTION)]
    if foreign:
        return f"it holds files a save did not write ({listing(foreign, ', ')})"
    if names != sorted((TENSORS, DESCRIPTION)) or any((directory / n).is_symlink() or not (directory / n).is_file()
                                                      for n in names):
        return f"it holds {', '.join(names)} but not a complete save ({TENSORS} and {DESCRIPTION} as plain files)"
    description = directory / DESCRIPTION
    try:
        with safe_open(str(directory / TENSORS), framework="pt") as f:
            signed = (f.metadata() or {}).get(HASH_KEY)
        raw = description.read_bytes() if description.stat().st_size <= MAX_DESCRIPTION_BYTES else b""
    except (SafetensorError, OSError) as err:
        return f"its files cannot be read ({err})"
    if signed is None or signed != hashlib.sha256(raw).hexdigest():
        return f"its {DESCRIPTION} is not the description its {TENSORS} was saved with"
    return None


def untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies safetensors can write: a tensor that shares storage with an earlier one (a language model's
    tied input embedding and output head) is cloned; loading fills both from equal values."""
    out, seen = {}, set()
    for key, value in state.items():
        value = value.detach().contiguous().cpu()
        ptr = value.untyped_storage().data_ptr() if value.numel() else None
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def write_save(directory: Path, state: dict[str, torch.Tensor], text: str) -> None:
    """Write the tensors (signed with the SHA-256 of ``text``) and the description ``text`` into a fresh
    temporary folder next to ``directory`` and rename it into place; on any failure nothing is left behind."""
    target = Path(os.path.abspath(directory))  # "." has no name to put a sibling next to
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        metadata = {"format": "pt", HASH_KEY: hashlib.sha256(text.encode()).hexdigest()}
        save_file(state, str(tmp / TENSORS), metadata=metadata)
        (tmp / DESCRIPTION).write_text(text)
        _move_into_place(tmp, target)
    except BaseException:
        for name in (TENSORS, DESCRIPTION):
            (tmp / name).unlink(missing_ok=True)
        if tmp.exists():
            tmp.rmdir()
        raise


def _move_into_place(new: Path, directory: Path) -> None:
    """Rename ``new`` to ``directory``. A previous save there is first renamed aside and checked again (nothing
    may have been added since :func:`check_save_target`); only its two files are deleted, and it is put back
    if the rename fails. No folder is deleted with its contents."""
    if not directory.exists():
        os.rename(new, directory)  # fails, deleting nothing, if a non-empty folder appeared meanwhile
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{directory.name}.replaced-", dir=directory.parent))
    os.rename(directory, aside)  # onto the empty folder mkdtemp made: replaces it
    try:
        reason = _recognised_save(aside)
        if reason is not None:
            raise InputError(f"{directory} changed while saving and is no longer a previous save: {reason}")
        os.rename(new, directory)
    except BaseException:
        os.rename(aside, directory)
        raise
    for name in (TENSORS, DESCRIPTION):
        (aside / name).unlink(missing_ok=True)
    try:
        aside.rmdir()
    except OSError:
        warnings.warn(f"{aside}: files appeared in the replaced save while saving; kept there", stacklevel=4)


def require_save_files(directory: Path) -> None:
    """FileNotFoundError naming the first of the two files ``directory`` lacks."""
    for name in (TENSORS, DESCRIPTION):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: is {directory} a folder written by save_quantized?")


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors, on the CPU: their size is bounded by the file's, which the safetensors header must match."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise InputError(f"{path} cannot be read as safetensors ({err}); the file is truncated or damaged") from None


def read_description(path: Path) -> tuple[dict[str, Any], str]:
    """The description and the SHA-256 of its bytes; size and nesting bounded before and while parsing."""
    size = path.stat().st_size
    if size > MAX_DESCRIPTION_BYTES:
        raise InputError(f"{path} is {size} bytes, more than any model description ({MAX_DESCRIPTION_BYTES}); "
                         "it is not a qwt.json written by save_quantized")
    raw = path.read_bytes()
    try:
        description = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not valid JSON ({err}); the file is damaged") from None
    except RecursionError:
        description = None  # nested deeper than the parser goes: refused below like any deep nesting
    if description is None or json_depth(description) > MAX_NESTING:
        raise InputError(f"{path} is nested deeper than a model description ({MAX_NESTING} levels); it is not a "
                         "qwt.json written by save_quantized")
    if not isinstance(description, dict):
        raise InputError(f"{path} does not hold a QwT model description")
    version = description.get("format_version")
    if version != FORMAT_VERSION:
        hint = ("it was saved by an earlier version, without checksums of its tensors; save the model again with "
                "this version" if isinstance(version, int) and 0 < version < FORMAT_VERSION else
                "save the model again with this version")
        raise InputError(f"{path}: unsupported format_version {version!r} (this version reads {FORMAT_VERSION}); "
                         f"{hint}")
    return description, hashlib.sha256(raw).hexdigest()
