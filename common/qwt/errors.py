"""The one exception type for bad user input, so every command line can turn it into the same exit code."""
from __future__ import annotations


class InputError(ValueError):
    """A problem with what the user passed (a path, a count, a flag, a file's contents), not a bug.

    A ``ValueError`` subclass so library callers that already catch ``ValueError`` keep working.
    """
