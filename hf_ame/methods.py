"""Merge methods as pseudogradient transforms: mergekit's task-vector methods inside AME.

An AME step feeds the optimizer a pseudogradient built from the batch's ingredients and the pivot
p (the current merge, or w_0 with a fixed pivot): by default g = mean_j (p - x_j). A *method*
builds g differently, from the task vectors d_j = x_j - p:

- ``task_arithmetic``: g = -lambda * sum_j weight_j d_j (divided by sum_j weight_j with ``normalize``);
- ``ties``: each d_j trimmed to its ``density`` largest magnitudes, a sign elected per coordinate
  (the sign of sum_j weight_j d_j), the weighted mean of the agreeing entries (disjoint mean);
- ``dare_linear`` / ``dare_ties``: each d_j keeps a random ``density`` of its entries (seeded),
  rescaled to its original L1 norm, then summed (linear) or sign-elected (ties);
- ``breadcrumbs`` / ``breadcrumbs_ties``: drop the ``gamma`` largest and the smallest magnitudes,
  keeping ``density``;
- ``slerp``: g = p - slerp(t, p, x) over each whole tensor (one model besides the base);
- ``model_stock``: g = t (p - mean_j x_j), t = N cos / (1 + (N - 1) cos) from the mean cosine
  between the task vectors (Model Stock);
- ``della`` / ``della_linear``: entries kept with probabilities by magnitude rank (DELLA), then
  TIES' sign election or a sum;
hf_ame's robust centres (``geometric_median``, ``huber``) live in :mod:`hf_ame.robust_methods`;
mergekit's other methods live in :mod:`hf_ame.sphere_methods` (nuslerp, multislerp, karcher) and
:mod:`hf_ame.selection_methods` (sce, ram, ramplus_tl, nearswap, arcee_fusion); the multi-task merges
on singular vectors (tsv, iso_c, iso_cts: not mergekit's) in :mod:`hf_ame.svd_methods`.

With the pivot at the base model and SGD, lr 1 (constant), one epoch, all ingredients in one step
and a fixed pivot (:meth:`AMEConfig.one_shot`), one step gives w = base - g: exactly mergekit's
merge of that name (tested against mergekit 0.1.5). Any other optimizer, lr, batch size or epoch
count composes the method with AME. Parameters keep mergekit's names and defaults.

Memory: a method holds the pivot, one ingredient's task vector and two accumulators per tensor,
never the N copies together; methods with a sign election (``*_ties``, ``model_stock``) read each
ingredient of a step twice instead of stacking them. Everything here is pure (tensors in, tensor out).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .errors import ConfigError
from .method_params import (BASE_ROLES, DENSITY, EPSILON, FILTER_WISE, GAMMA, INT8_MASK, LAMBDA, NORMALIZE,
                            RESCALE, SHARED, T, WEIGHT, Param, check_weight_sum, declarations, decoder_layers,
                            layer_position, layer_positions, resolve_setting, setting_scalars)
from .sparsify import della_magprune, magnitude, magnitude_outliers, random_drop

__all__ = ["MethodEntry", "MethodContext", "FirstStep", "Param", "register_method", "get_method", "list_methods",
           "method_parameters", "PER_MODEL", "parameter_help", "resolve_setting", "layer_position", "layer_positions",
           "decoder_layers"]

# the shared per-ingredient names (mergekit's per-model parameters); a method's own are ``entry.per_model``
PER_MODEL = tuple(name for name, p in SHARED.items() if p.per_model)


@dataclass
class MethodContext:
    """What a method sees for one tensor in one step: the pivot ``p`` (float, the merge's
    device), ``get(i)`` (batch element i's copy as a fresh float tensor, read when called),
    ``indices`` (the ingredients of the batch, in merge order), ``param(name, i)`` (a parameter
    for batch element i), and ``generator(i)`` (a seeded generator: the same for the same seed,
    tensor, step and ingredient, so a second pass draws the same mask)."""

    pivot: torch.Tensor
    get: Callable[[int], torch.Tensor]
    indices: Sequence[int]
    params: Mapping[str, Any]
    seed: int
    key: str
    step: int
    position: float = 0.0  # the tensor's layer, 0 to 1 (mergekit's t for gradients); 0 outside the layers
    has_base: bool = False  # the pivot is the base model (pivot="base"): methods with an optional base use it
    dtype: torch.dtype = torch.float32  # the compute dtype (mergekit's ``dtype``): where a ranking has ties, they
    # are broken on values rounded to it, as mergekit ranks them; the arithmetic itself is in the pivot's dtype
    drew: bool = False  # set by generator(): the pseudogradient depends on the step's seed
    converged: bool = False  # set by a method whose own tolerance is met: the stepper may stop here

    @property
    def n(self) -> int:
        return len(self.indices)

    def param(self, name: str, i: int = 0) -> Any:
        """The value of ``name`` for batch element i on this tensor: per-ingredient lists, mergekit's
        gradients and filters resolved; the method's default where nothing applies."""
        v = self.params[name]
        if isinstance(v, (list, tuple)):
            v = v[self.indices[i]]
        if isinstance(v, Mapping):
            v = resolve_setting(v, self.key, self.position)
            if v is None:
                v = get_method_default(self.params, name)
        return v

    def generator(self, i: int) -> torch.Generator:
        self.drew = True
        text = f"{self.seed}/{self.key}/{self.step}/{self.indices[i]}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1)


def get_method_default(params: Mapping[str, Any], name: str) -> Any:
    """The method's own default of ``name`` (``params["__method__"]`` names the method)."""
    return get_method(params["__method__"]).defaults[name]


@dataclass(frozen=True)
class FirstStep:
    """A method's first step one block of coordinates at a time (:mod:`hf_ame.first_step`), for a
    method whose step is elementwise once a few decisions over the whole tensor are taken (huber's:
    every model weighs 1, the step is under ``tol``). ``block(p, xs)``: ``p`` the block of the pivot
    (float32), ``xs`` the batch's slices in batch order; returns q = -g for the block, computed by the
    same operations in the same order as ``fn`` when its decisions come out so, and the block's
    partial sums that the decisions need. ``keep(sums, param, last)``: from the sums over every block,
    whether ``fn`` on the whole tensor would decide the same (with a margin: the sums round in
    another order) and stop after this step, unless it is the ``last`` (``param(name)``: the
    tensor's parameter values)."""

    block: Callable[[torch.Tensor, Sequence[torch.Tensor]], Tuple[torch.Tensor, List[float]]]
    keep: Callable[[Sequence[float], Callable[[str], Any], bool], bool]


@dataclass(frozen=True)
class MethodEntry:
    """One registered method: ``fn(ctx) -> pseudogradient`` (float, the pivot's shape and device).

    ``params``: its parameters (:class:`Param`: default, check, per-ingredient or global);
    ``base``: the base model's role, "required" (its one-shot form measures task vectors from a base
    model), "optional" (from the base when the pivot is the base, ``ctx.has_base``, else on the
    models themselves: mergekit's optional base) or "unused"; ``models``: (min, max) ingredients
    besides the base; ``passes``: how many times ``fn`` reads each batch ingredient (the reader
    prefetches along it); ``check(params, prefix)``: a check across parameters, run after each
    parameter's own (raises :class:`ConfigError`); ``first_step``: its first step over blocks, when
    it has one (:class:`FirstStep`)."""

    name: str
    fn: Callable[[MethodContext], torch.Tensor]
    params: Tuple[Param, ...] = ()
    description: str = ""
    base: str = "required"
    models: Tuple[int, Optional[int]] = (1, None)
    passes: int = 1
    reference: str = ""
    check: Optional[Callable[[Mapping[str, Any], str], None]] = None
    first_step: Optional[FirstStep] = None

    def __post_init__(self) -> None:
        if self.base not in BASE_ROLES:
            raise ValueError(f"method {self.name!r}: base must be one of {', '.join(BASE_ROLES)}, got {self.base!r}")
        object.__setattr__(self, "params", declarations(tuple(self.params), {}))

    @property
    def defaults(self) -> Mapping[str, Any]:
        """Every parameter with its default (mergekit's), in declaration order (read-only)."""
        return MappingProxyType({p.name: p.default for p in self.params})

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    @property
    def optional_base(self) -> bool:
        return self.base == "optional"

    @property
    def per_model(self) -> Tuple[str, ...]:
        """The names of the parameters that may be one value per ingredient."""
        return tuple(p.name for p in self.params if p.per_model)

    def param(self, name: str) -> Optional[Param]:
        """The declaration of ``name``; None if the method has no such parameter."""
        return next((p for p in self.params if p.name == name), None)


_METHODS: Dict[str, MethodEntry] = {}


def register_method(name: str, fn: Callable[[MethodContext], torch.Tensor], *, defaults: Mapping[str, Any] = (),
                    description: str = "", needs_base: Optional[bool] = None,
                    models: Tuple[int, Optional[int]] = (1, None), passes: int = 1, reference: str = "",
                    optional_base: Optional[bool] = None, overwrite: bool = False, params: Sequence[Param] = (),
                    base: Optional[str] = None,
                    check: Optional[Callable[[Mapping[str, Any], str], None]] = None,
                    first_step: Optional[FirstStep] = None) -> MethodEntry:
    """Register a pseudogradient transform under ``name`` (see :class:`MethodEntry`): its ``params``
    and ``base`` role. ``defaults`` ({name: default}: the shared declaration of that name, else true
    or false / a finite number by the default's type) and ``needs_base`` / ``optional_base`` are the
    older form, still accepted. ``ValueError`` if the name is taken and ``overwrite`` is False."""
    key = name.lower()
    if key in _METHODS and not overwrite:
        raise ValueError(f"method name {key!r} is already registered; pass overwrite=True to replace it")
    if base is None:
        base = "optional" if optional_base else ("unused" if needs_base is False else "required")
    elif needs_base is not None or optional_base is not None:
        raise ValueError(f"method {key!r}: give base= or needs_base / optional_base, not both")
    entry = MethodEntry(key, fn, declarations(tuple(params), defaults), description, base, models, passes,
                        reference, check, first_step)
    _METHODS[key] = entry
    return entry


def get_method(name: str) -> MethodEntry:
    """The entry of a registered method; :class:`ConfigError` naming the choices otherwise."""
    entry = _METHODS.get(str(name).lower())
    if entry is None:
        raise ConfigError(f"method: unknown method {name!r}; expected one of {', '.join(sorted(_METHODS))}")
    return entry


def list_methods() -> List[MethodEntry]:
    return [_METHODS[k] for k in sorted(_METHODS)]


def method_parameters(name: str, kwargs: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """The method's parameters: its defaults updated with ``kwargs`` (``lambda_`` accepted for
    ``lambda``), each checked by its declaration, then the method's own check across them; errors
    name the field (``method_kwargs.density: ...``)."""
    entry = get_method(name)
    defaults = entry.defaults
    out = dict(defaults)
    out["__method__"] = entry.name
    for k, v in kwargs.items():
        k = "lambda" if k == "lambda_" else k
        if k not in defaults:
            raise ConfigError(f"{prefix}method_kwargs.{k}: not a parameter of {entry.name!r}; expected one of "
                              f"{', '.join(sorted(defaults)) or 'none'}")
        out[k] = list(v) if isinstance(v, tuple) else v
    for p in entry.params:
        p.check(out[p.name], f"{prefix}method_kwargs.{p.name}")
    if entry.check is not None:
        entry.check(out, prefix)
    return out


def parameter_help(method: str, name: str) -> str:
    """What a value of ``method``'s parameter ``name`` must be, as its declaration says it (e.g. "a
    number in (0, 1], or one per ingredient; a gradient or filters"): the text of a generated parameter form."""
    declared = get_method(method).param(name) or SHARED.get(name) or Param(name, None)
    return declared.help()


def check_counts(name: str, params: Mapping[str, Any], n_models: int, has_base: bool) -> None:
    """Refuse, before any weight is read, a method that cannot run on ``n_models`` ingredients
    (besides the base) or without a base, or a per-ingredient list of the wrong length."""
    entry = get_method(name)
    if entry.needs_base and not has_base:
        raise ConfigError(f"method: {entry.name!r} measures task vectors from a base model: give base_model= to "
                          "from_pretrained (or a base checkpoint folder as pivot) and pivot='base'")
    lo, hi = entry.models
    if n_models < lo or (hi is not None and n_models > hi):
        want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
        raise ConfigError(f"method: {entry.name!r} merges {want} model(s) besides the base, got {n_models}")
    for k, v in params.items():
        if isinstance(v, list) and len(v) != n_models:
            raise ConfigError(f"method_kwargs.{k}: {len(v)} values for {n_models} ingredients")
    check_weight_sum(entry.name, params, n_models)


# ---------------------------------------------------------------------------------------------- the methods
def _task_vectors(ctx: MethodContext, sparsify: Optional[str], consensus: bool) -> torch.Tensor:
    p = ctx.pivot

    def vector(i: int) -> torch.Tensor:  # weight_i * sparsified (x_i - p); identical on a second pass
        d = ctx.get(i).sub_(p)
        if sparsify == "magnitude":
            d = magnitude(d, ctx.param("density", i), ctx.param("rescale"))
        elif sparsify == "random":
            d = random_drop(d, ctx.param("density", i), ctx.generator(i), ctx.param("rescale"))
        elif sparsify == "outliers":
            d = magnitude_outliers(d, ctx.param("density", i), ctx.param("gamma", i), ctx.param("rescale"))
        elif sparsify == "della":
            d = della_magprune(d, ctx.param("density", i), ctx.param("epsilon", i), ctx.generator(i),
                               ctx.param("rescale"))
        return d.mul_(ctx.param("weight", i))

    weights = [float(ctx.param("weight", i)) for i in range(ctx.n)]
    mixed = torch.zeros_like(p)
    if consensus:  # pass 1: the elected sign of each coordinate; pass 2: the agreeing entries
        for i in range(ctx.n):
            mixed.add_(vector(i))
        positive = mixed >= 0  # the elected sign (a zero sum elects +), one byte per entry
        mixed.zero_()
        divisor = torch.zeros_like(p)
        for i in range(ctx.n):
            d = vector(i)
            agree = torch.where(positive, d > 0, d < 0)  # sign(d) == elected sign (zeros never agree)
            mixed.add_(d.mul_(agree))
            divisor.add_(agree.to(p.dtype), alpha=weights[i])
        divisor[divisor == 0] = 1
    else:
        for i in range(ctx.n):
            mixed.add_(vector(i))
        total = sum(weights)
        divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total, dtype=p.dtype, device=p.device)
    if ctx.param("normalize"):
        mixed.div_(divisor)
    if ctx.param("lambda") != 1:
        mixed.mul_(ctx.param("lambda"))
    return mixed.neg_()  # g = p - (p + mixed)


def _slerp(ctx: MethodContext) -> torch.Tensor:
    """Over the whole tensor, flattened (as mergekit 0.1.5); linear where the two are (anti)parallel."""
    p, t = ctx.pivot, float(ctx.param("t", 0))
    x = ctx.get(0)
    a, b = p.reshape(1, -1), x.reshape(1, -1)
    if a.shape[1] == 0:
        return torch.zeros_like(p)
    na = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    nb = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    na, nb = torch.where(na > 1e-8, na, 1), torch.where(nb > 1e-8, nb, 1)
    dot = ((a / na) * (b / nb)).sum(dim=1, keepdim=True).clamp(-1, 1)
    linear = dot.abs() > float(ctx.param("dot_threshold"))
    theta = torch.acos(torch.where(linear, 0, dot))
    sin = torch.sin(theta)
    ca = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin)
    cb = torch.where(linear, t, torch.sin(t * theta) / sin)
    return (a - (ca * a + cb * b)).reshape(p.shape)


