"""The AME hyperparameters (one dataclass) with validation and a plain-dict round trip."""
from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

from .errors import ConfigError
from .cli_args import key_values
from .methods import get_method, list_methods, method_parameters
from .options import cli_meta
from .optimizers import OptimizerArgumentError, UnknownOptimizerError, build_optimizer, get_optimizer
from .schedules import LR_SCHEDULES

__all__ = ["AMEConfig", "ConfigError", "COMPUTE_DTYPES", "parse_dtype", "AME_FIELDS"]

# the fields that make a method's merge an AME run rather than its one-shot merge (AMEConfig.from_options)
AME_FIELDS = frozenset({"optimizer", "lr", "lr_schedule", "lr_power", "epochs", "batch_size", "amplification",
                        "optimizer_kwargs", "adaptive_pivot"})

COMPUTE_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_ALIASES = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "float": "float32", "double": "float64"}


def parse_dtype(value: Union[str, torch.dtype, None], field_name: str = "dtype") -> Optional[torch.dtype]:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None and 'auto' -> None."""
    if value is None or value == "auto":
        return None
    if isinstance(value, torch.dtype):
        if value not in COMPUTE_DTYPES.values():
            raise ConfigError(f"{field_name}: unsupported dtype {value}; use one of {', '.join(COMPUTE_DTYPES)}")
        return value
    if isinstance(value, str):
        name = value.replace("torch.", "").lower()
        name = _DTYPE_ALIASES.get(name, name)
        if name in COMPUTE_DTYPES:
            return COMPUTE_DTYPES[name]
    raise ConfigError(f"{field_name}: expected one of {', '.join(COMPUTE_DTYPES)} (or 'auto'), got {value!r}")


def _all_if_zero(value: int) -> Optional[int]:
    return None if value == 0 else value  # 0 on the command line: every ingredient in one step


def _index_or_name(text: str) -> Union[str, int]:
    return int(text) if text.lstrip("-").isdigit() else text


def _number_or_linear(text: str) -> Union[float, str]:
    if text == "linear":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expects a number or 'linear', got {text!r}") from None


def _method_help() -> str:
    return ("merge method shaping each step's pseudogradient (" + ", ".join(m.name for m in list_methods())
            + "); alone (no optimizer option given) it is mergekit's one-shot merge of that name")


@dataclass(frozen=True)
class AMEConfig:
    """Every hyperparameter of AME (see ``docs/ame.md``; names match the public API). Frozen: a
    changed value is a new config (:meth:`replace`).

    Attributes:
        optimizer: registry name (``sgd``/``gd``, ``adam``, ``adamw``, ``adagrad``, ``adadelta``,
            ``rmsprop``, ``adamax``, ``nadam``, ``radam`` or a registered one). Default ``"adamw"``.
        lr: base learning rate eta_0 (> 0). Default 1e-3.
        lr_schedule: ``"constant"``, ``"harmonic"`` (eta_0 / t) or ``"power"`` (eta_0 * t**lr_power).
            Default ``"harmonic"`` (the paper's).
        lr_power: exponent alpha of the ``"power"`` schedule. Default -0.5.
        epochs: passes over the ingredients (>= 1). Default 1.
        batch_size: ingredients averaged per optimizer step, B (>= 1; None: all of them in one step).
            Default 1.
        shuffle: draw a seeded permutation of the ingredients every epoch. Default True.
        seed: seed of those permutations. Default 0.
        pivot: initial merge w_0: ``"soup"`` (mean of the ingredients), ``"first"`` (first in
            order), an ingredient's index (int) or name, or a base checkpoint's path / Hub id.
            Default ``"soup"``.
        adaptive_pivot: pseudogradient against the current merge (True) or against w_0 (False).
            Default True.
        amplification: zeta: a number, ``"linear"`` (zeta_t = t + 1) or a callable of the step t
            (given in a dict as ``"module:function"``). Default 1.0.
        optimizer_kwargs: passed to the torch optimizer (betas, eps, weight_decay, momentum, ...).
        compute_dtype: dtype of the merge arithmetic, whatever the storage dtype. Default float32.
            ``bfloat16`` / ``float16`` (a mergekit config's ``dtype``): the ingredients are read
            rounded to that dtype, as mergekit loads them, and rankings break ties on values in it;
            the arithmetic (a method's, the optimizer's and its state) stays float32 and is rounded
            once, on output (a half-precision step w - lr g drops g under half an ulp of w).
        method: a merge method of :mod:`hf_ame.methods` (``ties``, ``dare_ties``, ``task_arithmetic``,
            ``slerp``, ``model_stock``, ...) that builds each step's pseudogradient from task
            vectors; None (default): the plain mean of (pivot - ingredient).
        method_kwargs: the method's parameters, with mergekit's names and defaults (``weight``,
            ``density``, ``gamma``, ``lambda``, ``normalize``, ``rescale``, ``t``, ``filter_wise``);
            ``weight`` / ``density`` / ``gamma`` / ``t`` may be lists, one value per ingredient.
    """

    # metadata: the `hf-ame merge` flag of each field (hf_ame.options.add_option_flags)
    optimizer: str = field(default="adamw", metadata=cli_meta("registry name (see `hf-ame optimizers`); default adamw"))
    lr: float = field(default=1e-3, metadata=cli_meta("base learning rate eta_0; default 1e-3", type=float))
    lr_schedule: str = field(default="harmonic", metadata=cli_meta(
        "default harmonic", choices=["constant", "harmonic", "power"]))
    lr_power: float = field(default=-0.5, metadata=cli_meta("alpha of the power schedule; default -0.5", type=float))
    epochs: int = field(default=1, metadata=cli_meta("passes over the ingredients; default 1", type=int))
    batch_size: Optional[int] = field(default=1, metadata=cli_meta(
        "ingredients per step; default 1 (0: all in one step)", type=int, parse=_all_if_zero))
    shuffle: bool = field(default=True, metadata=cli_meta(
        "keep the given order every epoch", flag="--no-shuffle", action="store_const", const=False))
    seed: int = field(default=0, metadata=cli_meta("shuffle seed; default 0", type=int))
    pivot: Union[str, int] = field(default="soup", metadata=cli_meta(
        "soup | first | ingredient index | base checkpoint folder; default soup", parse=_index_or_name))
    adaptive_pivot: bool = field(default=True, metadata=cli_meta(
        "pseudogradient against the initial pivot instead of the current merge", flag="--no-adaptive-pivot",
        action="store_const", const=False))
    amplification: Union[float, str, Callable[[int], float]] = field(default=1.0, metadata=cli_meta(
        "zeta: a number or 'linear'; default 1", parse=_number_or_linear))
    optimizer_kwargs: Dict[str, Any] = field(default_factory=dict, metadata=cli_meta(
        "optimizer keyword argument (repeatable), e.g. --opt weight_decay=0 --opt betas=[0.9,0.99]", flag="--opt",
        action="append", metavar="KEY=VALUE", parse=key_values))
    compute_dtype: str = field(default="float32", metadata=cli_meta(
        "dtype of the merge arithmetic; default float32 (or the recipe's)"))
    method: Optional[str] = field(default=None, metadata=cli_meta(_method_help))
    method_kwargs: Dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def soup(cls) -> "AMEConfig":
        """The settings under which AME is exactly the uniform soup (spec special case 1)."""
        return cls(optimizer="sgd", lr=1.0, lr_schedule="constant", epochs=1, batch_size=1,
                   shuffle=False, pivot="soup", adaptive_pivot=False, amplification=1.0)

    @classmethod
    def one_shot(cls, method: str, **params: Any) -> "AMEConfig":
        """The settings under which AME with ``method`` is exactly mergekit's merge of that name:
        SGD, lr 1 (constant), one epoch, all ingredients in one step, the pivot fixed at the base
        (``pivot="base"``: the ``base_model`` of ``from_pretrained``; methods without a base, such as
        ``linear``, pivot on the first model). ``params``: the method's."""
        return cls(optimizer="sgd", lr=1.0, lr_schedule="constant", epochs=1, batch_size=None, shuffle=False,
                   pivot="base" if get_method(method).needs_base else "first", adaptive_pivot=False, amplification=1.0,
                   method=method, method_kwargs=_lambda_name(params)).validate()

    @classmethod
    def from_options(cls, prefix: str = "", **fields: Any) -> "AMEConfig":
        """The one rule for a merge asked for by its fields (``merge(...)``'s overrides, CLI flags, a
        recipe's ``merge:`` section): a ``method`` with no optimizer field (optimizer, lr, lr_schedule,
        lr_power, epochs, batch_size, amplification, optimizer_kwargs, adaptive_pivot) is the method's
        one-shot merge (:meth:`one_shot`) with the other fields given; otherwise the defaults of this
        class with the fields given (a method composed with AME). A method's parameters may sit beside
        the fields. ``prefix``: where the fields come from, for error messages (``merge.``)."""
        if fields.get("method") is not None and not set(fields) & AME_FIELDS:
            start = cls.one_shot(fields["method"]).to_dict()
            start.pop("method_kwargs")  # the method's defaults, unless given
            fields = {**start, **fields}
        return cls.from_dict(fields, prefix=prefix) if fields else cls()

    @classmethod
    def robust(cls, epochs: int = 20, delta: float = 1.5, tol: float = 1e-6) -> "AMEConfig":
        """A merge that needs no evaluation data and stays good when a few ingredients are far off
        (diverged, rescaled, corrupt): the per-tensor Huber M-estimate of the ingredients' centre by
        ``epochs`` iteratively reweighted steps (method ``huber``, SGD lr 1 constant, every ingredient
        in each step, adaptive pivot from the soup). An ingredient within ``delta`` median distances
        of the current merge weighs 1, a farther one delta x median / distance: on a clean set (every
        ingredient within delta medians) it is the soup; a far-off one's pull is capped. A tensor stops
        iterating once a step moves it by at most ``tol`` x its norm (default 1e-6, near float32's
        rounding: on a clean set that is the first step; 0 runs every epoch)."""
        return cls(optimizer="sgd", lr=1.0, lr_schedule="constant", epochs=epochs, batch_size=None, shuffle=False,
                   pivot="soup", adaptive_pivot=True, amplification=1.0, method="huber",
                   method_kwargs={"delta": delta, "tol": tol}).validate()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, prefix: str = "") -> "AMEConfig":
        """Build from a plain dict (as :meth:`to_dict` writes it); unknown keys are errors."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(_route_method_params(dict(data), names)) - names)
        if unknown:
            raise ConfigError(
                f"{prefix}{unknown[0]}: unknown field; expected one of {', '.join(sorted(names))}"
            )
        values = _route_method_params(dict(data), names)
        amp = values.get("amplification")
        if isinstance(amp, str) and ":" in amp:
            values["amplification"] = _import_callable(amp, f"{prefix}amplification")
        cfg = cls(**values)
        cfg.validate(prefix=prefix)
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        """A plain, YAML-safe dict; a callable amplification becomes ``"module:qualname"``."""
        out = dataclasses.asdict(self)
        out["optimizer_kwargs"] = {k: (list(v) if isinstance(v, tuple) else v)
                                   for k, v in self.optimizer_kwargs.items()}
        if self.method is None:  # recipes of plain AME merges stay as they were
            out.pop("method")
            out.pop("method_kwargs")
        else:
            out["method_kwargs"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.method_kwargs.items()}
        if callable(self.amplification):
            fn = self.amplification
            path = f"{getattr(fn, '__module__', '')}:{getattr(fn, '__qualname__', '')}"
            if "<" in path or path.startswith(":"):
                raise ConfigError(
                    "amplification: a lambda or local function cannot be written to a recipe; "
                    "use a module-level function"
                )
            out["amplification"] = path
        return out

    def replace(self, **overrides: Any) -> "AMEConfig":
        """A validated copy with some fields changed."""
        cfg = dataclasses.replace(self, **_route_method_params(
            dict(overrides), {f.name for f in dataclasses.fields(self)}, self.method, self.method_kwargs))
        cfg.validate()
        return cfg

    # ------------------------------------------------------------------ validation
    @property
    def torch_compute_dtype(self) -> torch.dtype:
        """The dtype of a method's arithmetic (mergekit's ``dtype``)."""
        return parse_dtype(self.compute_dtype, "compute_dtype") or torch.float32

    @property
    def torch_state_dtype(self) -> torch.dtype:
        """The dtype of the merge state (the optimizer's weights and moments, the soup): float32 when
        the compute dtype is a half type (a bf16 step w - lr g loses g where it is under half an ulp
        of w, and torch 2.13's fused CPU SGD leaves most bf16 elements unchanged), else the compute dtype."""
        dt = self.torch_compute_dtype
        return torch.float32 if dt in (torch.bfloat16, torch.float16) else dt

    def validate(self, prefix: str = "") -> "AMEConfig":
        """Check every field (and the optimizer's own argument checks) without touching any model."""
        self._validate_optimizer_and_schedule(prefix)
        self._validate_steps_and_pivot(prefix)
        self._validate_method(prefix)
        self._validate_dtype_and_optimizer_arguments(prefix)
        return self

    def _validate_optimizer_and_schedule(self, p: str) -> None:
        """optimizer (a registry name), lr, lr_schedule and lr_power."""
        if not isinstance(self.optimizer, str):
            raise _expected(p, "optimizer", "a registry name", self.optimizer)
        try:
            get_optimizer(self.optimizer)
        except UnknownOptimizerError as exc:
            raise ConfigError(f"{p}optimizer: {exc}") from None
        if (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr)
                or self.lr <= 0):
            raise _expected(p, "lr", "a positive number", self.lr)
        if self.lr_schedule not in LR_SCHEDULES:
            raise _expected(p, "lr_schedule", f"one of {', '.join(LR_SCHEDULES)}", self.lr_schedule)
        if (isinstance(self.lr_power, bool) or not isinstance(self.lr_power, (int, float))
                or not math.isfinite(self.lr_power)):
            raise _expected(p, "lr_power", "a finite number", self.lr_power)

    def _validate_steps_and_pivot(self, p: str) -> None:
        """epochs, batch_size, seed, shuffle, adaptive_pivot, pivot and amplification."""
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if (name != "batch_size" or v is not None) and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                all_ingredients = " (or None: all ingredients)" if name == "batch_size" else ""
                raise _expected(p, name, "an integer >= 1" + all_ingredients, v)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _expected(p, "seed", "an integer", self.seed)
        for name in ("shuffle", "adaptive_pivot"):
            if not isinstance(getattr(self, name), bool):
                raise _expected(p, name, "true or false", getattr(self, name))
        if isinstance(self.pivot, bool) or not isinstance(self.pivot, (str, int)) or self.pivot == "":
            raise _expected(p, "pivot", "'soup', 'first', an ingredient index or name, or a base checkpoint",
                            self.pivot)
        amp = self.amplification
        if not callable(amp):
            if isinstance(amp, str):
                if amp != "linear":
                    raise _expected(p, "amplification", "a number, 'linear' or a callable", amp)
            elif isinstance(amp, bool) or not isinstance(amp, (int, float)) or not math.isfinite(amp):
                raise _expected(p, "amplification", "a number, 'linear' or a callable", amp)

    def _validate_method(self, p: str) -> None:
        """optimizer_kwargs is a mapping; the method, its parameters and the batch size it allows."""
        if not isinstance(self.optimizer_kwargs, Mapping):
            raise _expected(p, "optimizer_kwargs", "a mapping", self.optimizer_kwargs)
        if self.method is not None:
            if not isinstance(self.method_kwargs, Mapping):
                raise _expected(p, "method_kwargs", "a mapping", self.method_kwargs)
            method_parameters(self.method, self.method_kwargs, p)  # the name and every parameter
            lo, hi = get_method(self.method).models
            if lo > 1 and hi is not None and self.batch_size is not None and not lo <= self.batch_size <= hi:
                raise _expected(p, "batch_size", f"None (every ingredient in each step): {self.method!r} merges "
                                f"{lo if lo == hi else f'{lo} to {hi}'} models in each step", self.batch_size)
        elif self.method_kwargs:
            raise _expected(p, "method_kwargs", "nothing without a method", self.method_kwargs)

    def _validate_dtype_and_optimizer_arguments(self, p: str) -> None:
        """compute_dtype, then the optimizer's own argument checks."""
        parse_dtype(self.compute_dtype, f"{p}compute_dtype")
        if self.compute_dtype in (None, "auto"):
            raise _expected(p, "compute_dtype", f"one of {', '.join(COMPUTE_DTYPES)}", self.compute_dtype)
        # Let the optimizer run its own argument checks now, on a one-element tensor, so a bad
        # beta or eps fails before any checkpoint is read.
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in self.optimizer_kwargs.items()}
        if kwargs:  # with no kwargs there is nothing left to check (and constructing costs torch a lazy import)
            try:
                build_optimizer(self.optimizer, [torch.zeros(1)], lr=float(self.lr), kwargs=kwargs)
            except OptimizerArgumentError as exc:
                raise ConfigError(f"{p}{exc}") from None

    def method_arguments(self) -> Dict[str, Any]:
        """The method's parameters with its defaults filled in ({} without a method)."""
        return method_parameters(self.method, self.method_kwargs) if self.method is not None else {}

    def optimizer_arguments(self) -> Dict[str, Any]:
        """optimizer_kwargs with YAML lists turned back into the tuples torch expects."""
        return {k: (tuple(v) if isinstance(v, list) else v) for k, v in self.optimizer_kwargs.items()}


