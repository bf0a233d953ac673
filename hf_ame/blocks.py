"""One tensor's merge from its N copies: whole, in cache blocks, or blocks side by side on workers.

The step math is :class:`hf_ame.algorithm.AMEStepper`'s; here is how a tensor is cut and fed to it.
On CPU every coordinate-wise optimizer lets a tensor be merged one block of coordinates at a time,
every step of every epoch per block, so the state stays in cache (bit-identical to a whole-tensor
run); the blocks may be merged by several workers (:mod:`hf_ame.threads`). On a GPU, or for merge
methods (which rank and normalise over a whole tensor), the tensor is merged whole.
"""
from __future__ import annotations

from concurrent.futures import Executor
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch

from .algorithm import AMEStep, AMEStepper, NonFiniteError, Pivot, PivotSpec, initial_merge, non_finite_inputs, soup
from .config import AMEConfig
from .kernels import fused_merge, fused_merge_many, fused_soup, fused_soup_many, fused_supported
from .optimizers import get_optimizer
from .threads import run_in_order

__all__ = ["DEFAULT_BLOCK_SIZE", "all_finite", "can_block", "merge_tensor", "merge_block", "merge_fused",
           "merge_in_blocks", "merge_blocks_on", "block_bounds", "merge_fused_many"]


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: a sum is one fast reduction, ~25x cheaper than isfinite().all() on
    CPU, and finite iff every value is, unless finite values overflow it: then the exact test decides."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_finite(merged: torch.Tensor, ingredients: Sequence[torch.Tensor]) -> torch.Tensor:
    # NaN or Inf in any ingredient reaches the merge (soup and every optimizer step propagate it):
    # checking the result, while it is in cache, catches them and any overflow of the merge itself
    if not all_finite(merged):
        raise NonFiniteError(non_finite_inputs(ingredients))
    return merged


# 2**18 float32 elements = 1 MiB per state tensor: the merge, its pseudogradient and two Adam
# moments of one block stay in L2/L3 across all N x E steps. Measured on the 2-core CI machine
# (32M-element bf16 tensor, N = 4, AdamW, 1 epoch): 0.95 s whole vs 0.14 s in blocks of 2**18;
# 2**16 pays Python overhead per block (0.26-0.39 s), 2**20 starts missing cache (0.18 s).
DEFAULT_BLOCK_SIZE = 2**18


def can_block(config: AMEConfig, device: Optional[torch.device] = None, *, exact_soup: bool = False) -> bool:
    """Whether a tensor may be merged block by block with results identical to a whole-tensor run:
    the optimizer must be coordinate-wise (registry flag) and the work on CPU (on a GPU one kernel
    over the whole tensor is already bandwidth-bound; per-block launches would only add latency)."""
    if device is not None and torch.device(device).type != "cpu":
        return False
    if config.method is not None:  # methods look at whole tensors (magnitude ranks, norms)
        return False
    return exact_soup or get_optimizer(config.optimizer).elementwise