_MIN_NORM_PRODUCT = 1e-6  # mergekit's clamp of |d_i| |d_j| in a cosine


def _pairwise_cosine(ctx: MethodContext, shape: Tuple[int, ...], norms: List[torch.Tensor]) -> torch.Tensor:
    """The mean pairwise cosine as mergekit computes it, each pair's norm product clamped at 1e-6:
    for task vectors so small that a product falls below it (small tensors, tiny updates), where the
    sum-of-unit-vectors shortcut no longer equals mergekit's. Reads the pairs (two copies at a time)."""
    n, p, total = ctx.n, ctx.pivot, None
    for i in range(n):
        a = ctx.get(i).sub_(p).reshape(shape).double()
        for j in range(i + 1, n):
            b = ctx.get(j).sub_(p).reshape(shape).double()
            c = ((a * b).sum(dim=-1, keepdim=True) / (norms[i] * norms[j]).clamp(min=_MIN_NORM_PRODUCT)).clamp(-1, 1)
            total = c if total is None else total.add_(c)
    return total / (n * (n - 1) / 2)


def _model_stock(ctx: MethodContext) -> torch.Tensor:
    """Model Stock: pass 1 the norms of the task vectors and their sum; pass 2 the sum of the unit
    vectors, whose squared norm gives the sum of the pairwise cosines without holding pairs."""
    p, n = ctx.pivot, ctx.n
    if n == 1:  # a one-ingredient step (batch_size 1, or an epoch's last batch) has no angle: a plain step
        return ctx.get(0).sub_(p).neg_()
    filter_wise = bool(ctx.param("filter_wise"))
    # filter-wise: one angle per slice of the last dimension (mergekit's dim=-1 on the tensor as it is)
    shape = (tuple(p.shape) if p.dim() > 1 else (1, -1)) if filter_wise else (1, -1)
    total = torch.zeros_like(p)
    norms = []
    for i in range(n):
        d = ctx.get(i).sub_(p)
        norms.append(torch.linalg.vector_norm(d.reshape(shape).double(), dim=-1, keepdim=True))
        total.add_(d)
    units = torch.zeros(p.reshape(shape).shape, dtype=torch.float64, device=p.device)
    for i in range(n):
        d = ctx.get(i).sub_(p).reshape(shape).double()
        units.add_(d / norms[i].clamp(min=1e-12))
    sq = sum((nm > 1e-12).double() for nm in norms)  # |u_i|^2: 1, or 0 for a zero task vector
    pairs = n * (n - 1) / 2
    cos = ((units.pow(2).sum(dim=-1, keepdim=True) - sq) / 2 / pairs).clamp(-1, 1)
    if any(bool((norms[i] * norms[j] < _MIN_NORM_PRODUCT).any()) for i in range(n) for j in range(i + 1, n)):
        cos = _pairwise_cosine(ctx, shape, norms)
    den = 1 + (n - 1) * cos
    t = torch.where(den.abs() < 1e-6, torch.zeros_like(cos), n * cos / torch.where(den.abs() < 1e-6, 1, den))
    # merge = t * mean + (1 - t) * p = p + t * mean_i d_i  ->  g = -t * mean_i d_i
    return (total.reshape(shape).double() * (-t / n)).to(p.dtype).reshape(p.shape)


