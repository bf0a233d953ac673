"""glibc's heap during a merge: block-sized buffers reused, not mapped and faulted in anew.

A merge on CPU allocates and frees a few MiB per cache block (the N copies' slices, the float32
merge, an optimizer's state, the output block), thousands of times per model. glibc maps an
allocation above its mmap threshold afresh and gives the top of a heap back to the kernel beyond
its trim threshold (dynamic defaults: up to 32 MiB and twice that, but a worker thread's heap
shrinks sooner), so each block's buffers were faulted in page by page again. AdamW-AME, 1 epoch,
4 x 309 MiB bf16 Llamas (``torch._dynamo`` imported beforehand, this project's 2-core machine):
493-513 thousand page faults and 1.09-1.11 s; inside :func:`block_heap` 9-10 thousand and
0.68-0.75 s (3 runs each). The soup and the robust preset already reused their few buffers and
are unchanged. During a merge, allocations up to 4 MiB come from the heap and up to 64 MiB of
freed heap stays mapped; larger tensors are still mapped and unmapped whole. A worker's heap then
holds up to twice its live block buffers, which the plan's memory estimate counts
(:func:`keeps_blocks`). Afterwards the freed memory is given back (``malloc_trim``) and the
thresholds are left where glibc's dynamic rule ends in a process that has freed a 32 MiB tensor
(32 MiB and 64 MiB: setting any of them turns that rule off for good, so they cannot be put back
as they were). A user who set these parameters themselves (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or ``MALLOC_MMAP_MAX_``, even empty, or the same
``glibc.malloc.*`` tunables in ``GLIBC_TUNABLES``, as glibc read them when the process started)
keeps them: nothing is changed; nor with another C library or another system.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from typing import Any, Iterator, Optional

__all__ = ["block_heap", "keeps_blocks"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_DURING = {_M_MMAP_THRESHOLD: 4 << 20, _M_TRIM_THRESHOLD: 64 << 20}
_AFTER = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 64 << 20}  # glibc's dynamic maximum and twice it
_USER_SET = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.top_pad",
                  "glibc.malloc.mmap_max")

_lock = threading.Lock()
_active = 0  # merges running now (the UI and the greedy modes may nest or overlap them)


def _glibc() -> Optional[Any]:
    """glibc's malloc functions, or None (another C library, or the user set its parameters)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (not sys.platform.startswith("linux") or any(k in os.environ for k in _USER_SET)
            or any(t in tunables for t in _USER_TUNABLES)):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError, TypeError):
        return None


def keeps_blocks() -> bool:
    """Whether a merge in this process keeps freed block buffers mapped for the next blocks (glibc,
    malloc parameters not set by the user): its blocks then hold up to twice their live bytes
    (measured 2.0-2.2x, tests/test_plan.py), which the plan's memory estimate counts."""
    return _glibc() is not None


def _set(libc: Any, values: dict) -> None:
    for param, value in values.items():
        libc.mallopt(ctypes.c_int(param), ctypes.c_int(value))


@contextlib.contextmanager
def block_heap() -> Iterator[None]:
    """glibc's heap tuned for block buffers while merges run, then trimmed (see the module)."""
    global _active
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        if _active == 0:
            _set(libc, _DURING)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                _set(libc, _AFTER)
                libc.malloc_trim(ctypes.c_size_t(0))
