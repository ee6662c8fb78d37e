"""Safe checkpoint loading: safetensors, or a PyTorch file read with ``weights_only=True`` (never unpickled)."""
from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError

StateDict = dict[str, torch.Tensor]


def check_checkpoint(path: str | Path) -> Path:
    """A weights file that exists; a folder passed by mistake is named as such, not as "not found"."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a directory; pass the weights file itself")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    return path


_WRAPPER_KEYS = ("state_dict", "model", "model_ema", "module")


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors of a checkpoint file; unwraps ``{"state_dict": ...}``-style containers and ``module.`` prefixes."""
    path = check_checkpoint(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise InputError(
                f"{path} cannot be read as safetensors ({err}); the file is truncated or damaged") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors come in many types
            raise ValueError(f"{path} is not a weights-only PyTorch checkpoint (refusing to unpickle it): {err}") from err
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(model: nn.Module, path: str | Path,
              convert: Callable[[StateDict, nn.Module], StateDict] | None = None) -> nn.Module:
    """Load ``path`` into ``model`` strictly, after an optional key-layout conversion."""
    state = read_state_dict(path)
    if convert is not None:
        state = convert(state, model)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{path} does not match {type(model).__name__}: {err}") from None
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path} does not match {type(model).__name__}: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}{'…' if len(result.unexpected_keys) > 5 else ''}")
    return model


def build_timm(timm_name: str, weights_hint: str, convert: Callable[[StateDict, nn.Module], StateDict] | None,
               smoke_kwargs: dict, pretrained: bool = True, checkpoint: str | Path | None = None,
               smoke: bool = False, num_classes: int = 1000) -> nn.Module:
    """A timm model with drop-path 0 and weights from ``checkpoint`` only (nothing is downloaded).

    ``smoke`` builds the same class at the reduced ``smoke_kwargs`` size (random init unless a checkpoint is
    given) for CI and tests; otherwise ``pretrained`` without a checkpoint is an error naming the file to supply.
    A ``.npz`` checkpoint (big_vision augreg ViTs) goes through the model's own ``load_pretrained``.
    """
    import timm

    model = timm.create_model(timm_name, pretrained=False, drop_path_rate=0.0, num_classes=num_classes,
                              **(smoke_kwargs if smoke else {}))
    if checkpoint is None:
        if pretrained and not smoke:
            raise FileNotFoundError(
                f"{timm_name}: ImageNet weights are not downloaded here; pass --checkpoint with {weights_hint}")
    elif Path(checkpoint).suffix == ".npz":
        try:
            model.load_pretrained(str(check_checkpoint(checkpoint)))
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
            raise InputError(f"{checkpoint} is not a complete big_vision .npz for {timm_name} "
                             f"({type(err).__name__}: {err})") from None
    else:
        load_into(model, checkpoint, convert)
    return model.eval()
