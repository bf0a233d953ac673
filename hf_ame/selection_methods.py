"""mergekit's entry-selecting merge methods as pseudogradient transforms: ``sce``, ``ram``,
``ramplus_tl``, ``nearswap``, ``arcee_fusion``.

Each computes mergekit 0.1.5's merge m from the pivot p (the base, in the one-shot settings) and
the step's models, and returns g = p - m. Nothing stacks the N copies: statistics over the models
(variances, contribution counts) come from a first read of each copy into one or two
accumulators, and a second read applies them. Pure functions: tensors in, tensor out.
"""
from __future__ import annotations

import torch

from .method_params import ALPHA, EPSILON, INT8_MASK, R, SELECT_TOPK, T, non_negative
from .methods import MethodContext, register_method

__all__ = ["fusion_importance"]


def _sce(ctx: MethodContext) -> torch.Tensor:
    """SCE: keep the ``select_topk`` entries where the task vectors vary most (their variance over
    the models), elect a sign per entry (the sign of the sum), and average the agreeing entries
    weighted by each task vector's mean square (over the kept entries)."""
    p, n = ctx.pivot, ctx.n
    topk = float(ctx.param("select_topk"))
    total = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
    squares = torch.zeros_like(total) if topk < 1 else None
    for i in range(n):  # pass 1: sum (for the sign) and sum of squares (for the variance), in float64
        d = ctx.get(i).sub_(p).double()
        total.add_(d)
        if squares is not None:
            squares.add_(d.square_())
    keep = None
    if squares is not None:
        var = squares.div_(n).sub_((total / n).square_()).clamp_(min=0)  # var(unbiased=False)
        k = int(int(torch.count_nonzero(var)) * topk)
        keep = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
        if k > 0:  # mergekit's torch.topk on the variance in its dtype: equal values are kept as it keeps them
            keep[torch.topk(var.reshape(-1).to(ctx.dtype), k=k, largest=True).indices] = True
        keep = keep.view(p.shape)
        del var, squares
        total.mul_(keep)
    positive = total >= 0
    del total
    num, den, weights = _sce_pass(ctx, keep, positive, uniform=False)
    w_sum = sum(weights)
    if abs(w_sum) < 1e-6:  # mergekit falls back to uniform weights: one more read of each copy
        num, den, _ = _sce_pass(ctx, keep, positive, uniform=True)
        w_sum = float(n)
    return num.div_(w_sum).div_(den.div_(w_sum).clamp_(min=1e-6)).neg_()


def _sce_pass(ctx: MethodContext, keep, positive: torch.Tensor, uniform: bool):
    """sum_j w_j e_j d_j and sum_j w_j e_j (e_j: d_j agrees with the elected sign), unnormalised."""
    p = ctx.pivot
    num, den, weights = torch.zeros_like(p), torch.zeros_like(p), []
    for i in range(ctx.n):
        d = ctx.get(i).sub_(p)
        if keep is not None:
            d.mul_(keep)
        w = 1.0 if uniform else float(d.square().mean())
        weights.append(w)
        agree = torch.where(positive, d > 0, d < 0)
        num.add_(d.mul_(agree), alpha=w)
        den.add_(agree.to(p.dtype), alpha=w)
    return num, den, weights


def _ram_counts(ctx: MethodContext, eps: float) -> torch.Tensor:
    count = torch.zeros(ctx.pivot.shape, dtype=torch.int32, device=ctx.pivot.device)
    for i in range(ctx.n):
        count.add_(ctx.get(i).sub_(ctx.pivot).abs_().gt_(eps).to(torch.int32))
    return count


def _ram(ctx: MethodContext) -> torch.Tensor:
    """RAM: an entry changed (|d| > epsilon) by one model takes that change; changed by several,
    their mean. One read of each copy: sum of the kept changes and their count."""
    p, eps = ctx.pivot, float(ctx.param("epsilon"))
    acc = torch.zeros_like(p)
    count = torch.zeros_like(p)
    for i in range(ctx.n):
        d = ctx.get(i).sub_(p)
        nz = d.abs() > eps
        acc.add_(d.mul_(nz))
        count.add_(nz.to(p.dtype))
    return acc.div_(count.clamp_(min=1)).neg_()