def _expected(prefix: str, name: str, expected: str, got: Any) -> ConfigError:
    """The error for a field whose value is not what it should be."""
    return ConfigError(f"{prefix}{name}: expected {expected}, got {got!r}")


def _lambda_name(params: Mapping[str, Any]) -> Dict[str, Any]:
    return {("lambda" if k == "lambda_" else k): v for k, v in params.items()}


def _route_method_params(values: Dict[str, Any], fields: Any, method: Optional[str] = None,
                         kwargs: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Move a method's parameters given beside the fields (``merge(method="ties", density=0.5)``,
    a recipe's ``merge: {method: ties, density: 0.5}``) into ``method_kwargs``."""
    name = values.get("method", method)
    extra = {k: values.pop(k) for k in list(values) if k not in fields}
    if not extra:
        return values
    if name is None:
        values.update(extra)  # reported as unknown fields
        return values
    known = set(get_method(name).defaults) | {"lambda_"}
    merged = dict(values.get("method_kwargs", kwargs) or {})
    for k, v in extra.items():
        if k in known:
            merged[k] = v
        else:
            values[k] = v
    values["method_kwargs"] = _lambda_name(merged)
    return values


def _import_callable(path: str, field_name: str) -> Callable[[int], float]:
    module, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{field_name}: cannot import {path!r}: {exc}") from None
    if not callable(obj):
        raise ConfigError(f"{field_name}: {path!r} is not callable")
    return obj
