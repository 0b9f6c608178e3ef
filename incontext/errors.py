"""Exceptions raised by incontext for problems the user can fix.

Both are subclasses of built-in exceptions so that callers catching ``ValueError`` or
``FileNotFoundError`` keep working; ``infer.py`` prints their message as one line.
"""

from __future__ import annotations

__all__ = ["InputError", "WeightsNotFoundError"]


class InputError(ValueError):
    """Bad user input; the message names the argument, the value and the fix."""


class WeightsNotFoundError(FileNotFoundError):
    """A pretrained weight file is missing locally.

    The message names the missing file, where it looked, how to get it and the config key to set.
    """
