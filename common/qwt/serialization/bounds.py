"""Bounds on what a description may declare, checked before anything is built or any tensor is read: its size,
nesting, the types of its parts, and the builder arguments (nested configs included)."""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ..errors import InputError
from ..models import get_model_entry
from .describe import BRANCH_ENDS
from .messages import listing

#: Bounds on what a description may declare, checked before anything is built. A real description is a few
#: hundred kB (one entry per quantiser and block) and a few levels deep; the builder arguments are those of the
#: registered models (the largest timm ImageNet models, and language models of hundreds of billions of
#: parameters, stay inside these). A limit applies to its key at any depth (a language model's nested config).
MAX_DESCRIPTION_BYTES = 16 * 2**20
MAX_NESTING = 8
BUILD_LIMITS = {"img_size": 2048, "patch_size": 2048, "in_chans": 64, "embed_dim": 16384, "depth": 256,
                "num_heads": 256, "num_classes": 100_000, "mlp_ratio": 64,
                "num_hidden_layers": 256, "hidden_size": 32768, "intermediate_size": 131_072, "vocab_size": 2**20,
                "num_attention_heads": 256, "num_key_value_heads": 256, "head_dim": 1024,
                "max_position_embeddings": 2**20}
#: Any other integer or float a top-level builder argument declares, and any top-level list's length. Other
#: numbers of a nested config (token ids, rotary bases) size nothing and are not bounded.
MAX_BUILD_NUMBER, MAX_BUILD_ITEMS = 100_000, 16
#: The length of a list in a nested config (a language model's per-layer list has one item per layer).
MAX_CONFIG_ITEMS = 1024
#: Builder arguments a description may not set: the saved tensors are the weights, nothing else is read.
FORBIDDEN_BUILD_ARGS = ("checkpoint", "pretrained")


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    depth, level = 0, [(value, 1)]
    while level:
        item, d = level.pop()
        depth = max(depth, d)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        level.extend((child, d + 1) for child in children)
    return depth


def check_declared(description: dict[str, Any], where: str) -> None:
    """Refuse a description that declares more than any model could need, before it is built."""
    kinds = {"model": str, "build_kwargs": dict, "ptq": dict, "quantizers": dict, "compensation": list,
             "tensors": dict}
    wrong = [f"{key} ({kind.__name__})" for key, kind in kinds.items() if not isinstance(description.get(key), kind)]
    if wrong:
        raise InputError(f"{where} is incomplete or malformed: missing or mistyped {', '.join(wrong)}")
    problems = [f"{key} may not be set (the saved tensors are the weights)" for key in FORBIDDEN_BUILD_ARGS
                if key in description["build_kwargs"]]
    # Each quantiser saves a step, each compensated block a weight and a bias, each channel-wise correction a gain
    # and a shift, all checksummed.
    tensors, compensation = len(description["tensors"]), description["compensation"]
    if len(description["quantizers"]) > tensors or 2 * len(compensation) > tensors:
        problems.append(f"{len(description['quantizers'])} quantisers and {len(compensation)} compensated blocks "
                        f"for {tensors} tensors")
    problems += [p for p in map(_compensation_entry_problem, compensation) if p is not None]
    paths = [spec.get("path") for spec in compensation if isinstance(spec, dict)]
    if len(set(map(str, paths))) != len(paths):
        problems.append("a block is compensated twice")
    problems += saved_build_problems(description["model"], description["build_kwargs"], description["tensors"])
    if problems:
        raise InputError(f"{where} declares what no saved model needs: {listing(problems)}")


def _compensation_entry_problem(spec: Any) -> str | None:
    """Why a compensation entry is malformed, or None: a dense block (``linear``, ``lowrank``, ``conv``) declares
    its sizes (one it omits is 1) and ``fp16_eval``, a channel-wise correction the kind of layer it follows and its
    channels."""
    def sized(value: Any) -> bool:
        return isinstance(value, int) and 1 <= value <= MAX_BUILD_NUMBER

    if not isinstance(spec, dict) or spec.get("form") not in ("linear", "lowrank", "conv", "channelwise"):
        return f"compensation entry {str(spec)[:80]} (its form is linear, lowrank, conv or channelwise)"
    if spec["form"] == "channelwise":
        fine = spec.get("after") in BRANCH_ENDS and sized(spec.get("channels"))
        need = f"after is one of {', '.join(BRANCH_ENDS)}, channels an integer in 1..{MAX_BUILD_NUMBER}"
    else:
        fine = isinstance(spec.get("fp16_eval"), bool) and all(
            sized(spec.get(k, 1)) for k in ("in", "out", "rank", "kernel_size", "stride", "groups"))
        need = f"sizes are integers in 1..{MAX_BUILD_NUMBER}, fp16_eval true or false"
    return None if fine else f"compensation entry {str(spec)[:80]} ({need})"


def saved_build_problems(model_name: str, build_kwargs: dict[str, Any], tensors: Collection[str]) -> list[str]:
    """Why a save of ``model_name`` built with ``build_kwargs`` and holding ``tensors`` (their names) would be
    refused for its builder arguments: the bounds, and the registered model's own check. Empty: none. A run that
    saves at its end calls this first, so a model it cannot save is refused before the compute."""
    try:
        check = get_model_entry(model_name).check_saved_args
    except ValueError as err:
        return [str(err)]
    problems = _build_arg_problems(build_kwargs)
    return problems + (check(build_kwargs, tensors) if check is not None else [])


def _build_arg_problems(build_kwargs: dict[str, Any]) -> list[str]:
    """Numbers and list lengths of the builder arguments beyond their bounds, nested configs included."""
    problems, stack = [], [("", build_kwargs)]
    while stack:
        prefix, mapping = stack.pop()
        for key, value in mapping.items():
            if isinstance(value, dict):
                stack.append((f"{prefix}{key}.", value))
                continue
            values = value if isinstance(value, list) else [value]
            items, limit = (MAX_CONFIG_ITEMS, BUILD_LIMITS.get(key)) if prefix else \
                (MAX_BUILD_ITEMS, BUILD_LIMITS.get(key, MAX_BUILD_NUMBER))
            if len(values) > items:
                problems.append(f"{prefix}{key} lists {len(values)} values (at most {items})")
            elif limit is not None and any(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           and not abs(v) <= limit for v in values):
                problems.append(f"{prefix}{key}={value} is beyond {limit}")
    return problems