def _ramplus_tl(ctx: MethodContext) -> torch.Tensor:
    """RAM+ (tensor-local): as RAM, with each model's unique changes amplified by
    1 + r * clamp(shared / unique, 0, alpha) (its counts of shared and unique changed entries)."""
    p, eps = ctx.pivot, float(ctx.param("epsilon"))
    r, alpha = float(ctx.param("r")), float(ctx.param("alpha"))
    count = _ram_counts(ctx, eps)  # pass 1
    overlap, unique = count > 1, count == 1
    divisor = count.clamp_(min=1).to(p.dtype)
    acc = torch.zeros_like(p)
    for i in range(ctx.n):  # pass 2
        d = ctx.get(i).sub_(p)
        nz = d.abs() > eps
        shared, alone = int((nz & overlap).sum()), int((nz & unique).sum())
        lam = 1 + r * min(max(shared / max(alone, eps), 0.0), alpha)
        d.mul_(nz)
        acc.add_(d * unique, alpha=lam).add_(d.mul_(overlap).div_(divisor))
    return acc.neg_()


def _nearswap(ctx: MethodContext) -> torch.Tensor:
    """NearSwap: take the model's value where it is within ``t`` of the base, interpolate toward the
    base as the distance grows (weight t / |base - model|, at most 1)."""
    p, t = ctx.pivot, float(ctx.param("t"))
    x = ctx.get(0)
    weight = (t / (p - x).abs_().clamp_(min=1e-6)).clamp_(min=0, max=1)
    return p - (weight * x + (1 - weight) * p)


def fusion_importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion's importance: |model - base| times the KL divergence of the rows' softmaxes."""
    eps = 1e-8
    pm = torch.softmax(model, dim=-1) + eps
    qb = torch.softmax(base, dim=-1) + eps
    kl = torch.sum(pm * torch.log(pm / qb), dim=-1, keepdim=True)
    return (model - base).abs_().mul_(kl)


_QUANTILE_SAMPLE = 1_000_000  # mergekit's: quantiles of a larger tensor come from a sample


def _arcee_fusion(ctx: MethodContext) -> torch.Tensor:
    """Arcee Fusion: keep the model's change where its importance is above median + 1.5 IQR (a
    sample of 10^6 entries for larger tensors, drawn from the seeded generator)."""
    p = ctx.pivot
    x = ctx.get(0)
    importance = fusion_importance(x, p)
    flat = importance.reshape(-1)
    if flat.numel() > _QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (_QUANTILE_SAMPLE,), generator=ctx.generator(0)).to(flat.device)]
    ordered = torch.sort(flat).values
    at = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long().to(ordered.device)
    q1, median, q3 = ordered[at]
    mask = importance >= median + 1.5 * (q3 - q1)
    return x.sub_(p).mul_(mask).neg_()


register_method("sce", _sce, params=(SELECT_TOPK, INT8_MASK), base="required", passes=2,
                description="select high-variance entries, elect signs, weight by each task vector's energy",
                reference="https://arxiv.org/abs/2408.07990")
# RAM's epsilon is a threshold on |change| (>= 0, any size), not DELLA's probability spread
_RAM_EPSILON = EPSILON.replace(default=1e-5, test=non_negative, what="a number >= 0")
register_method("ram", _ram, params=(_RAM_EPSILON,), base="required",
                description="unique changes kept, shared changes averaged (Reinforced Agent Merging)",
                reference="https://arxiv.org/abs/2601.13572")
register_method("ramplus_tl", _ramplus_tl, params=(R, ALPHA, _RAM_EPSILON), base="required", passes=2,
                description="RAM with each model's unique changes amplified by its shared/unique ratio",
                reference="https://arxiv.org/abs/2601.13572")
# nearswap's t is a distance from the base's values, not an interpolation factor
register_method("nearswap", _nearswap, params=(T.replace(test=non_negative, what="a distance >= 0"),),
                base="required", models=(1, 1),
                description="take the model's values near the base's, interpolate toward the base far from it",
                reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001")
register_method("arcee_fusion", _arcee_fusion, params=(), base="required", models=(1, 1),
                description="keep the model's changes whose importance (|change| x KL) is an outlier",
                reference="https://arcee.ai")
