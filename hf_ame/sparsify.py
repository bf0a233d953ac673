"""Sparsification of task vectors, as mergekit 0.1.5's ``sparsify`` does it: keep the largest
magnitudes (TIES), drop the largest outliers too (breadcrumbs), drop at random and rescale (DARE),
drop with probabilities by magnitude rank (DELLA). Pure: a tensor in, the same tensor masked out."""
from __future__ import annotations

import torch

__all__ = ["top_k_mask", "magnitude", "magnitude_outliers", "random_drop", "della_magprune", "rescale_l1_inplace"]


def rescale_l1_inplace(masked: torch.Tensor, before: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked.mul_(before / after)


def top_k_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """A bool mask of the k largest entries of the 1-D ``a``. Through ``kthvalue``, not ``topk`` or a
    sort: on a 98 MB tensor topk's buffers peak at +611 MiB, this at +377. Only when equal values
    straddle the threshold (it happens: 1 entry in mergekit's ties example) is the choice made by a
    full ``argsort(descending=True)``, as mergekit makes it (torch's tie order is not by index)."""
    n = a.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=a.device)
    threshold = a.kthvalue(n - k + 1).values
    keep = a > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        tied = a == threshold
        if int(tied.sum()) == missing:  # no choice to make
            keep |= tied
        else:  # an ambiguous tie: decide exactly as mergekit's argsort does
            keep.zero_()
            keep[torch.argsort(a.float() if a.device.type == "cpu" else a, descending=True)[:k]] = True
    return keep


def magnitude(d: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the ``density`` largest magnitudes (at least one entry); ``d`` is changed in place."""
    if density >= 1:
        return d
    k = max(1, int(density * d.numel()))
    keep = top_k_mask(d.abs().reshape(-1), k).view_as(d)
    before = d.abs().sum() if rescale else None
    d.mul_(keep.view_as(d))  # in place: d is the caller's fresh copy
    return rescale_l1_inplace(d, before) if rescale else d


def magnitude_outliers(d: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Drop the ``gamma`` largest magnitudes, then the smallest, keeping ``density`` (breadcrumbs)."""
    if density >= 1:
        return d
    n = d.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.sort(d.abs().reshape(-1)).indices
    mask = torch.zeros(n, dtype=d.dtype, device=d.device)
    mask[order[bottom:bottom + keep]] = 1
    before = d.abs().sum() if rescale else None
    d.mul_(mask.view_as(d).to(d.dtype))
    return rescale_l1_inplace(d, before) if rescale else d


def random_drop(d: torch.Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE), rescaled to the original L1 norm; in place."""
    if density >= 1:
        return d
    keep = torch.empty(d.shape, dtype=torch.float32).bernoulli_(float(density), generator=generator)
    before = d.abs().sum() if rescale else None
    d.mul_(keep.to(device=d.device, dtype=d.dtype))  # in place: d is the caller's fresh copy
    return rescale_l1_inplace(d, before) if rescale else d


def della_magprune(d: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
                   rescale: bool = True) -> torch.Tensor:
    """DELLA's MagPrune as mergekit 0.1.5: per row (1-D tensors as one row), each entry's magnitude
    rank scaled to [0, 1] gives its keep probability density - epsilon + 2 epsilon rank; drawn from
    ``generator`` (mergekit draws from torch's global one); rescaled to the L1 norm; in place."""
    if density >= 1:
        return d
    rows = d.reshape(1, -1) if d.dim() < 2 else d
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, descending=False), dim=1).to(d.dtype) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * epsilon
    del ranks
    keep = torch.bernoulli(probs.cpu(), generator=generator).to(device=d.device, dtype=d.dtype)
    before = d.abs().sum() if rescale else None
    d.mul_(keep.view_as(d))
    return rescale_l1_inplace(d, before) if rescale else d