def _linear(ctx: MethodContext) -> torch.Tensor:
    """mergekit's linear: the weighted average sum_j weight_j x_j / sum_j weight_j (``normalize``)."""
    p = ctx.pivot
    g = torch.zeros_like(p)
    total = 0.0
    for i in range(ctx.n):
        w = float(ctx.param("weight", i))
        g.add_(ctx.get(i).sub_(p), alpha=w)
        total += w
    if ctx.param("normalize"):
        if abs(total) < 1e-8:  # mergekit divides into NaN; the sum without the division is no average either
            raise ConfigError(f"method_kwargs.weight: the weights of the models in step {ctx.step} sum to 0 on "
                              f"tensor {ctx.key!r} and 'linear' divides by their sum (normalize: true)")
        g.div_(total)
    return g.neg_()


def _della_window(params: Mapping[str, Any], prefix: str) -> None:
    """DELLA keeps entries with probabilities density +- epsilon: both must lie in (0, 1) (mergekit
    raises the same mid-merge; here it is refused before any weight is read). Gradients and filters
    are checked on each of their values."""
    def values(v: Any) -> List[float]:
        out: List[float] = []
        for x in (v if isinstance(v, list) else [v]):
            out += [float(y) for y in (setting_scalars(x, "") if isinstance(x, Mapping) else [x])]
        return out
    for d in values(params["density"]):
        for e in values(params["epsilon"]):
            if d < 1 and (d + e >= 1 or d - e <= 0):
                raise ConfigError(f"{prefix}method_kwargs.epsilon: DELLA keeps entries with probabilities density "
                                  f"+- epsilon, which must lie in (0, 1); density {d} with epsilon {e} does not")


