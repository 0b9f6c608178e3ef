"""``python -m incontext.weights``: print where each known pretrained weight was found, or how to get it.

The table and the lookup live in :mod:`incontext.backbones.weights`; this module is only the command.
"""

from __future__ import annotations

from incontext.backbones.weights import KNOWN_WEIGHTS, find, main, resolve, status_lines

__all__ = ["KNOWN_WEIGHTS", "find", "resolve", "status_lines", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
