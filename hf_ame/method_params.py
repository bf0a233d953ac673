"""The parameters of merge methods, declared once: :class:`Param` and the shared vocabulary.

A method's registration (:func:`hf_ame.methods.register_method`) lists its :class:`Param` objects
(name, default, the check of a value and the text of what a value must be, per-ingredient or
global, number or true/false) and the base model's role (one of :data:`BASE_ROLES`). The names
mergekit's methods share (``weight``, ``density``, ``gamma``, ``epsilon``, ``t``, ``lambda``,
``normalize``, ``rescale``, ``int8_mask``, ...) are declared here once (:data:`SHARED`); a method
whose parameter means something else under the same name declares its own, e.g.
``T.replace(test=non_negative, what="a distance >= 0")`` (nearswap's ``t``).

A value is a scalar, a list with one value per ingredient (``per_model`` parameters), or a
mergekit setting (``{gradient: [...]}`` / ``{filters: [...]}``) whose every value is checked; a
setting is resolved on each tensor at its layer position (:func:`resolve_setting`,
:func:`layer_position`). No tensors here: declarations, checks and settings only.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import ConfigError
from .limits import MAX_ITER

__all__ = ["Param", "BASE_ROLES", "SHARED", "declare", "declarations", "flag", "setting_scalars", "finite",
           "positive", "non_negative", "WEIGHT", "LAMBDA", "DENSITY", "GAMMA", "EPSILON", "T", "EPS", "DELTA",
           "MAX_ITERATIONS", "TOL", "SELECT_TOPK", "R", "ALPHA", "COMMON_SPACE_FRACTION", "NORMALIZE", "RESCALE",
           "INT8_MASK", "FILTER_WISE", "NUSLERP_ROW_WISE", "NUSLERP_FLATTEN", "NORMALIZE_WEIGHTS", "check_weight_sum",
           "resolve_setting", "layer_position", "decoder_layers", "layer_positions"]

# the base model's role in a method: its task vectors are measured from the base ("required"); from the
# base when the pivot is the base, else it works on the models themselves ("optional"); no base ("unused")
BASE_ROLES = ("required", "optional", "unused")
KINDS = ("number", "bool")
SETTING_HELP = "; or {gradient: [..]} / {filters: [..]}"


def finite(v: float) -> bool:
    return math.isfinite(v)


def positive(v: float) -> bool:
    return v > 0


def non_negative(v: float) -> bool:
    return v >= 0


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method: its ``name`` and ``default``; ``test(value)`` says whether a
    number is allowed and ``what`` says what it must be (the text of the error and of the form's
    help); ``per_model``: a list with one value per ingredient is allowed; ``kind``: ``"number"`` or
    ``"bool"`` (true or false: ``test`` and ``what`` are then fixed)."""

    name: str
    default: Any
    test: Callable[[Any], bool] = finite
    what: str = "a finite number"
    per_model: bool = False
    kind: str = "number"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"parameter {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "bool" and (self.test is not _is_bool or self.what != "true or false"):
            raise ValueError(f"parameter {self.name!r}: a true/false parameter takes no test or text; use flag()")

    def replace(self, **changes: Any) -> "Param":
        """This declaration with some fields changed (a method's own default or range)."""
        return dataclasses.replace(self, **changes)

    def help(self) -> str:
        """What a value must be, as the generated parameter form shows it."""
        if self.kind == "bool":
            return self.what
        return self.what + (", or one per ingredient [..]" if self.per_model else "") + SETTING_HELP

    def check(self, value: Any, where: str) -> None:
        """:class:`ConfigError` naming ``where`` unless ``value`` is allowed (settings: each of their values)."""
        if isinstance(value, Mapping) or (isinstance(value, list) and any(isinstance(v, Mapping) for v in value)):
            for v in (value if isinstance(value, list) else [value]):
                for x in setting_scalars(v, where):
                    self.check(x, where)
            return
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected {self.what}, got {value!r}")
            return
        values = value if (isinstance(value, list) and self.per_model) else [value]
        for v in values:
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not self.test(v):
                extra = " (or one per ingredient)" if self.per_model else ""
                raise ConfigError(f"{where}: expected {self.what}{extra}, got {value!r}")


def flag(name: str, default: bool) -> Param:
    """A true/false parameter."""
    return Param(name, default, _is_bool, "true or false", kind="bool")


