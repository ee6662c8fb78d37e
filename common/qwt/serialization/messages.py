"""How the checks word what they found: a bounded listing, and names found on one side only."""
from __future__ import annotations

from collections.abc import Iterable

SHOWN = 5  # differences listed in an error message


def listing(items: list[str], separator: str = "; ") -> str:
    """The first :data:`SHOWN` items, and how many more there are: an error message stays readable however many
    problems a damaged or forged save has."""
    more = f"{separator}… {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return separator.join(items[:SHOWN]) + more


def one_sided(expected: Iterable[str], actual: Iterable[str], absent: str, extra: str) -> list[str]:
    """Names found on one side only, as messages: ``absent`` / ``extra`` are formats with ``{}`` for the name."""
    expected, actual = list(expected), list(actual)
    exp, act = set(expected), set(actual)
    return [absent.format(k) for k in expected if k not in act] + [extra.format(k) for k in actual if k not in exp]
