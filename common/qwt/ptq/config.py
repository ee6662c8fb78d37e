"""What to quantise and how: one frozen config applied to a model (the torchao style)."""
from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal

from ..quant.quantizers import MAX_BITS, MIN_BITS, check_bits
from ..typed_fields import check_fields
from .baselines import Baseline, make_baseline, resolve_baseline

if TYPE_CHECKING:  # the family module imports this one
    from ..family import Family

LayerMap = Literal["qwt", "repq_vit"]
#: ``a_bits`` value that leaves every activation in float: weights-only quantisation (W4A16, W3A16).
FLOAT_ACTIVATIONS = 16
_BIT_TAG = re.compile(r"^W(\d+)A(\d+)$")
#: The previous release's names of the baseline keys (``method``): still read from saved models and records.
_OLD_KEYS = {"method": "baseline", "method_options": "baseline_options"}
#: Tells a ``method=`` left out from ``method=None`` (the family's default, as ``baseline=None``).
_NOT_GIVEN: Any = object()


def bit_tag(w_bits: int, a_bits: int, conv_act_bits: int | None = None) -> str:
    """:attr:`PTQConfig.tag` from the bit settings alone (a run's record name is known before its config)."""
    tag = f"W{w_bits}A{a_bits}"
    if conv_act_bits is not None and conv_act_bits != a_bits:
        tag += f"-convA{conv_act_bits}"
    return tag


def parse_bit_tag(tag: str) -> tuple[int, int]:
    """``(w_bits, a_bits)`` of a ``W4A8`` tag (:func:`bit_tag`'s form without a conv width); the widths are
    checked where they are used (:class:`PTQConfig`)."""
    match = _BIT_TAG.match(tag)
    if match is None:
        raise ValueError(f"expected W<bits>A<bits>, e.g. W4A8 or W3A16 (A16: weights only), got {tag!r}")
    return int(match[1]), int(match[2])


