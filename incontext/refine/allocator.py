"""Keep large freed blocks in the process heap (glibc only) so that repeated large temporaries stop page-faulting.

Why: glibc serves allocations above its mmap threshold (dynamic, at most 32 MB) with fresh ``mmap`` pages and
gives freed heap space above its trim threshold back to the OS. SAM's mask decoder allocates and frees tens of
16 MB temporaries per decoder call, so with the defaults a large share of every call is the kernel mapping and
zeroing the same memory again (measured: about 400k minor page faults and 10-15 % of the decoding CPU time for the
154 prompt sets of Matcher's FSS config on SAM ViT-B). Raising both thresholds keeps those blocks in the heap.
Results are unchanged (only where memory comes from changes); peak memory is unchanged, but up to ``trim_mb`` of
freed memory stays mapped to the process.

The setting is process-wide and cannot be undone (glibc stops adapting its thresholds once they are set), which is
why callers expose it as an option (``Matcher(tune_malloc=...)``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper bound on 64-bit systems
_done: tuple[int, int] | None = None


def keep_freed_memory(trim_mb: int = 512) -> bool:
    """Serve blocks up to 32 MB from the heap and keep up to ``trim_mb`` MB of freed heap memory.

    Returns True when the setting is in effect (glibc), False elsewhere (nothing is changed then).
    Calling it again with the same value does nothing.
    """
    global _done
    want = (_MMAP_THRESHOLD_MAX, int(trim_mb) << 20)
    if _done == want:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, want[0]) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, want[1]) == 1
    except (OSError, AttributeError):
        return False
    if ok:
        _done = want
    return ok
