"""What a PTQ baseline is: a small type whose hooks say which quantiser goes where and what runs after
calibration; baselines register by name so configs, command lines and saved models keep naming them.

The surgery walk asks the baseline for each quantiser it places (weights; inputs after a norm; the post-softmax
operand; every other activation), and the PTQ sequence calls :meth:`Baseline.after_calibration` once the
calibration forward has fitted every quantiser. Nothing else in the library knows which baseline it runs.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from ...errors import InputError
from ...quant.quantizers import Quantizer, UniformQuantizer
from ...registry import Registry
from ...typed_fields import check_fields, describe, field_types, parse_field

if TYPE_CHECKING:  # the family module imports the PTQ config, which imports this one
    from ...family import Family
    from .. import CalibrationForward, PhaseHook
    from ..reparameterize import NormLinearPairs


def act_quantizer(bits: int, per_channel: bool = False) -> UniformQuantizer:
    """Activation quantiser: per tensor, or per channel along the last (feature) axis."""
    return UniformQuantizer(bits, channel_axis=-1 if per_channel else None)


def weight_quantizer(bits: int) -> UniformQuantizer:
    """Weight quantiser: per output channel."""
    return UniformQuantizer(bits, channel_axis=0)


@dataclass(frozen=True)
class Baseline:
    """A PTQ baseline. Subclasses are frozen dataclasses (their fields are the baseline's options, saved with a
    model) with a class-level ``name``; the defaults below are plain round-to-nearest with per-tensor uniform
    activations and per-channel uniform weights."""

    name: ClassVar[str]
    #: One line for ``--help`` and error messages.
    summary: ClassVar[str] = ""
    #: Options that shape only the activation quantisers: with ``a_bits=16`` (weights only) they do nothing, so a
    #: value other than the default is refused there and a row of such a run does not name them.
    activation_options: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        """Refuse an option whose value its type hint does not allow (``act_order="no"`` would run as true),
        and store a whole number given for a float option as a float, so that what is recorded is what ran.
        A subclass with its own ``__post_init__`` calls this one first."""
        check_fields(self, f"{type(self).__name__} option")

    def check_family(self, family: Family) -> None:
        """Refuse (ValueError, one line naming the fix) a family that lacks what this baseline needs."""

    def for_family(self, family: Family) -> Baseline:
        """This baseline as it runs on ``family``: itself, unless it leaves a choice to the family (GPTQ with
        ``activations=None`` takes the family's default baseline as its activation partner). Called once, by
        :meth:`PTQConfig.for_family <qwt.ptq.config.PTQConfig.for_family>`; the result is what is saved."""
        return self

    def activation_baseline(self) -> Baseline:
        """The baseline whose activation hooks and post-calibration step apply: itself, unless it only decides
        weights (see GPTQ)."""
        return self

    def weight_quantizer(self, bits: int) -> Quantizer:
        return weight_quantizer(bits)

    def activation_quantizer(self, bits: int) -> Quantizer:
        """Any activation without a more specific hook below."""
        return act_quantizer(bits)

    def post_norm_quantizer(self, bits: int) -> Quantizer:
        """The input of a Linear fed by a LayerNorm."""
        return self.activation_quantizer(bits)

    def softmax_quantizer(self, bits: int, log_floor: float | None) -> Quantizer:
        """The attention probabilities (the first operand of attn @ v)."""
        return self.activation_quantizer(bits)

    def after_calibration(self, model: nn.Module, data: Any, forward: CalibrationForward, pairs: NormLinearPairs,
                          on_phase: PhaseHook | None) -> list[str]:
        """Runs once every quantiser is calibrated (weights rounded to nearest so far); returns the names of the
        norms it reparameterised. ``data``/``forward`` are the calibration set (or :func:`qwt.quantize`'s
        ``post_calibration_data``; a :class:`qwt.ptq.Batches` runs the forward once per batch) and its forward."""
        return []

    def options(self) -> dict[str, Any]:
        """The baseline's settings as saved with a model (empty for a baseline without options)."""
        return asdict(self)

    def chosen_options(self) -> dict[str, Any]:
        """The options set away from their defaults: what tells this baseline apart in a row's name (GPTQ's
        resolved activation partner included); :meth:`options` has them all."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}


def parse_options(method: str | type[Baseline], pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Typed options of the baseline ``method`` (a registered name or class) from command-line ``NAME=VALUE``
    text, read against the option's type hint: booleans true/false, integers, finite numbers, ``none`` where
    the hint allows None, text as is (any case for the words). A later pair replaces an earlier one. Refuses an
    unknown name or a value its type does not take (InputError, one line naming option, value and types)."""
    cls = _BASELINES.lookup(method) if isinstance(method, str) else method
    pairs = list(pairs)
    _refuse_unknown(cls, [name for name, _ in pairs])
    options = {}
    for name, text in pairs:
        ok, options[name] = parse_field(cls, name, text)
        if not ok:
            raise InputError(f"PTQ method {cls.name!r} option {name}={text}: expected "
                             f"{describe(field_types(cls)[name])}")
    return options


_BASELINES: Registry[type[Baseline]] = Registry("PTQ method")


def register_baseline(cls: type[Baseline]) -> type[Baseline]:
    """Class decorator: make ``cls`` available by its ``name`` (``--method NAME``, saved models)."""
    return _BASELINES.add(cls.name, cls)


def list_baselines() -> list[str]:
    return sorted(_BASELINES)


def make_baseline(name: str, options: dict[str, Any] | None = None) -> Baseline:
    """The registered baseline ``name`` with ``options`` (its dataclass fields); unknown options are refused."""
    cls = _BASELINES.lookup(name)
    options = options or {}
    _refuse_unknown(cls, options)
    return cls(**options)


def _refuse_unknown(cls: type[Baseline], names: Iterable[str]) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"PTQ method {cls.name!r} has no option(s) {', '.join(unknown)}"
                         f"{'; it takes ' + ', '.join(sorted(known)) if known else ''}")


def resolve_baseline(baseline: str | Baseline) -> Baseline:
    """A baseline instance from a registered name or an instance."""
    if isinstance(baseline, Baseline):
        return baseline
    if not isinstance(baseline, str):
        raise ValueError(f"baseline must be a registered PTQ baseline's name or a Baseline, got {baseline!r}")
    return make_baseline(baseline)


__all__ = ["Baseline", "act_quantizer", "weight_quantizer", "register_baseline", "list_baselines", "make_baseline",
           "resolve_baseline", "parse_options"]
