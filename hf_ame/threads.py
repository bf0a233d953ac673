"""Threads of a merge on CPU: one intra-op thread per worker, the work split across blocks.

torch runs each operation on all its intra-op threads (OpenMP), one parallel region per operation
with a barrier at its end. A streamed merge does thousands of small operations (a few per block of
2**18 coordinates); when another process holds the cores, every barrier waits for a descheduled
thread, and the merge ran 5-30x slower (issue 34). So while a merge streams blocks, operations run
on one thread each and the blocks of a tensor are merged by ``width`` workers side by side (each
reading its own block): no barrier per operation, the same total work. ``width`` is
``torch.get_num_threads()`` when the merge starts, so ``OMP_NUM_THREADS`` and
``torch.set_num_threads`` set by the user are obeyed (1: no workers, everything in the caller's
thread). Whole-tensor work (merge methods, which rank and normalise over a tensor) runs with the
user's thread count as before (:func:`intra_op`). Elementwise results do not depend on the thread
count, so the bytes are the same either way.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
from typing import Any, Callable, Iterator, Optional

import torch

__all__ = ["merge_threads", "intra_op", "run_in_order"]


@contextlib.contextmanager
def merge_threads() -> Iterator[Optional[cf.ThreadPoolExecutor]]:
    """A pool of ``torch.get_num_threads()`` workers whose operations run on one thread each, or None
    when that count is 1; the caller's thread count is restored on exit."""
    width = torch.get_num_threads()
    if width <= 1:
        yield None
        return
    torch.set_num_threads(1)  # before the workers start: each reads it once, at its first operation
    pool = cf.ThreadPoolExecutor(max_workers=width, thread_name_prefix="hf_ame-merge")
    pool.width = width  # type: ignore[attr-defined]
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(width)


@contextlib.contextmanager
def intra_op(pool: Optional[cf.ThreadPoolExecutor]) -> Iterator[None]:
    """Whole-tensor work in the caller's thread with the user's thread count while ``pool`` (from
    :func:`merge_threads`) has set it to 1; a no-op without a pool. The pool's workers keep one
    thread each (a thread's count is fixed at its first operation)."""
    if pool is None:
        yield
        return
    torch.set_num_threads(pool.width)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch.set_num_threads(1)


def run_in_order(pool: cf.ThreadPoolExecutor, work: Callable[[int], Any], count: int) -> None:
    """``work(0) .. work(count - 1)`` on ``pool``, at most two per worker queued at once (bounded
    memory); the first error, in index order, is raised once every started call has finished."""
    limit = 2 * getattr(pool, "width", 2)
    pending: collections.deque = collections.deque()
    try:
        for k in range(count):
            if len(pending) >= limit:
                pending.popleft().result()
            pending.append(pool.submit(work, k))
        while pending:
            pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        cf.wait(list(pending))