def _accept_old_method_keyword(cls: type[PTQConfig]) -> type[PTQConfig]:
    """``PTQConfig(method=...)``, the previous release's name of ``baseline``, still accepted (keyword only, with
    a DeprecationWarning) for one release. Wrapping the generated ``__init__`` keeps the fields declared once and
    leaves ``fields()``, ``replace()``, equality, hashing and repr to the dataclass."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: PTQConfig, *args: Any, method: Any = _NOT_GIVEN, **kwargs: Any) -> None:
        if method is not _NOT_GIVEN:
            if args or "baseline" in kwargs:
                raise ValueError("PTQConfig got both baseline and method (its former name): give baseline only")
            warnings.warn("PTQConfig(method=...) is renamed PTQConfig(baseline=...); method will be removed in the "
                          "next release", DeprecationWarning, stacklevel=2)
            kwargs["baseline"] = method
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


@_accept_old_method_keyword
@dataclass(frozen=True)
class PTQConfig:
    """Post-training quantisation settings.

    baseline: a registered baseline's name or a :class:`~qwt.ptq.baselines.Baseline` instance (stored as the
        instance): ``repq_vit`` (channel-wise post-LayerNorm inputs reparameterised, log-√2 post-softmax),
        ``percentile`` (every activation per tensor, uniform softmax quantiser, no reparameterisation), ``gptq``
        (GPTQ-rounded weights, activations as the family's default baseline), ``rtn``, or your own. None (the
        default): the model family's ``default_baseline``, filled in by :meth:`for_family` where the family is
        known (``qwt.quantize``, ``qwt.save_quantized``, the task CLIs), so what runs and what is recorded is
        always a concrete baseline. ``method=`` (keyword only), its former name, is accepted until the next
        release.
    a_bits: 2..8, or 16 (:data:`FLOAT_ACTIVATIONS`): no activation quantiser anywhere (weights only).
    layer_map: ``qwt`` keeps patch-embed and classifier head at W8A8 as the QwT authors do; ``repq_vit`` is
        RepQ-ViT's original map (patch-embed input 8-bit, weights and head at W/A bits).
    log_floor: clamp of x/Δ before log2 in the log-√2 quantiser (QwT authors: 1e-6; RepQ-ViT: None).
    conv_act_bits: CNNs only; force every conv input to this width. The first release of the authors' ResNet
        code did this with 8 bits, so its "W4/A4" table was really W4/A8. None = use ``a_bits``.
    """

    baseline: Baseline | str | None = None
    w_bits: int = 4
    a_bits: int = 4
    layer_map: LayerMap = "qwt"
    log_floor: float | None = 1e-6
    conv_act_bits: int | None = None

    def __post_init__(self) -> None:
        if self.baseline is not None:
            object.__setattr__(self, "baseline", resolve_baseline(self.baseline))
        check_fields(self, "PTQConfig")
        if self.layer_map not in ("qwt", "repq_vit"):
            raise ValueError(f"unknown layer map {self.layer_map!r}; choose 'qwt' or 'repq_vit'")
        check_bits(self.w_bits)
        if self.a_bits != FLOAT_ACTIVATIONS:
            try:
                check_bits(self.a_bits)
            except ValueError:
                raise ValueError(f"a_bits must be an integer in {MIN_BITS}..{MAX_BITS}, or {FLOAT_ACTIVATIONS} to "
                                 f"leave activations in float (weights only), got {self.a_bits!r}") from None
        if self.float_activations and isinstance(self.baseline, Baseline):
            _refuse_activation_options(self.baseline)
        if self.conv_act_bits is not None:
            check_bits(self.conv_act_bits)
            if self.float_activations:
                raise ValueError(f"conv_act_bits has no effect with a_bits={FLOAT_ACTIVATIONS} (no activation is "
                                 "quantised); leave it unset")
        if self.log_floor is not None and not (isinstance(self.log_floor, (int, float)) and 0 < self.log_floor < 1):
            raise ValueError(f"log_floor must be in (0, 1) or None (no floor), got {self.log_floor!r}")

    def for_family(self, family: Family) -> PTQConfig:
        """This config as it runs on ``family``: the baseline filled in with the family's default when unset, any
        choice the baseline leaves to the family made (GPTQ's activation partner), and refused (ValueError, one
        line) if the family cannot run it. Resolving a resolved config returns an equal one."""
        baseline = make_baseline(family.default_baseline) if self.baseline is None else self.baseline
        baseline = baseline.for_family(family)
        baseline.check_family(family)
        return replace(self, baseline=baseline)

    def resolved_baseline(self) -> Baseline:
        """The baseline that runs; refuses a config whose baseline is still its family's default (not resolved),
        so that nothing quantises, records or saves "the default" without knowing which one it is."""
        if self.baseline is None:
            raise ValueError("PTQConfig(baseline=None) means the model family's default baseline, which is not "
                             "chosen yet: resolve the config with config.for_family(family) first (qwt.quantize "
                             "does)")
        return self.baseline

    @property
    def method(self) -> Baseline | None:
        """The previous release's name of :attr:`baseline`, read for one more release (DeprecationWarning)."""
        warnings.warn("PTQConfig.method is renamed PTQConfig.baseline; method will be removed in the next release",
                      DeprecationWarning, stacklevel=2)
        return self.baseline

    @property
    def float_activations(self) -> bool:
        """Weights only: no activation is quantised."""
        return self.a_bits == FLOAT_ACTIVATIONS

    @property
    def tag(self) -> str:
        """The bit label of rows, tables and file names: ``W4A4`` (``W3A16``: weights only), or ``W4A4-convA8``
        when conv inputs have their own width (every setting that changes the arithmetic shows, so a W4A8-conv run
        never passes for W4A4)."""
        return bit_tag(self.w_bits, self.a_bits, self.conv_act_bits)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values; the baseline by name, with ``baseline_options`` for a baseline that has some.
        Only a resolved config has them (a record or saved model names the baseline that ran)."""
        baseline = self.resolved_baseline()
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["baseline"] = baseline.name
        options = baseline.options()
        if options:
            data["baseline_options"] = options
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PTQConfig:
        """The config :meth:`to_dict` wrote; the previous release's ``method``/``method_options`` keys are read
        too, so that its saved models still load."""
        data = dict(data)
        for old, new in _OLD_KEYS.items():
            if old in data:
                if new in data:
                    raise ValueError(f"a PTQ config gives both {new!r} and {old!r} (its former name): keep {new!r}")
                data[new] = data.pop(old)
        options = data.pop("baseline_options", None)
        if "baseline" in data:
            data["baseline"] = make_baseline(data["baseline"], options)
        return cls(**data)


def _refuse_activation_options(baseline: Baseline) -> None:
    """With ``a_bits=16`` nothing is quantised that the baseline's activation-only options shape: one set away from
    its default would be recorded as if it had run."""
    given = {k: v for k, v in baseline.chosen_options().items() if k in baseline.activation_options}
    if given:
        options = ", ".join(f"{k}={v}" for k, v in given.items())
        raise ValueError(f"{baseline.name} option {options} shapes the activation quantisers, and a_bits="
                         f"{FLOAT_ACTIVATIONS} leaves activations in float (weights only); drop it for this setting")
