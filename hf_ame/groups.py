"""Small tensors merged together by the fused kernels: one launch per soup and per step for a group.

A Triton kernel launched from Python costs 20-50 us of host time (``benchmarks/gpu.py`` on an
H200), while a norm's 2048 elements, or a 1M-element projection of 4 bf16 copies, are 1-3 us of HBM
traffic: merged one at a time such tensors leave the GPU waiting on launches (issue 34). So the plan
groups tensors of one rank, device and input dtype, each of at most ``GROUP_MAX_ELEMENTS``
elements, up to ``GROUP_MAX_BYTES`` of inputs and ``GROUP_MAX_TENSORS`` tensors, wherever the fused
kernels merge them (CUDA; CPU under Triton's interpreter, in tests). The executor holds a group's
copies as it reads them in plan order, merges the group once its last tensor is read, with
:func:`hf_ame.kernels.fused_soup_many` / :func:`~hf_ame.kernels.fused_merge_many` (the same
arithmetic as one launch each: the same bits), and writes its tensors then (the writer takes
tensors in any order). So with several bad tensors (NaN or Inf) the error may name a later, larger
one than without groups: the one merged first.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Dict, List

__all__ = ["GROUP_MAX_ELEMENTS", "GROUP_MAX_BYTES", "GROUP_MAX_TENSORS", "group_small"]

GROUP_MAX_ELEMENTS = 1 << 20
GROUP_MAX_BYTES = 64 << 20
GROUP_MAX_TENSORS = 256
_KERNEL_DTYPES = ("float32", "bfloat16", "float16")


def _groupable(t: Any, fused: Callable[[str], bool]) -> bool:
    dtypes = {s.dtype for s in t.sources}
    return (t.transform in ("soup", "ame") and t.reader == "tensors" and 0 < t.numel <= GROUP_MAX_ELEMENTS
            and len(dtypes) == 1 and dtypes <= set(_KERNEL_DTYPES) and fused(t.device))


def group_small(tensors: List[Any], fused: Callable[[str], bool]) -> List[Any]:
    """``tensors`` (:class:`~hf_ame.plan.TensorPlan` s in plan order) with ``group`` set on the small
    ones the fused kernels merge (``fused(device)``): those of one rank, device, input and output dtype
    share a number, wherever they lie (a layer's norms and small projections sit between its large
    tensors), within the caps; a group of one is no group."""
    open_groups: Dict[tuple, List[int]] = {}  # key -> [group, tensors, bytes]
    out: List[Any] = []
    count = 0
    for t in tensors:
        if not _groupable(t, fused):
            out.append(t)
            continue
        key = (t.rank, t.device, t.sources[0].dtype, t.dtype)
        g = open_groups.get(key)
        if g is None or g[1] == GROUP_MAX_TENSORS or g[2] + t.read_bytes > GROUP_MAX_BYTES:
            g = open_groups[key] = [count, 0, 0]
            count += 1
        g[1], g[2] = g[1] + 1, g[2] + t.read_bytes
        out.append(dataclasses.replace(t, group=g[0]))
    sizes = collections.Counter(t.group for t in out)
    return [dataclasses.replace(t, group=-1) if t.group >= 0 and sizes[t.group] == 1 else t for t in out]
