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
- ``geometric_median`` (Weiszfeld steps) and ``huber`` (reweighted steps toward the Huber
  M-estimate: the soup on a clean set, far-off models capped), hf_ame's robust centres.

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
import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .errors import ConfigError
from .limits import MAX_ITER

__all__ = ["MethodEntry", "MethodContext", "register_method", "get_method", "list_methods", "method_parameters",
           "PER_MODEL", "parameter_help"]

# parameters that may be one value per ingredient (a list in merge order), as mergekit's per-model parameters
PER_MODEL = ("weight", "density", "gamma", "epsilon", "t")


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
        text = f"{self.seed}/{self.key}/{self.step}/{self.indices[i]}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1)


def resolve_setting(value: Any, tensor: str, t: float) -> Any:
    """A parameter setting on one tensor, as mergekit 0.1.5's ``evaluate_setting``: a scalar; a
    gradient ``{"gradient": [v0, ..., vk]}`` interpolated linearly at ``t`` (booleans: the value at
    ``int(t * k)``); ``{"filters": [{"filter": substring or None, "value": setting}, ...]}``, the
    first whose filter is None, ``"*"`` or a substring of the tensor's name. None when no filter matches."""
    if not isinstance(value, Mapping):
        return value
    if "gradient" in value:
        values = list(value["gradient"])
        if not values:
            return None
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    for cond in value.get("filters", ()):
        f = cond.get("filter")
        if f is None or f == "*" or (tensor and f in tensor):
            return resolve_setting(cond["value"], tensor, t)
    return None


def layer_position(tensor: str, num_layers: Optional[int]) -> float:
    """mergekit's t of a tensor: layer i of L is i / (L - 1) (1 when L == 1); tensors outside the
    decoder layers (embeddings, final norm, head) are 0."""
    m = _LAYER.search(tensor)
    if m is None or not num_layers:
        return 0.0
    index = int(m.group(1) or m.group(2))  # ".layers.N." or GPT-2 / Falcon / Bloom's ".h.N."
    return index / (num_layers - 1) if num_layers > 1 else 1.0


_LAYER = re.compile(r"\.layers?\.(\d+)\.|\.h\.(\d+)\.")


def decoder_layers(config: Mapping[str, Any]) -> Optional[int]:
    """The layer count L of :func:`layer_position`, from a checkpoint's config.json (``num_hidden_layers``,
    or its ``text_config``'s for multimodal models); None when it has none."""
    layers = config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
    return layers if isinstance(layers, int) else None


def layer_positions(tensors: Sequence[str], config: Mapping[str, Any]) -> List[float]:
    """:func:`layer_position` of each tensor name, the layer count read from ``config`` (config.json)."""
    layers = decoder_layers(config)
    return [layer_position(n, layers) for n in tensors]


def get_method_default(params: Mapping[str, Any], name: str) -> Any:
    """The method's own default of ``name`` (``params["__method__"]`` names the method)."""
    return get_method(params["__method__"]).defaults[name]


@dataclass(frozen=True)
class MethodEntry:
    """One registered method: ``fn(ctx) -> pseudogradient`` (float, the pivot's shape and device).

    ``defaults``: every parameter with its default (mergekit's); ``needs_base``: its one-shot form
    measures task vectors from a base model; ``optional_base``: it measures them from the base when
    the pivot is the base (``ctx.has_base``), else works on the models themselves (mergekit's
    optional base); ``models``: (min, max) ingredients besides the base; ``passes``: how many times
    ``fn`` reads each batch ingredient (the reader prefetches along it)."""

    name: str
    fn: Callable[[MethodContext], torch.Tensor]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    needs_base: bool = True
    models: Tuple[int, Optional[int]] = (1, None)
    passes: int = 1
    reference: str = ""
    optional_base: bool = False


_METHODS: Dict[str, MethodEntry] = {}


