"""A description checked against the config it names and against the tensors: the quantisers the config builds,
every tensor's dtype, shape and finiteness on the structure the description implies, the checksums, and the
values no calibration can produce (:mod:`qwt.serialization.values`)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..ptq import PTQConfig
from ..quant.quantizers import Quantizer
from ..utils import all_finite
from .describe import tensor_sha256
from .messages import listing, one_sided
from .skeleton import build_skeleton, give_described_settings, reference_state
from .values import averaged_zero_points, compensation_problems, quantizer_value_problems


def verify(description: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> None:
    """The checks save and load share: config ↔ described quantisers, tensors ↔ structure, checksums,
    quantiser values. Builds the structure on the ``meta`` device only."""
    try:
        quantizers = description["quantizers"]
        skeleton = build_skeleton(description, where, "meta")
        diffs = quantizer_differences(skeleton, quantizers)
        if diffs:
            raise InputError(f"{where}: the quantisers disagree with {description['model']!r} + "
                             f"{PTQConfig.from_dict(description['ptq'])}: {listing(diffs)}")
        problems = _tensor_problems(state, reference_state(skeleton, state), quantizers)
        if not problems:
            averaged = averaged_zero_points(skeleton, quantizers)
            give_described_settings(skeleton, quantizers)
            problems = quantizer_value_problems(skeleton, state, quantizers, averaged) + \
                compensation_problems(description, state)
    except (KeyError, TypeError) as err:
        raise InputError(f"{where} is incomplete or malformed ({type(err).__name__}: {err})") from None
    if problems:
        raise InputError(f"{where}: tensors do not match the model description: {listing(problems)}")


def checksum_problems(state: dict[str, torch.Tensor], digests: dict[str, Any]) -> list[str]:
    """Tensors missing, unexpected, or whose bytes are not the ones the description's SHA-256 was taken of."""
    problems = one_sided(digests, state, "missing {}", "unexpected {}")
    return problems + [f"{key} does not match its SHA-256 (the tensor's bytes changed since it was saved)"
                       for key, tensor in state.items() if key in digests and tensor_sha256(tensor) != digests[key]]


def quantizer_differences(expected: nn.Module, actual: dict[str, dict[str, Any]]) -> list[str]:
    """How the quantisers a config builds differ from the described ones: kind, bits, and every setting the
    quantiser declares (:attr:`Quantizer.settings`; a value a later step may give it, such as the per-tensor axis
    of a reparameterised quantiser, is no difference)."""
    built = {name: q for name, q in expected.named_modules() if isinstance(q, Quantizer)}
    diffs = one_sided(built, actual, "{}: the model has no such quantiser", "{}: the config does not quantise it")
    for name, spec in actual.items():
        q = built.get(name)
        if q is None:
            continue
        if q.kind != spec["kind"]:
            diffs.append(f"{name}: the model's quantiser is {spec['kind']}, the config gives {q.kind}")
        elif q.n_bits != spec["n_bits"]:
            diffs.append(f"{name}: the model quantises to {spec['n_bits']} bits, the config to {q.n_bits}")
        else:
            diffs += _setting_differences(name, q, spec)
    return diffs


def _setting_differences(name: str, q: Quantizer, spec: dict[str, Any]) -> list[str]:
    """Declared settings whose described value is neither the config's nor an adjustable one. A setting the
    description lacks was saved before the quantiser declared it: the config's value stands (see
    :func:`qwt.serialization.skeleton.give_described_settings`), and the tensors' shapes are checked against it."""
    diffs = []
    for setting in q.settings:
        if setting not in spec:
            continue
        value, built = spec[setting], getattr(q, setting)
        if value != built and value not in q.adjustable_settings.get(setting, ()):
            diffs.append(f"{name}: the model's {setting} is {value!r}, the config's {built!r}")
    return diffs


def _quantizer_buffer_shape(key: str, quantizers: dict[str, Any]) -> tuple[int, ...] | None:
    """The shape a quantiser's calibrated buffer has according to the description (None: not such a buffer)."""
    owner, _, leaf = key.rpartition(".")
    spec = quantizers.get(owner)
    if spec is None:
        return None
    if leaf in ("delta", "zero_point"):
        return tuple(spec["shape"])
    return tuple(spec["offset_shape"]) if leaf == "offset" and "offset_shape" in spec else None


def _tensor_problems(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                     quantizers: dict[str, dict[str, Any]]) -> list[str]:
    """Tensors without the dtype and shape the structure implies, or with values that are not finite."""
    problems = one_sided(reference, state, "missing {}", "unexpected {}")
    for key, tensor in state.items():
        ref = reference.get(key)
        if ref is None:
            continue
        described = _quantizer_buffer_shape(key, quantizers)
        shape = described if described is not None else tuple(ref.shape)
        if tensor.dtype != ref.dtype:
            problems.append(f"{key} is {tensor.dtype}, expected {ref.dtype}")
        elif tuple(tensor.shape) != shape:
            problems.append(f"{key} has shape {tuple(tensor.shape)}, expected {shape}")
        elif tensor.is_floating_point() and not all_finite(tensor):
            problems.append(f"{key} holds NaN or Inf")
    return problems