def setting_scalars(value: Any, where: str) -> List[Any]:
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
            out += setting_scalars(cond["value"], where)
        return out
    raise ConfigError(f"{where}: a setting is a value, {{gradient: [values]}} or {{filters: [...]}}, got {value!r}")


def _whole_iterations(v: float) -> bool:
    return math.isfinite(v) and 1 <= v <= MAX_ITER and int(v) == v


# ---------------------------------------------------------------------------------------------- the vocabulary
# mergekit's per-model parameters: one value, or a list with one value per ingredient (merge order)
WEIGHT = Param("weight", 1.0, per_model=True)
DENSITY = Param("density", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]", per_model=True)
GAMMA = Param("gamma", 0.01, lambda v: 0 <= v < 1, "a number in [0, 1)", per_model=True)
EPSILON = Param("epsilon", 0.15, lambda v: 0 <= v < 1, "a number in [0, 1)", per_model=True)
T = Param("t", 0.5, lambda v: 0 <= v <= 1, "a number in [0, 1]", per_model=True)
# global numbers
LAMBDA = Param("lambda", 1.0)
EPS = Param("eps", 1e-8, positive, "a positive number")
DELTA = Param("delta", 1.5, positive, "a positive number (median distances)")
MAX_ITERATIONS = Param("max_iter", 10, _whole_iterations, f"a whole number from 1 to {MAX_ITER:,}")
TOL = Param("tol", 1e-5, non_negative, "a number >= 0")
SELECT_TOPK = Param("select_topk", 1.0, lambda v: 0 <= v <= 1, "a number in [0, 1]")
R = Param("r", 0.1, non_negative, "a number >= 0")
ALPHA = Param("alpha", 0.2, non_negative, "a number >= 0")
COMMON_SPACE_FRACTION = Param("common_space_fraction", 0.8, lambda v: 0 <= v <= 1, "a number in [0, 1]")
# true or false
NORMALIZE = flag("normalize", False)
RESCALE = flag("rescale", False)
INT8_MASK = flag("int8_mask", False)
FILTER_WISE = flag("filter_wise", False)
NUSLERP_ROW_WISE = flag("nuslerp_row_wise", False)
NUSLERP_FLATTEN = flag("nuslerp_flatten", True)
NORMALIZE_WEIGHTS = flag("normalize_weights", True)

SHARED: Mapping[str, Param] = MappingProxyType({p.name: p for p in (
    WEIGHT, DENSITY, GAMMA, EPSILON, T, LAMBDA, EPS, DELTA, MAX_ITERATIONS, TOL, SELECT_TOPK, R, ALPHA,
    COMMON_SPACE_FRACTION, NORMALIZE, RESCALE, INT8_MASK, FILTER_WISE, NUSLERP_ROW_WISE, NUSLERP_FLATTEN,
    NORMALIZE_WEIGHTS)})


def declare(name: str, default: Any) -> Param:
    """The declaration of a parameter given only by its default (``register_method(defaults=...)``):
    the shared one of that name, at this default; else true/false for a bool default, else a finite number."""
    shared: Optional[Param] = SHARED.get(name)
    if shared is not None:
        return shared.replace(default=default)
    return flag(name, default) if isinstance(default, bool) else Param(name, default)


def declarations(params: Tuple[Param, ...], defaults: Mapping[str, Any]) -> Tuple[Param, ...]:
    """``params`` then a declaration for each of ``defaults``; ``ValueError`` on a name given twice."""
    out: Dict[str, Param] = {}
    for p in (*params, *(declare(k, v) for k, v in dict(defaults).items())):
        if not isinstance(p, Param):
            raise ValueError(f"expected Param declarations, got {p!r}")
        if p.name in out:
            raise ValueError(f"parameter {p.name!r} is declared twice")
        out[p.name] = p
    return tuple(out.values())


def check_weight_sum(method: str, params: Mapping[str, Any], n_models: int) -> None:
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
        which = "normalize_weights" if params.get("normalize_weights") is True else "normalize"
        raise ConfigError(f"method_kwargs.weight: the weights {w!r} sum to 0 and {method!r} divides by their sum "
                          f"({which}: true); give weights with a non-zero sum (or {which}: false)")


# ---------------------------------------------------------------------------------------------- settings per tensor
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
