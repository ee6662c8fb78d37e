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
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} not found")
        model.load_pretrained(str(checkpoint))
    else:
        load_into(model, checkpoint, convert)
    return model.eval()