def register_method(name: str, fn: Callable[[MethodContext], torch.Tensor], *, defaults: Mapping[str, Any] = (),
                    description: str = "", needs_base: bool = True, models: Tuple[int, Optional[int]] = (1, None),
                    passes: int = 1, reference: str = "", optional_base: bool = False,
                    overwrite: bool = False) -> MethodEntry:
    """Register a pseudogradient transform under ``name`` (see :class:`MethodEntry`); raises
    ``ValueError`` if the name is taken and ``overwrite`` is False."""
    key = name.lower()
    if key in _METHODS and not overwrite:
        raise ValueError(f"method name {key!r} is already registered; pass overwrite=True to replace it")
    entry = MethodEntry(key, fn, dict(defaults), description, needs_base, models, passes, reference, optional_base)
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
    ``lambda``), each checked; errors name the field (``method_kwargs.density: ...``)."""
    entry = get_method(name)
    out = dict(entry.defaults)
    out["__method__"] = entry.name
    for k, v in kwargs.items():
        k = "lambda" if k == "lambda_" else k
        if k not in entry.defaults:
            raise ConfigError(f"{prefix}method_kwargs.{k}: not a parameter of {entry.name!r}; expected one of "
                              f"{', '.join(sorted(entry.defaults)) or 'none'}")
        out[k] = list(v) if isinstance(v, tuple) else v
    for k, v in out.items():
        if k != "__method__":
            _check_param(entry.name, k, v, f"{prefix}method_kwargs.{k}")
    if entry.name in ("della", "della_linear"):
        _check_della(out, prefix)
    return out


def _check_della(params: Mapping[str, Any], prefix: str) -> None:
    """DELLA keeps entries with probabilities density +- epsilon: both must lie in (0, 1) (mergekit
    raises the same mid-merge; here it is refused before any weight is read). Gradients and filters
    are checked on each of their values."""
    def values(v: Any) -> List[float]:
        out: List[float] = []
        for x in (v if isinstance(v, list) else [v]):
            out += [float(y) for y in (_scalars(x, "") if isinstance(x, Mapping) else [x])]
        return out
    for d in values(params["density"]):
        for e in values(params["epsilon"]):
            if d < 1 and (d + e >= 1 or d - e <= 0):
                raise ConfigError(f"{prefix}method_kwargs.epsilon: DELLA keeps entries with probabilities density "
                                  f"+- epsilon, which must lie in (0, 1); density {d} with epsilon {e} does not")


_RANGES = {  # name: (test, what it must be)
    "eps": (lambda v: v > 0, "a positive number"),
    "delta": (lambda v: v > 0, "a positive number (median distances)"),
    "density": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "gamma": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "epsilon": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "t": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "weight": (math.isfinite, "a finite number"),
    "lambda": (math.isfinite, "a finite number"),
    "max_iter": (lambda v: math.isfinite(v) and 1 <= v <= MAX_ITER and int(v) == v, f"a whole number from 1 to {MAX_ITER:,}"),
    "tol": (lambda v: v >= 0, "a number >= 0"),
    "select_topk": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "r": (lambda v: v >= 0, "a number >= 0"),
    "alpha": (lambda v: v >= 0, "a number >= 0"),
    "common_space_fraction": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
}
_METHOD_RANGES = {  # where a method's parameter means something else than the name elsewhere
    ("nearswap", "t"): (lambda v: v >= 0, "a distance >= 0"),
    ("ram", "epsilon"): (lambda v: v >= 0, "a number >= 0"),
    ("ramplus_tl", "epsilon"): (lambda v: v >= 0, "a number >= 0"),
    ("multislerp", "eps"): (lambda v: v >= 0, "a number >= 0"),
}
_BOOLS = ("normalize", "rescale", "filter_wise", "int8_mask", "nuslerp_row_wise", "nuslerp_flatten", "normalize_weights")


def _scalars(value: Any, where: str) -> List[Any]:
    """Every scalar inside a setting (gradients, filters), checking the setting's shape."""
    if not isinstance(value, Mapping):
        return [value]
    if set(value) == {"gradient"} and isinstance(value["gradient"], list) and value["gradient"]:
        return list(value["gradient"])
    if set(value) == {"filters"} and isinstance(value["filters"], list):
        out: List[Any] = []
        for cond in value["filters"]:
            if not (isinstance(cond, Mapping) and "value" in cond and set(cond) <= {"filter", "value"}):
                raise ConfigError(f"{where}: each filter is {{filter: <substring>, value: <setting>}}, got {cond!r}")
            out += _scalars(cond["value"], where)
        return out
    raise ConfigError(f"{where}: a setting is a value, {{gradient: [values]}} or {{filters: [...]}}, got {value!r}")