def _task_params(*extra: Param, normalize: bool, rescale: bool) -> Tuple[Param, ...]:
    """A task-vector method's parameters: weight, lambda, int8_mask, density, its own, normalize, rescale."""
    return (WEIGHT, LAMBDA, INT8_MASK, DENSITY, *extra, NORMALIZE.replace(default=normalize),
            RESCALE.replace(default=rescale))


register_method("linear", _linear, params=(WEIGHT, NORMALIZE.replace(default=True)), base="unused",
                description="weighted average of the models (Wortsman et al. 2022's soup, with weights)",
                reference="https://arxiv.org/abs/2203.05482")
register_method("task_arithmetic", lambda c: _task_vectors(c, None, False),  # density: accepted, unused (mergekit)
                params=_task_params(normalize=False, rescale=False), base="required",
                description="sum of weighted task vectors (Ilharco et al. 2023)",
                reference="https://arxiv.org/abs/2212.04089")
register_method("ties", lambda c: _task_vectors(c, "magnitude", True),
                params=_task_params(normalize=True, rescale=False), base="required", passes=2,
                description="trim to the largest magnitudes, elect a sign, disjoint mean (Yadav et al. 2023)",
                reference="https://arxiv.org/abs/2306.01708")
register_method("dare_linear", lambda c: _task_vectors(c, "random", False),
                params=_task_params(normalize=False, rescale=True), base="required",
                description="drop entries at random and rescale, then sum (Yu et al. 2024)",
                reference="https://arxiv.org/abs/2311.03099")
