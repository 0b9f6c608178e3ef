"""Shared helpers for backbone tests: tiny architectures and the parity fixture location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Parity fixtures recorded from the published code (see /work/shared/parity/README.md); tests that need them
# are skipped when the folder is absent (e.g. on a machine without the shared material).
PARITY_DIR = Path(os.environ.get("INCONTEXT_PARITY_DIR", "/work/shared/parity"))


@pytest.fixture
def parity_dir() -> Path:
    if not PARITY_DIR.is_dir():
        pytest.skip(f"parity fixtures not found at {PARITY_DIR} (set INCONTEXT_PARITY_DIR)")
    return PARITY_DIR
