"""Safe checkpoint loading: safetensors, or a PyTorch file read with ``weights_only=True`` (never unpickled)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]
_WRAPPER_KEYS = ("state_dict", "model", "model_ema", "module")


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors of a checkpoint file; unwraps ``{"state_dict": ...}``-style containers and ``module.`` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
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