def merge_tensor(
    ingredients: Sequence[torch.Tensor],
    config: AMEConfig,
    steps: Sequence[AMEStep],
    pivot: PivotSpec,
    *,
    base: Optional[torch.Tensor] = None,
    device: Optional[torch.device] = None,
    out_dtype: Optional[torch.dtype] = None,
    exact_soup: bool = False,
    block_size: Optional[int] = DEFAULT_BLOCK_SIZE,
    key: str = "tensor0",
    position: float = 0.0,
    pool: Optional[Executor] = None,
) -> torch.Tensor:
    """Merge one tensor from its N copies (in the given order) along the precomputed ``steps``.

    Returns a tensor in ``out_dtype`` (default: the compute dtype). When :func:`can_block` allows
    it and the tensor has more than ``block_size`` elements (None: never; rounded down to a multiple
    of 64), the merge runs on one block of coordinates at a time, every step of every epoch, so the
    merge state stays in cache while each ingredient's bytes are read once: several times faster on
    CPU, bit-identical.
    ``exact_soup``: the config is spec case 1; compute the exact mean in one pass.
    ``pool``: blocks merged side by side on its workers (:func:`merge_blocks_on`).
    """
    out_dtype = out_dtype or config.torch_compute_dtype
    blocked = block_size is not None and can_block(config, device, exact_soup=exact_soup)
    if blocked:  # (only now look at the inputs: a lazy row would read them all)
        srcs = list(ingredients) + ([base] if base is not None else [])
        numel = srcs[0].numel()
        blocked = numel > block_size and all(t.device.type == "cpu" and t.is_contiguous() for t in srcs)
    if not blocked:
        # a real list on a CUDA device (not a lazy row): one fused kernel per step, output dtype written directly
        if (config.method is None and isinstance(ingredients, (list, tuple))
                and fused_supported(config, device, ingredients)):
            merged = merge_fused(ingredients, config, steps, pivot, base=base, out_dtype=out_dtype,
                                 exact_soup=exact_soup)
        else:
            merged = merge_block(ingredients, config, steps, pivot, base=base, device=device,
                                 exact_soup=exact_soup, key=key, position=position).to(out_dtype)
        return _check_finite(merged, ingredients)
    bounds = block_bounds(numel, block_size)
    flats = [t.view(-1) for t in srcs]
    if pool is not None:
        return merge_blocks_on(pool, lambda k: [f[bounds[k][0]:bounds[k][1]] for f in flats], bounds,
                               ingredients[0].shape, len(ingredients), config, steps, pivot, out_dtype=out_dtype,
                               exact_soup=exact_soup)
    return merge_in_blocks(([f[a:b] for f in flats] for a, b in bounds), bounds, ingredients[0].shape,
                           len(ingredients), config, steps, pivot, device=device, out_dtype=out_dtype,
                           exact_soup=exact_soup)


def merge_in_blocks(blocks: Iterable[Sequence[torch.Tensor]], bounds: Sequence[Tuple[int, int]],
                    shape: Sequence[int], n: int, config: AMEConfig, steps: Sequence[AMEStep], pivot: PivotSpec, *,
                    device: Optional[torch.device] = None, out_dtype: Optional[torch.dtype] = None,
                    exact_soup: bool = False) -> torch.Tensor:
    """Assemble a merged tensor of ``shape`` from its blocks: ``blocks`` yields, for each range of
    ``bounds`` (flat coordinates), the N ingredients' slices (then the base's, if any); from views
    of tensors in memory or from a reader, so the caller decides how blocks are fetched."""
    out = torch.empty(tuple(shape), dtype=out_dtype or config.torch_compute_dtype, device=device)
    flat = out.view(-1)
    ranges = iter(bounds)
    # not zip(): its reused result tuple would keep the previous block alive while the next is fetched
    for part in blocks:
        start, end = next(ranges)
        dst = flat[start:end]
        dst.copy_(merge_block(part[:n], config, steps, pivot, base=part[n] if len(part) > n else None,
                              device=device, exact_soup=exact_soup))
        _check_finite(dst, part[:n])  # in the output dtype: an overflow of the cast counts too
        del part, dst  # a reader may fetch the next block now: hold one block, not two
    return out


def merge_blocks_on(pool: Executor, fetch: Callable[[int], Sequence[torch.Tensor]], bounds: Sequence[Tuple[int, int]],
                    shape: Sequence[int], n: int, config: AMEConfig, steps: Sequence[AMEStep], pivot: PivotSpec, *,
                    out_dtype: Optional[torch.dtype] = None, exact_soup: bool = False,
                    sink: Optional[Callable[[int, torch.Tensor], None]] = None) -> Optional[torch.Tensor]:
    """:func:`merge_in_blocks` on CPU with the blocks merged side by side on ``pool``'s workers (see
    :mod:`hf_ame.threads`): block k's slices are ``fetch(k)`` (the N ingredients', then the base's),
    fetched by the worker that merges it. The same bytes as the serial loop: blocks are independent.
    ``sink(start, block)``: each merged block handed over (written) by its worker, nothing returned
    (no output tensor is held); else the assembled tensor."""
    dtype = out_dtype or config.torch_compute_dtype
    flat = torch.empty(tuple(shape), dtype=dtype).view(-1) if sink is None else None

    def work(k: int) -> None:
        part = fetch(k)
        merged = merge_block(part[:n], config, steps, pivot, base=part[n] if len(part) > n else None,
                             exact_soup=exact_soup)
        if flat is None:
            dst = merged.to(dtype)
            _check_finite(dst, part[:n])
            sink(bounds[k][0], dst)
        else:
            dst = flat[bounds[k][0]:bounds[k][1]]
            dst.copy_(merged)
            _check_finite(dst, part[:n])

    run_in_order(pool, work, len(bounds))
    return flat.view(tuple(shape)) if flat is not None else None


