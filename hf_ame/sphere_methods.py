"""mergekit's spherical merge methods as pseudogradient transforms: ``nuslerp``, ``multislerp``, ``karcher``.

Each computes mergekit 0.1.5's merge m of the step's models (task vectors from the pivot when the
method takes an optional base and the pivot is the base, ``ctx.has_base``) and returns g = p - m,
so the one-shot settings give m itself. Memory per tensor: the pivot, an accumulator or two and
one model's copy (nuslerp: the two models it interpolates); Karcher's iterations re-read each copy
instead of holding N unit vectors. Pure functions: tensors in, tensor out.
"""
from __future__ import annotations

from typing import Callable, List

import torch

from .errors import IncompatibleCheckpointsError
from .method_params import (EPS, MAX_ITERATIONS, NORMALIZE_WEIGHTS, NUSLERP_FLATTEN,
                            NUSLERP_ROW_WISE, TOL, WEIGHT, non_negative)
from .methods import MethodContext, register_method

__all__ = ["nuslerp"]


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8,
            flatten: bool = False) -> torch.Tensor:
    """Spherical interpolation of ``v0`` and ``v1`` at ``t`` as mergekit's ``nuslerp``: over the
    whole tensor (``flatten``) or row by row along ``dim``; linear where the two are colinear."""
    out_shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


def _nuslerp(ctx: MethodContext) -> torch.Tensor:
    """t = weight_1 / (weight_0 + weight_1) (0.5 when they cancel); between the task vectors when the
    pivot is the base, else between the models."""
    p = ctx.pivot
    w0, w1 = float(ctx.param("weight", 0)), float(ctx.param("weight", 1))
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    a, b = ctx.get(0), ctx.get(1)
    if ctx.has_base:
        a.sub_(p), b.sub_(p)
    merged = nuslerp(t, a, b, dim=0 if ctx.param("nuslerp_row_wise") else -1,
                     flatten=bool(ctx.param("nuslerp_flatten")))
    del a, b
    return merged.neg_() if ctx.has_base else p - merged


def _multislerp(ctx: MethodContext) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere (mergekit's ``multislerp``): the weighted mean
    of the unit vectors, normalised, scaled by the weighted mean norm. mergekit's tangent-space step
    adds sum_j w_j (u_j - <u_j, m> m) = M - |M| m, zero in exact arithmetic, so it is left out."""
    p, eps = ctx.pivot, float(ctx.param("eps"))
    if ctx.n == 1:  # mergekit returns the model itself
        return p - ctx.get(0)
    weights = [float(ctx.param("weight", i)) for i in range(ctx.n)]
    if ctx.param("normalize_weights"):
        weights = [w / sum(weights) for w in weights]
    mean, norms = torch.zeros_like(p), []
    for i in range(ctx.n):
        d = ctx.get(i)
        if ctx.has_base:
            d.sub_(p)
        norms.append(float(torch.linalg.vector_norm(d)))
        mean.add_(d.div_(norms[-1] + eps), alpha=weights[i])
    mean_norm = float(torch.linalg.vector_norm(mean))
    if mean_norm < eps:
        if ctx.n != 2:
            raise IncompatibleCheckpointsError(
                f"multislerp: the weighted mean of the unit vectors of tensor {ctx.key!r} is zero (antipodal "
                "models whose weights balance out); change the weights")
        merged = ctx.get(0).sub_(p if ctx.has_base else 0).mul_(weights[0])
        merged.add_(ctx.get(1).sub_(p if ctx.has_base else 0), alpha=weights[1])
    else:
        merged = mean.mul_(sum(w * n for w, n in zip(weights, norms)) / mean_norm)
    return merged.neg_() if ctx.has_base else p - merged


def _karcher(ctx: MethodContext) -> torch.Tensor:
    """The Karcher (Riemannian) mean of the models' directions on the unit sphere, scaled by their
    mean norm (mergekit's ``karcher``; uniform weights): a Riemannian gradient iteration, each
    iteration one read of every model's copy."""
    p, n = ctx.pivot, ctx.n
    max_iter, tol = int(ctx.param("max_iter")), float(ctx.param("tol"))
    if n == 1:
        return p - ctx.get(0)
    norms = [torch.linalg.vector_norm(ctx.get(i).to(torch.float64 if p.dtype == torch.float64 else torch.float32))
             for i in range(n)]
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return p.clone()  # every model is zero: so is the merge
    alpha = 1.0 / len(valid)

    def unit(i: int) -> torch.Tensor:
        return ctx.get(i).div_(norms[i])

    mean = torch.zeros_like(p)
    for i in valid:
        mean.add_(unit(i), alpha=alpha)
    mean_norm = float(torch.linalg.vector_norm(mean))
    mean = unit(valid[0]) if mean_norm < tol else mean.div_(mean_norm)
    for _ in range(max_iter):
        tangent = _karcher_tangent(mean, valid, unit, alpha, tol)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if float(tangent_norm) < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    scale = sum(norms[i] / n for i in range(n))
    return p - mean * scale


def _karcher_tangent(mean: torch.Tensor, valid: List[int], unit: Callable[[int], torch.Tensor], alpha: float,
                     tol: float) -> torch.Tensor:
    """sum_j alpha theta_j / sin(theta_j) (u_j - cos(theta_j) mean): the Riemannian gradient step."""
    tangent = torch.zeros_like(mean)
    for i in valid:
        u = unit(i)
        dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
        theta = torch.arccos(dot)
        if float(theta) < tol:
            continue
        tangent.add_((u - dot * mean).mul_(alpha * (theta / torch.sin(theta))))
    return tangent


register_method("nuslerp", _nuslerp, params=(WEIGHT, NUSLERP_ROW_WISE, NUSLERP_FLATTEN), base="optional", models=(2, 2),
                description="spherical interpolation of two models (or their task vectors), whole or row by row",
                reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md")
# multislerp's eps only guards a division: 0 is allowed (the robust centres' eps must be positive)
register_method("multislerp", _multislerp, base="optional",
                params=(WEIGHT, NORMALIZE_WEIGHTS, EPS.replace(test=non_negative, what="a number >= 0")),
                description="barycentric interpolation of any number of models on the hypersphere",
                reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea")
register_method("karcher", _karcher, params=(MAX_ITERATIONS, TOL), base="unused", passes=2,
                description="the Riemannian (Karcher) mean of the models' directions, scaled by their mean norm",
                reference="https://en.wikipedia.org/wiki/Karcher_mean")