def parameter_help(method: str, name: str) -> str:
    """What a value of ``method``'s parameter ``name`` must be, as its check says it (e.g. "a number in
    (0, 1], or one per ingredient; a gradient or filters"): the text of a generated parameter form."""
    if name in _BOOLS:
        return "true or false"
    what = (_METHOD_RANGES.get((get_method(method).name, name)) or _RANGES.get(name, (None, "a finite number")))[1]
    return what + (", or one per ingredient [..]" if name in PER_MODEL else "") + "; or {gradient: [..]} / {filters: [..]}"


def _check_param(method: str, name: str, value: Any, where: str) -> None:
    if isinstance(value, Mapping) or (isinstance(value, list) and any(isinstance(v, Mapping) for v in value)):
        for v in (value if isinstance(value, list) else [value]):
            for x in _scalars(v, where):
                _check_param(method, name, x, where)
        return
    if name in _BOOLS:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return
    test, what = _METHOD_RANGES.get((method, name)) or _RANGES.get(name, (math.isfinite, "a finite number"))
    values = value if (isinstance(value, list) and name in PER_MODEL) else [value]
    values = [v for v in values if v is not None]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not test(v):
            extra = " (or one per ingredient)" if name in PER_MODEL else ""
            raise ConfigError(f"{where}: expected {what}{extra}, got {value!r}")


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
    _check_weight_sum(entry.name, params, n_models)


def _check_weight_sum(method: str, params: Mapping[str, Any], n_models: int) -> None:
    """One rule for every method that divides by the sum of the weights (``normalize`` /
    ``normalize_weights``): weights summing to 0 are refused (mergekit's linear gives NaN; a silent
    fallback would write one model as "the merge"). Gradients and filters are checked per tensor."""
    if not (params.get("normalize") is True or params.get("normalize_weights") is True) or "weight" not in params:
        return
    w = params["weight"]
    values = w if isinstance(w, list) else [w] * n_models
    if any(isinstance(v, (Mapping, bool)) or not isinstance(v, (int, float)) for v in values):
        return
    if abs(sum(values)) < 1e-8:
        flag = "normalize_weights" if params.get("normalize_weights") is True else "normalize"
        raise ConfigError(f"method_kwargs.weight: the weights {w!r} sum to 0 and {method!r} divides by their sum "
                          f"({flag}: true); give weights with a non-zero sum (or {flag}: false)")


