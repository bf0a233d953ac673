"""Threads of a merge on CPU: one intra-op thread per worker, the work split across blocks or tensors.

torch runs each operation on all its intra-op threads (OpenMP), one parallel region per operation
with a barrier at its end. A streamed merge does thousands of small operations (a few per block of
2**18 coordinates); when other processes hold the cores, every barrier waits for a descheduled
thread: beside two small fine-tunes on this 2-core machine a soup of 4 x 325 MB took 11.4 s instead
of 0.56 s, and AdamW-AME 33 s instead of 2.1 s (issue 34, ``benchmarks/speed.py --busy``). So during
a merge every operation runs on one thread, and the blocks of a tensor are merged by ``width``
workers side by side (each reading its own block): no barrier per operation, the same total work.
``width`` is ``torch.get_num_threads()`` when the merge starts, so ``OMP_NUM_THREADS`` and
``torch.set_num_threads`` set by the user are obeyed (1: no workers, everything in the caller's
thread), and the user's count is restored afterwards. Tensors merged whole (merge methods, which rank
and normalise over a tensor) go to the same workers, one tensor per worker, written in plan order
(the plan's ``side_by_side``; tensors over 32 MiB in float32 stay on the caller's thread): TIES over
4 x 47 MiB Llamas 11.2 s -> 6.2 s on this machine (``benchmarks/speed.py --scale small``).
Elementwise results and each tensor's own arithmetic do not depend on the thread count, so the bytes
are the same either way (tested).
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
from typing import Any, Callable, Iterator, Optional

import torch

__all__ = ["merge_threads", "run_in_order"]


def _one_thread() -> None:
    """A worker's own OpenMP and MKL thread counts set to 1, as the caller's are: a new thread starts
    with the defaults, and LAPACK's results (the SVD of tsv / iso_*) depend on that count."""
    torch.set_num_threads(1)


@contextlib.contextmanager
def merge_threads() -> Iterator[Optional[cf.ThreadPoolExecutor]]:
    """A pool of ``torch.get_num_threads()`` workers, every operation of the merge on one thread
    meanwhile, or None when that count is 1; the caller's thread count is restored on exit."""
    width = torch.get_num_threads()
    if width <= 1:
        yield None
        return
    torch.set_num_threads(1)  # before the workers start: each reads it once, at its first operation
    pool = cf.ThreadPoolExecutor(max_workers=width, thread_name_prefix="hf_ame-merge", initializer=_one_thread)
    pool.width = width  # type: ignore[attr-defined]
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(width)


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