def block_bounds(numel: int, block_size: int) -> List[Tuple[int, int]]:
    """[start, end) ranges covering ``numel`` elements in blocks of ``block_size`` rounded down to a
    multiple of 64 (at least 64). Blocks start at multiples of 64 elements, as torch's vectorised
    kernels split work: each coordinate then takes the same (vector or scalar) code path as in a
    whole-tensor run, which keeps blocked merges bit-identical."""
    step = max(64, int(block_size) // 64 * 64)
    return [(s, min(numel, s + step)) for s in range(0, numel, step)]


def merge_block(ingredients: Sequence[torch.Tensor], config: AMEConfig, steps: Sequence[AMEStep], pivot: PivotSpec,
                *, base: Optional[torch.Tensor] = None, device: Optional[torch.device] = None,
                exact_soup: bool = False, key: str = "tensor0", position: float = 0.0) -> torch.Tensor:
    """Merge one tensor, or one block of coordinates of it, through all ``steps`` at once
    (``ingredients[j]``: ingredient j's copy; ``key``: the tensor's name, seeding a method's
    random drops; ``position``: its layer, 0 to 1, for per-layer parameter gradients); returns the
    state dtype (:attr:`AMEConfig.torch_state_dtype`) on ``device``."""
    dtype, pivot = config.torch_state_dtype, Pivot(*pivot)  # a plain (kind, index) tuple too
    if exact_soup:
        return soup(ingredients, dtype, device)
    stepper = AMEStepper([initial_merge(ingredients, pivot, base=base, dtype=dtype, device=device)], config, [key],
                         [position], has_base=pivot.is_base)
    stepper.run(steps, [ingredients])
    return stepper.release()[0]


def merge_fused(ingredients: Sequence[torch.Tensor], config: AMEConfig, steps: Sequence[AMEStep], pivot: PivotSpec,
                *, base: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.float32,
                exact_soup: bool = False) -> torch.Tensor:
    """:func:`merge_block` through :mod:`hf_ame.kernels` (callers check :func:`fused_supported`):
    the soup pivot and the exact soup in one kernel over the N inputs, then one kernel per step."""
    if exact_soup:
        return fused_soup(ingredients, out_dtype)
    if Pivot(*pivot).is_soup:
        init = fused_soup(ingredients, torch.float32)
    else:
        init = initial_merge(ingredients, pivot, base=base, dtype=torch.float32, device=ingredients[0].device)
    return fused_merge(ingredients, init, config, steps, out_dtype)


def merge_fused_many(groups: Sequence[Sequence[torch.Tensor]], config: AMEConfig, steps: Sequence[AMEStep],
                     pivot: PivotSpec, *, bases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                     out_dtype: torch.dtype = torch.float32, exact_soup: bool = False) -> List[torch.Tensor]:
    """:func:`merge_fused` of several tensors (``groups[k]``: tensor k's N copies; ``bases[k]`` its
    base copy), one kernel launch per soup and per step for all of them (:mod:`hf_ame.groups`). The
    caller checks each result for NaN or Inf (:func:`all_finite`), naming its tensor."""
    if exact_soup:
        return fused_soup_many(groups, out_dtype)
    if Pivot(*pivot).is_soup:
        inits = fused_soup_many(groups, torch.float32)
    else:
        inits = [initial_merge(g, pivot, base=None if bases is None else bases[k], dtype=torch.float32,
                               device=g[0].device) for k, g in enumerate(groups)]
    return fused_merge_many(groups, inits, config, steps, out_dtype)
