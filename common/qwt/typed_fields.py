"""Dataclass fields checked and parsed by their type hints: one place for what a setting may hold.

Python does not enforce hints, and a wrongly typed setting runs silently as something else (``act_order="no"``
is truthy, ``group_size=True`` is a group of one column). Settings dataclasses (PTQ baselines, QwT and PTQ
configs) call :func:`check_fields` in ``__post_init__``; command lines read ``NAME=VALUE`` text with
:func:`parse_field`. Only plain types are checked here (bool, int, float, str, None and unions of them); a hint
such as ``Literal[...]`` is left to the class's own range checks.
"""
from __future__ import annotations

import functools
import math
import re
import types
from dataclasses import fields
from typing import Any, Union, get_args, get_origin, get_type_hints

#: How each plain type reads in messages; on the command line every form shown is accepted (any case).
_TYPE_WORDS: dict[type, str] = {bool: "True or False", int: "an integer", float: "a number",
                                str: "text", type(None): "None"}
_INTEGER = re.compile(r"[+-]?[0-9]+")


@functools.cache
def field_types(cls: type) -> dict[str, tuple[Any, ...]]:
    """Each dataclass field of ``cls`` and the types its hint allows: ``int | None`` → (int, NoneType)."""
    hints = get_type_hints(cls)
    types_of = {}
    for field in fields(cls):
        hint = hints[field.name]
        types_of[field.name] = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    return types_of


def _fits(value: Any, kind: Any) -> bool:
    """Whether ``value`` is of the plain type ``kind``: bools are not integers, floats are not NaN (an integer
    is a float; ±inf is left to the class's range checks: ``r2_threshold=-inf`` means "no gate"); a hint that is
    not a plain class (``list[int]``, ``Literal``) is left to the class."""
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if kind is type(None):
        return value is None
    return not isinstance(kind, type) or isinstance(value, kind)


def describe(kinds: tuple[Any, ...]) -> str:
    """``kinds`` in words, for messages: "an integer or None"."""
    return " or ".join(_TYPE_WORDS.get(kind, getattr(kind, "__name__", str(kind))) for kind in kinds)


def check_fields(obj: Any, what: str) -> None:
    """Refuse (ValueError naming ``what``, the field and the value) a field whose value its hint does not allow,
    and store a whole number given for a float-only field as a float, so that what is recorded is what ran.
    ``obj`` may be frozen."""
    for name, kinds in field_types(type(obj)).items():
        value = getattr(obj, name)
        if not any(_fits(value, kind) for kind in kinds):
            raise ValueError(f"{what} {name} takes {describe(kinds)}, got {value!r}")
        if float in kinds and type(value) is int and int not in kinds:
            object.__setattr__(obj, name, float(value))


def _parse(text: str, kind: Any) -> tuple[bool, Any]:
    """(True, value) if ``text`` reads as the plain type ``kind``, else (False, None)."""
    word = text.strip().lower()
    if kind is type(None):
        return word == "none", None
    if kind is bool:
        return word in ("true", "false"), word == "true"
    if kind is int:
        return (True, int(text)) if _INTEGER.fullmatch(text.strip()) else (False, None)
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            return False, None
        return math.isfinite(value), value
    return (True, text) if kind is str else (False, None)


def parse_field(cls: type, name: str, text: str) -> tuple[bool, Any]:
    """(True, value) if command-line ``text`` reads as one of the types field ``name`` of ``cls`` allows, in
    the hint's order (booleans true/false, integers, finite numbers, ``none`` where None is allowed, text as
    is); else (False, None)."""
    for kind in field_types(cls)[name]:
        ok, value = _parse(text, kind)
        if ok:
            return True, value
    return False, None