register_method("dare_ties", lambda c: _task_vectors(c, "random", True),
                params=_task_params(normalize=False, rescale=True), base="required", passes=2,
                description="DARE drops, then TIES' sign election", reference="https://arxiv.org/abs/2311.03099")
register_method("breadcrumbs", lambda c: _task_vectors(c, "outliers", False),
                params=_task_params(GAMMA, normalize=False, rescale=False), base="required",
                description="drop the largest outliers and the smallest magnitudes (Davari & Belilovsky 2023)",
                reference="https://arxiv.org/abs/2312.06795")
register_method("breadcrumbs_ties", lambda c: _task_vectors(c, "outliers", True),
                params=_task_params(GAMMA, normalize=False, rescale=False), base="required", passes=2,
                description="breadcrumbs, then TIES' sign election", reference="https://arxiv.org/abs/2312.06795")
register_method("della", lambda c: _task_vectors(c, "della", True),
                params=_task_params(EPSILON, normalize=True, rescale=True), base="required", passes=2,
                check=_della_window, description="drop entries with probabilities by magnitude rank, then TIES' "
                "sign election (Deep et al. 2024)", reference="https://arxiv.org/abs/2406.11617")
register_method("della_linear", lambda c: _task_vectors(c, "della", False),
                params=_task_params(EPSILON, normalize=False, rescale=True), base="required", check=_della_window,
                description="DELLA's drops, then a weighted sum", reference="https://arxiv.org/abs/2406.11617")
register_method("slerp", _slerp, params=(T, Param("dot_threshold", 0.9995)), base="required", models=(1, 1),
                description="spherical interpolation between the base and one model, tensor by tensor",
                reference="https://en.wikipedia.org/wiki/Slerp")
register_method("model_stock", _model_stock, params=(FILTER_WISE,), base="required", models=(2, None), passes=2,
                description="interpolate the mean toward the base by the task vectors' angle (Jang et al. 2024)",
                reference="https://arxiv.org/abs/2403.19522")
