"""glibc's allocator during a merge: large temporaries reused from the heap, not mapped afresh each time.

A merge allocates float32 temporaries the size of a tensor (a method's task vectors, an optimizer's
state) again and again. glibc serves an allocation above its mmap threshold (128 KiB, adapting up to
32 MiB) with a new mapping, zero-filled page by page on first touch and unmapped when freed: on this
2-core machine the robust preset over 4 x 309 MiB spent 2.7 s of system time in 1.2 million page
faults beside 2.6 s of arithmetic (issue 34). During a merge, :func:`heap_reuse` raises the mmap and
trim thresholds so such blocks come from the heap and are reused (a worker thread's arena grows in
heaps of at most 64 MiB, so larger tensors merge on the caller's thread:
``plan.SIDE_BY_SIDE_MAX_BYTES``); on exit both are set back to glibc's initial values (the mmap
threshold then no longer adapts) and the free heap is returned to the system (``malloc_trim``). Only
with glibc; left alone when the user set a ``MALLOC_*`` variable or ``GLIBC_TUNABLES``, preloads another
allocator (``LD_PRELOAD``), or sets ``HF_AME_MALLOC=0``. The bytes merged are the same: only where
memory comes from changes.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from typing import Iterator, Optional

__all__ = ["heap_reuse"]

# mallopt parameters (malloc.h) and glibc's initial values
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_INITIAL = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024}
# blocks up to 256 MiB from the heap (a 7B model's layer tensors in float32); up to 256 MiB kept free at its top
_DURING = {_M_TRIM_THRESHOLD: 256 << 20, _M_MMAP_THRESHOLD: 256 << 20}

_lock = threading.Lock()
_depth = 0  # nested or concurrent merges in one process: set once, restored by the last to leave


def _glibc() -> Optional[ctypes.CDLL]:
    """The C library when it is glibc and nobody asked for another allocator or other settings."""
    if os.environ.get("HF_AME_MALLOC", "1") == "0" or os.environ.get("LD_PRELOAD"):
        return None
    if any(k.startswith("MALLOC_") or k.startswith("GLIBC_TUNABLES") for k in os.environ):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError on musl, macOS, Windows
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def heap_reuse() -> Iterator[bool]:
    """Within the block, large allocations come from a shared heap that is kept between tensors
    (yields whether the settings were applied)."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            for param, value in _DURING.items():
                libc.mallopt(param, value)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for param, value in _INITIAL.items():
                    libc.mallopt(param, value)
                libc.malloc_trim(0)
