"""Data-free multi-task merges on the singular vectors of the task vectors: ``tsv`` (TSV-M),
``iso_c`` and ``iso_cts``.

Each works on one tensor with all the step's task vectors d_j = x_j - p (p: the pivot; the base
in the papers' setting) and returns g = -scaling * tau, so that one SGD step of lr 1 gives
w = base + scaling * tau, as FusionBench 0.2.33 merges (``scaling``: its ``alpha`` /
``scaling_factor``, default 1.0). On 2-D tensors:

- ``tsv`` (Task Singular Vectors, Gargiulo et al., CVPR 2025): each d_j keeps its top
  int(k / N) singular triplets (k = min(rows, cols)); the kept left vectors of all tasks are put
  side by side and replaced by their nearest orthonormal matrix (the polar factor), the right ones
  likewise; tau = U_perp diag(s) V_perp. Where k < N every task keeps 0 triplets and tau is 0.
- ``iso_c`` (Isotropic merging in the Common subspace, Marczak et al., ICML 2025): the SVD of
  sum_j d_j with every singular value replaced by their mean: tau = mean(s) U V^T.
- ``iso_cts`` (Iso-C plus Task-Specific subspaces): the top ``common_space_fraction`` of the sum's
  singular directions, and for each task the top directions of d_j outside them (the rest of the
  k shared equally); both sets orthogonalised as in TSV-M, spectrum flattened as in Iso-C.

Every other tensor (1-D norms and biases, 3-D and up) takes the mean of the task vectors, as the
references do. The arithmetic is float32 at least (torch has no half-precision SVD).

Memory per tensor: one task vector and its SVD at a time, plus the accumulators the method keeps
(TSV-M: the kept factors, about two tensors' worth; Iso-C: the sum; Iso-CTS: the sum's factors and
the combined factors). Iso-CTS reads each task vector twice (the common space comes first). A
tensor that no fine-tune changed (frozen embeddings, say) skips its SVDs: its update is 0, as theirs.
Time: one SVD of every 2-D tensor per task (TSV-M, Iso-CTS) or of their sum (Iso-C), plus two
SVDs of the orthogonalisation (TSV-M, Iso-CTS); see docs/svd_methods.md for measured costs.

In AME the method's update is what its math supports with the pivot at the base, fixed, and every
model in each step (``batch_size=None, adaptive_pivot=False``): each step's pseudogradient is then the
same -scaling * tau, which the optimizer integrates (SGD: another scaling; Adam: lr * sign(tau) a step).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .method_params import COMMON_SPACE_FRACTION, Param
from .methods import MethodContext, register_method

__all__ = ["common_split", "polar"]


def _task_vector(ctx: MethodContext, i: int) -> torch.Tensor:
    """d_i = x_i - p, a fresh tensor in float32 at least."""
    d = ctx.get(i).sub_(ctx.pivot)
    return d if d.dtype.itemsize >= 4 else d.float()


def _mean(ctx: MethodContext) -> torch.Tensor:
    """The running mean of the task vectors (the references' rule for tensors that are not 2-D)."""
    acc = _task_vector(ctx, 0)
    for i in range(1, ctx.n):
        acc.add_(_task_vector(ctx, i).sub_(acc).div_(i + 1))
    return acc


def _sum(ctx: MethodContext) -> Tuple[torch.Tensor, bool]:
    """sum_j d_j, and whether any d_j is non-zero (a tensor every fine-tune left frozen is not)."""
    acc = _task_vector(ctx, 0)
    changed = bool(torch.any(acc))
    for i in range(1, ctx.n):
        d = _task_vector(ctx, i)
        changed = changed or bool(torch.any(d))
        acc.add_(d)
        del d
    return acc, changed


def _step(ctx: MethodContext, tau: torch.Tensor) -> torch.Tensor:
    """The pseudogradient g = -scaling * tau, in the pivot's dtype."""
    return tau.mul_(-float(ctx.param("scaling"))).to(ctx.pivot.dtype)


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to ``a`` (its polar factor U V^T, from a thin SVD)."""
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def _place(u_all: torch.Tensor, s_all: torch.Tensor, v_all: torch.Tensor, at: int, width: int, usv) -> None:
    """Put the top ``width`` singular triplets of ``usv`` at index ``at`` of the combined factors."""
    u, s, vh = usv
    u_all[:, at:at + width] = u[:, :width]
    s_all[at:at + width] = s[:width]
    v_all[at:at + width, :] = vh[:width, :]


def _zeros(ctx: MethodContext, *shape: int) -> torch.Tensor:
    dtype = ctx.pivot.dtype if ctx.pivot.dtype.itemsize >= 4 else torch.float32
    return torch.zeros(shape, dtype=dtype, device=ctx.pivot.device)


def _tsv(ctx: MethodContext) -> torch.Tensor:
    """TSV-M: each task's top int(k / N) singular triplets, side by side, orthogonalised."""
    if ctx.pivot.dim() != 2:
        return _step(ctx, _mean(ctx))
    rows, cols = ctx.pivot.shape
    k = min(rows, cols)
    r = int(k * (1 / ctx.n))  # FusionBench's own rounding (it differs from k // N at 49 * (1 / 49), say)
    u_all, s_all, v_all = _zeros(ctx, rows, k), _zeros(ctx, k), _zeros(ctx, k, cols)
    unchanged = []  # tasks that left the tensor as it was: no SVD unless another task changed it
    for i in range(ctx.n):
        d = _task_vector(ctx, i)
        if torch.any(d):
            _place(u_all, s_all, v_all, i * r, r, torch.linalg.svd(d, full_matrices=False))
        else:
            unchanged.append(i)
        del d
    if len(unchanged) == ctx.n:  # frozen in every fine-tune (embeddings, often): tau = 0, as the SVDs would give
        return torch.zeros_like(ctx.pivot)
    for i in unchanged:  # their singular vectors (of a zero matrix) still enter the orthogonalisation, as there
        _place(u_all, s_all, v_all, i * r, r, torch.linalg.svd(_zeros(ctx, rows, cols), full_matrices=False))
    tau = torch.linalg.multi_dot((polar(u_all), torch.diag(s_all), polar(v_all)))
    return _step(ctx, tau)


def _iso_c(ctx: MethodContext) -> torch.Tensor:
    """Iso-C: the sum of the task vectors with its singular values all set to their mean."""
    if ctx.pivot.dim() != 2:
        return _step(ctx, _mean(ctx))
    total, _ = _sum(ctx)
    if not torch.any(total):  # all singular values 0: tau = 0 without the SVD
        return torch.zeros_like(ctx.pivot)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    del total
    return _step(ctx, (u * s.mean()) @ vh)


def common_split(k: int, n: int, fraction: float) -> Tuple[int, int]:
    """Iso-CTS's split of k singular directions among a common space and n tasks: (common size,
    directions per task), with the task-specific total a multiple of n, as FusionBench rounds it.
    Where its rounding would exceed k (a common space below 0, e.g. k = 5, n = 3, fraction 0),
    each task gets one direction fewer."""
    common = int(k * fraction)
    per_task = round((k - common) / n)
    if per_task * n > k:
        per_task -= 1
    return k - per_task * n, per_task


def _iso_cts(ctx: MethodContext) -> torch.Tensor:
    """Iso-CTS: the sum's top directions (common) beside each task's top directions outside them."""
    if ctx.pivot.dim() != 2:
        return _step(ctx, _mean(ctx))
    k = min(ctx.pivot.shape)
    common, per_task = common_split(k, ctx.n, float(ctx.param("common_space_fraction")))
    total, changed = _sum(ctx)  # pass 1: the common space
    if not changed:  # frozen in every fine-tune: tau = 0 without the SVDs
        return torch.zeros_like(ctx.pivot)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    del total
    uc = u[:, :common]
    u_all, s_all, v_all = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
    for i in range(ctx.n if per_task else 0):  # pass 2: each task's own directions
        d = _task_vector(ctx, i)
        d.sub_(uc @ (uc.T @ d))  # not (uc @ uc.T) @ d, as the reference: that is rows x rows (3.7 GB on a 30k vocab)
        _place(u_all, s_all, v_all, i * per_task, per_task, torch.linalg.svd(d, full_matrices=False))
        del d
    # the common space after the task-specific blocks, as the reference orders them
    _place(u_all, s_all, v_all, ctx.n * per_task, common, (u, s, vh))
    del u, s, vh, uc
    flat = torch.full_like(s_all, float(s_all.mean()))
    return _step(ctx, torch.linalg.multi_dot((polar(u_all), torch.diag(flat), polar(v_all))))


_ISO = "https://arxiv.org/abs/2502.04959"
_SCALING = Param("scaling", 1.0)  # FusionBench's alpha / scaling_factor: any finite number
register_method("tsv", _tsv, params=(_SCALING,), base="required",
                description="each task's top singular vectors, decorrelated across tasks (TSV-M, Gargiulo et al. 2025)",
                reference="https://arxiv.org/abs/2412.00081")
register_method("iso_c", _iso_c, params=(_SCALING,), base="required",
                description="the summed task vector with a flat singular spectrum (Iso-C, Marczak et al. 2025)",
                reference=_ISO)
register_method("iso_cts", _iso_cts, params=(_SCALING, COMMON_SPACE_FRACTION), base="required", passes=2,
                description="a common subspace plus each task's own directions, flat spectrum (Iso-CTS, "
                            "Marczak et al. 2025)", reference=_ISO)
