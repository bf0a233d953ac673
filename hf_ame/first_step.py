"""A merge method's first step in one pass over cache blocks, kept when the whole-tensor step decides the same.

The robust preset (method ``huber``, SGD lr 1, the soup as adaptive pivot) merged every tensor
whole: the soup (each copy read and converted to float32), then the Huber step (each copy again, as
float32 copies of the whole tensor, faulted in page by page): 7-10x the soup's time (issue 34). Yet
that step is elementwise once two decisions over the whole tensor are taken: every model weighs 1
(a clean set) and the step moved the merge by under ``tol`` (the iteration stops there). So one
pass over blocks of coordinates computes, per block, the soup, the step and the partial sums of
the norms behind those decisions, and writes the merged block; after the last block the method
(:class:`~hf_ame.methods.FirstStep`) says whether its whole-tensor step would decide the same, with
a margin for the other summation order. Kept: the bytes of the whole-tensor merge (the same
elementwise operations in the same order), each copy read once. Not kept (a model capped, a step
not converged, a non-finite value): the caller merges the tensor whole as before and writes it
over the blocks, so that merge's result (or error) is the one that counts.
"""
from __future__ import annotations

import math
from concurrent.futures import Executor
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .algorithm import AMEStep, Pivot, is_plain_sgd, soup
from .blocks import all_finite
from .config import AMEConfig
from .methods import MethodContext, get_method
from .threads import run_in_order

__all__ = ["first_step_applies", "merge_first_step"]


def first_step_applies(config: AMEConfig, steps: Sequence[AMEStep], pivot: Pivot) -> bool:
    """Whether a merge is the one :func:`merge_first_step` computes: a method with a
    :class:`~hf_ame.methods.FirstStep`, the soup as adaptive pivot, plain SGD whose first step has lr
    1 (w - g: no optimizer state), float32 arithmetic (no rounding through a half compute dtype), and
    every later step the same batch, lr and scale (the stepper stops at the first step that meets the
    method's tolerance, :meth:`~hf_ame.algorithm.AMEStepper.may_stop_after`)."""
    if config.method is None or get_method(config.method).first_step is None or not steps:
        return False
    s = steps[0]
    return (Pivot(*pivot).is_soup and config.adaptive_pivot and is_plain_sgd(config) and s.lr == 1.0
            and config.torch_compute_dtype == config.torch_state_dtype == torch.float32
            and all((r.batch, r.lr, r.scale) == (s.batch, s.lr, s.scale) for r in steps[1:]))


def merge_first_step(fetch: Callable[[int], Sequence[torch.Tensor]], bounds: Sequence[Tuple[int, int]], n: int,
                     config: AMEConfig, steps: Sequence[AMEStep], sink: Callable[[int, torch.Tensor], None], *,
                     out_dtype: torch.dtype, key: str = "tensor0", position: float = 0.0,
                     pool: Optional[Executor] = None) -> bool:
    """One tensor: block k's slices are ``fetch(k)`` (the N ingredients'), its merged block handed to
    ``sink(start, block)`` in ``out_dtype``; blocks side by side on ``pool``'s workers when given.
    Returns whether the result stands (True) or the tensor must be merged whole (False: the blocks
    handed over are to be overwritten). ``key`` / ``position``: the tensor's name and layer (0 to 1),
    which resolve per-tensor parameter values."""
    step, first = steps[0], get_method(config.method).first_step
    sums: List[Optional[List[float]]] = [None] * len(bounds)

    def work(k: int) -> None:
        part = fetch(k)
        p = soup(part[:n], torch.float32)  # the pivot, as initial_merge computes it for the whole tensor
        q, block_sums = first.block(p, [part[j] for j in step.batch])
        if step.scale != 1.0:  # the stepper's g * scale (times 1.0 changes no bit)
            q.mul_(step.scale)
        merged = p.add_(q).to(out_dtype)  # w - g with g = -q: the same bits
        sums[k] = block_sums if all_finite(merged) else [math.nan]
        sink(bounds[k][0], merged)

    if pool is not None:
        run_in_order(pool, work, len(bounds))
    else:
        for k in range(len(bounds)):
            work(k)
    if not bounds or any(math.isnan(s[0]) for s in sums):  # (an empty tensor: merged whole, as it is)
        return False
    totals = [math.fsum(s[i] for s in sums) for i in range(len(sums[0]))]
    ctx = MethodContext(torch.empty(0), lambda i: torch.empty(0), step.batch, config.method_arguments(),
                        int(config.seed), key, step.t, position)
    return first.keep(totals, ctx.param, len(steps) == 1)