# ---------------------------------------------------------------------------------------------- sparsification
def _rescale_l1_inplace(masked: torch.Tensor, before: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
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
            keep[torch.argsort(a.float() if a.device.type == "cpu" else a, descending=True)[:k]] = True  # as mergekit sorts
    return keep


def magnitude(d: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the ``density`` largest magnitudes (at least one entry); ``d`` is changed in place."""
    if density >= 1:
        return d
    k = max(1, int(density * d.numel()))
    keep = top_k_mask(d.abs().reshape(-1), k).view_as(d)
    before = d.abs().sum() if rescale else None
    d.mul_(keep.view_as(d))  # in place: d is the caller's fresh copy
    return _rescale_l1_inplace(d, before) if rescale else d


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
    return _rescale_l1_inplace(d, before) if rescale else d


def random_drop(d: torch.Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE), rescaled to the original L1 norm; in place."""
    if density >= 1:
        return d
    keep = torch.empty(d.shape, dtype=torch.float32).bernoulli_(float(density), generator=generator)
    before = d.abs().sum() if rescale else None
    d.mul_(keep.to(device=d.device, dtype=d.dtype))  # in place: d is the caller's fresh copy
    return _rescale_l1_inplace(d, before) if rescale else d


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
    return _rescale_l1_inplace(d, before) if rescale else d


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
    a far-off model's pull is capped at delta s. Pass 1 the distances, pass 2 the weighted sum."""
    p = ctx.pivot
    delta, eps = float(ctx.param("delta")), float(ctx.param("eps"))
    r = [float(torch.linalg.vector_norm(ctx.get(i).sub_(p))) for i in range(ctx.n)]
    cap = delta * max(statistics.median(r), eps)
    weights = [1.0 if ri <= cap else cap / ri for ri in r]
    acc = torch.zeros_like(p)
    for i in range(ctx.n):
        acc.add_(ctx.get(i).sub_(p), alpha=weights[i])
    return acc.div_(sum(weights)).neg_()


register_method("huber", _huber, defaults={"delta": 1.5, "eps": 1e-12}, needs_base=False, passes=2,
                description="IRLS steps toward the Huber M-estimate: the soup on a clean set, far-off models capped",
                reference="https://en.wikipedia.org/wiki/Huber_loss")
register_method("geometric_median", _geometric_median, defaults={"eps": 1e-8}, needs_base=False,
                description="Weiszfeld steps toward the geometric median (robust to a few far-off models)",
                reference="https://en.wikipedia.org/wiki/Geometric_median")
register_method("linear", _linear, defaults={"weight": 1.0, "normalize": True}, needs_base=False,
                description="weighted average of the models (Wortsman et al. 2022's soup, with weights)",
                reference="https://arxiv.org/abs/2203.05482")
_TV = {"weight": 1.0, "lambda": 1.0, "int8_mask": False}
register_method("task_arithmetic", lambda c: _task_vectors(c, None, False),  # density: accepted, unused (mergekit)
                defaults={**_TV, "density": 1.0, "normalize": False, "rescale": False},
                description="sum of weighted task vectors (Ilharco et al. 2023)",
                reference="https://arxiv.org/abs/2212.04089")
register_method("ties", lambda c: _task_vectors(c, "magnitude", True),
                defaults={**_TV, "density": 1.0, "normalize": True, "rescale": False}, passes=2,
                description="trim to the largest magnitudes, elect a sign, disjoint mean (Yadav et al. 2023)",
                reference="https://arxiv.org/abs/2306.01708")
register_method("dare_linear", lambda c: _task_vectors(c, "random", False),
                defaults={**_TV, "density": 1.0, "normalize": False, "rescale": True},
                description="drop entries at random and rescale, then sum (Yu et al. 2024)",
                reference="https://arxiv.org/abs/2311.03099")
register_method("dare_ties", lambda c: _task_vectors(c, "random", True),
                defaults={**_TV, "density": 1.0, "normalize": False, "rescale": True}, passes=2,
                description="DARE drops, then TIES' sign election", reference="https://arxiv.org/abs/2311.03099")
register_method("breadcrumbs", lambda c: _task_vectors(c, "outliers", False),
                defaults={**_TV, "density": 1.0, "gamma": 0.01, "normalize": False, "rescale": False},
                description="drop the largest outliers and the smallest magnitudes (Davari & Belilovsky 2023)",
                reference="https://arxiv.org/abs/2312.06795")
register_method("breadcrumbs_ties", lambda c: _task_vectors(c, "outliers", True),
                defaults={**_TV, "density": 1.0, "gamma": 0.01, "normalize": False, "rescale": False}, passes=2,
                description="breadcrumbs, then TIES' sign election", reference="https://arxiv.org/abs/2312.06795")
register_method("della", lambda c: _task_vectors(c, "della", True),
                defaults={**_TV, "density": 1.0, "epsilon": 0.15, "normalize": True, "rescale": True}, passes=2,
                description="drop entries with probabilities by magnitude rank, then TIES' sign election "
                            "(Deep et al. 2024)", reference="https://arxiv.org/abs/2406.11617")
register_method("della_linear", lambda c: _task_vectors(c, "della", False),
                defaults={**_TV, "density": 1.0, "epsilon": 0.15, "normalize": False, "rescale": True},
                description="DELLA's drops, then a weighted sum", reference="https://arxiv.org/abs/2406.11617")
register_method("slerp", _slerp, defaults={"t": 0.5, "dot_threshold": 0.9995}, models=(1, 1),
                description="spherical interpolation between the base and one model, tensor by tensor",
                reference="https://en.wikipedia.org/wiki/Slerp")
register_method("model_stock", _model_stock, defaults={"filter_wise": False}, models=(2, None), passes=2,
                description="interpolate the mean toward the base by the task vectors' angle (Jang et al. 2024)",
                reference="https://arxiv.org/abs/2403.19522")
