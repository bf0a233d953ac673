"""hf_ame's robust centres as pseudogradient transforms: ``geometric_median`` and ``huber``.

Neither is mergekit's: both estimate the ingredients' centre while bounding the pull of a far-off
model (diverged, rescaled, corrupt). ``huber`` is the robust preset's (:meth:`AMEConfig.robust`):
on a clean set it is the soup, and its first step can run over cache blocks in one pass
(:class:`~hf_ame.methods.FirstStep`, :mod:`hf_ame.first_step`). Pure functions: tensors in, tensor out.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Callable, List, Sequence, Tuple

import torch

from .method_params import DELTA, EPS, TOL
from .methods import FirstStep, MethodContext, register_method

__all__: List[str] = []


def _geometric_median(ctx: MethodContext) -> torch.Tensor:
    """One Weiszfeld step toward the geometric median of the batch, tensor by tensor: each
    pseudogradient normalised by its own norm, g = sum_j (p - x_j) / |p - x_j| / sum_j 1 / |p - x_j|
    (norms clamped at ``eps``). With SGD, lr 1 and the adaptive pivot, epochs are Weiszfeld iterations."""
    p = ctx.pivot
    acc = torch.zeros_like(p)
    total = 0.0
    eps = float(ctx.param("eps"))
    for i in range(ctx.n):
        d = ctx.get(i).sub_(p)
        inv = 1.0 / max(float(torch.linalg.vector_norm(d)), eps)
        acc.add_(d, alpha=inv)
        total += inv
    return acc.div_(total).neg_()


def _huber(ctx: MethodContext) -> torch.Tensor:
    """One iteratively-reweighted step toward the Huber M-estimate of the batch's centre, tensor by
    tensor: r_j = |p - x_j|, s = median_j r_j, weight w_j = min(1, delta s / r_j), g = sum_j w_j (p -
    x_j) / sum_j w_j. Models within ``delta`` median distances weigh 1 (on a clean set: the soup);
    a far-off model's pull is capped at delta s. Pass 1 the distances (and the plain sum), pass 2 the
    weighted sum, only when some weight is under 1.
    ``tol`` > 0: the iteration stops once a step moves the merge by at most tol x |p| (per tensor)."""
    p = ctx.pivot
    delta, eps = float(ctx.param("delta")), float(ctx.param("eps"))
    acc, r = torch.zeros_like(p), []
    for i in range(ctx.n):
        d = ctx.get(i).sub_(p)
        r.append(float(torch.linalg.vector_norm(d)))
        acc.add_(d, alpha=1.0)  # the weighted sum when every weight is 1 (a clean set): no second pass
    cap = delta * max(statistics.median(r), eps)
    weights = [1.0 if ri <= cap else cap / ri for ri in r]
    if any(w != 1.0 for w in weights):
        acc.zero_()
        for i in range(ctx.n):
            acc.add_(ctx.get(i).sub_(p), alpha=weights[i])
    g = acc.div_(sum(weights)).neg_()
    tol = float(ctx.param("tol"))  # converged: this step moves the merge by under tol x |p| (0: never)
    ctx.converged = tol > 0 and float(torch.linalg.vector_norm(g)) <= tol * float(torch.linalg.vector_norm(p))
    return g


# a decision taken from sums over blocks must clear its threshold by this factor: torch's whole-tensor
# norms add in another order (relative differences near 1e-7); a closer call is left to the whole step
_MARGIN = 0.99
# torch's float32 vector_norm adds squares in float32: it is inf once the norm passes sqrt(3.4e38) = 1.84e19
# (a diverged model), where a sum over blocks stays finite; such a tensor is left to the whole step
_NORM_LIMIT = 1e19


def _huber_block(p: torch.Tensor, xs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[float]]:
    """:func:`_huber` on one block when every weight is 1 (a clean set): q = sum_j (x_j - p) / n by
    its operations in its order (q = -g); the block's |x_j - p|^2 for each j, then |q|^2 and |p|^2."""
    acc, d, sums = torch.zeros_like(p), torch.empty_like(p), []
    for x in xs:
        # x.float().sub_(p): a narrower x is upcast exactly inside the subtraction (one rounding); a wider
        # one is rounded to float32 first, as the whole step's copy is (float64 in one step: other bits)
        torch.sub(x if x.element_size() <= p.element_size() else x.to(p.dtype), p, out=d)
        sums.append(float(torch.linalg.vector_norm(d)) ** 2)
        acc.add_(d, alpha=1.0)
    q = acc.div_(float(len(xs)))  # sum(weights) of n ones
    return q, sums + [float(torch.linalg.vector_norm(q)) ** 2, float(torch.linalg.vector_norm(p)) ** 2]


def _huber_keeps(sums: Sequence[float], param: Callable[[str], Any], last: bool) -> bool:
    """Whether :func:`_huber` on the whole tensor weighs every model 1 and, unless this step is the
    ``last``, meets its ``tol`` (the stepper stops there)."""
    norms = [math.sqrt(s) for s in sums]
    if not all(math.isfinite(v) and v < _NORM_LIMIT for v in norms):  # the whole step's norm may overflow
        return False
    r, g, p = norms[:-2], norms[-2], norms[-1]
    cap = float(param("delta")) * max(statistics.median(r), float(param("eps")))
    if any(ri > _MARGIN * cap for ri in r):
        return False
    tol = float(param("tol"))
    return last or (tol > 0 and g <= _MARGIN * tol * p)


register_method("huber", _huber, params=(DELTA, EPS.replace(default=1e-12), TOL.replace(default=0.0)), base="unused",
                passes=2, first_step=FirstStep(_huber_block, _huber_keeps),
                description="IRLS steps toward the Huber M-estimate: the soup on a clean set, far-off models capped",
                reference="https://en.wikipedia.org/wiki/Huber_loss")
register_method("geometric_median", _geometric_median, params=(EPS,), base="unused",
                description="Weiszfeld steps toward the geometric median (robust to a few far-off models)",
                reference="https://en.wikipedia.org/wiki/Geometric_median")
