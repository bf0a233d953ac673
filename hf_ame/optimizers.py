"""Registry of ensembling optimizers: names -> ``torch.optim.Optimizer`` subclasses.

AME feeds pseudogradients to an ordinary optimizer, so the registry's entries are the
torch optimizers themselves; users add their own with :func:`register_optimizer`.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Type

import torch

from .errors import OptimizerArgumentError, UnknownOptimizerError

__all__ = [
    "OptimizerEntry",
    "register_optimizer",
    "get_optimizer",
    "list_optimizers",
    "build_optimizer",
    "UnknownOptimizerError",
    "OptimizerArgumentError",
]


@dataclass(frozen=True)
class OptimizerEntry:
    """One registry entry: the torch optimizer class and its default keyword arguments.

    ``elementwise`` declares that the update of each coordinate depends only on that coordinate's
    gradient and state (true of every built-in; false of e.g. LAMB or Adafactor): the engine then
    merges large tensors block by block, in cache, with bit-identical results.
    ``fused_kernel`` names the one-pass Triton kernel of :mod:`hf_ame.kernels` that computes this
    optimizer's update on a GPU ("sgd", "adam", "adamw", "adagrad"; built-ins only, None otherwise).
    """

    name: str
    cls: Type[torch.optim.Optimizer]
    aliases: Tuple[str, ...] = ()
    description: str = ""
    elementwise: bool = False
    fused_kernel: Optional[str] = None

    def defaults(self) -> Dict[str, Any]:
        """The constructor's keyword defaults (lr excluded), read from its signature."""
        out: Dict[str, Any] = {}
        for pname, p in _parameters(self.cls).items():
            if pname in ("self", "params", "lr") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            if p.default is not inspect.Parameter.empty:
                out[pname] = p.default
        return out


@functools.lru_cache(maxsize=None)
def _parameters(cls: type) -> Mapping[str, inspect.Parameter]:
    # inspect.signature costs ~70 us; a CPU merge builds one optimizer per cache block (~1000 for 250M parameters)
    return inspect.signature(cls.__init__).parameters


_REGISTRY: Dict[str, OptimizerEntry] = {}
_ALIASES: Dict[str, str] = {}


def _norm(name: str) -> str:
    return name.strip().lower()


def register_optimizer(
    name: str,
    cls: Type[torch.optim.Optimizer],
    *,
    aliases: Iterable[str] = (),
    description: str = "",
    elementwise: bool = False,
    overwrite: bool = False,
) -> OptimizerEntry:
    """Register ``cls`` (a ``torch.optim.Optimizer`` subclass) under ``name`` (case-insensitive).

    The class is constructed as ``cls(params, lr=..., **kwargs)`` and must honour
    ``param.grad``, like every torch optimizer. Pass ``elementwise=True`` only when each
    coordinate's update depends on that coordinate alone (no norms over a tensor): merges then run
    in cache-sized blocks, several times faster on CPU. Raises ``ValueError`` if the name is taken
    and ``overwrite`` is False, ``TypeError`` if ``cls`` is not an optimizer class.
    """
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"register_optimizer({name!r}): expected a torch.optim.Optimizer subclass, got {cls!r}")
    key = _norm(name)
    names = [key] + [_norm(a) for a in aliases]
    if not overwrite:
        for n in names:
            if n in _REGISTRY or n in _ALIASES:
                raise ValueError(f"optimizer name {n!r} is already registered; pass overwrite=True to replace it")
    entry = OptimizerEntry(key, cls, tuple(_norm(a) for a in aliases),
                           description or (cls.__doc__ or "").strip().split("\n")[0], bool(elementwise))
    _REGISTRY[key] = entry
    for a in entry.aliases:
        _ALIASES[a] = key
    return entry


def get_optimizer(name: str) -> OptimizerEntry:
    """Look up a registry entry by name or alias; the error lists every available name."""
    if not isinstance(name, str):
        raise UnknownOptimizerError(f"optimizer must be a registry name (str), got {type(name).__name__}")
    key = _norm(name)
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise UnknownOptimizerError(
            f"unknown optimizer {name!r}; available: {', '.join(available_names())}"
        )
    return _REGISTRY[key]


def available_names() -> List[str]:
    """All registered names and aliases, sorted."""
    return sorted(list(_REGISTRY) + list(_ALIASES))


def list_optimizers() -> List[OptimizerEntry]:
    """Every registered entry (aliases folded into their entry), sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def build_optimizer(
    name: str, params: List[torch.Tensor], lr: float, kwargs: Optional[Dict[str, Any]] = None
) -> torch.optim.Optimizer:
    """Construct the named optimizer over ``params`` with base learning rate ``lr``.

    Unknown keyword arguments and values the optimizer rejects are re-raised as
    :class:`OptimizerArgumentError` naming the optimizer and the field.
    """
    entry = get_optimizer(name)
    kwargs = dict(kwargs or {})
    sig = _parameters(entry.cls)
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.values())
    for k in kwargs:
        if k in ("params", "lr"):
            raise OptimizerArgumentError(f"optimizer_kwargs.{k}: set it through the AME config, "
                                         "not the optimizer kwargs")
        if k not in sig and not takes_var_kw:
            allowed = ", ".join(sorted(entry.defaults()))
            raise OptimizerArgumentError(
                f"optimizer_kwargs.{k}: not an argument of {entry.name} ({entry.cls.__name__}); accepted: {allowed}"
            )
    try:
        return entry.cls(params, lr=lr, **kwargs)
    except (ValueError, TypeError) as exc:
        field_name = _field_from_message(str(exc), ["lr", *kwargs])
        where = (f"optimizer_kwargs.{field_name}" if field_name and field_name != "lr"
                 else (field_name or "optimizer_kwargs"))
        raise OptimizerArgumentError(f"{where}: {entry.name} rejected the value: {exc}") from exc


def _field_from_message(msg: str, candidates: List[str]) -> Optional[str]:
    """torch's messages read like 'Invalid beta parameter at index 0: 1.5'; map them to a field."""
    low = msg.lower()
    # Longest names first so "weight_decay" wins over "decay"-like fragments.
    for cand in sorted(candidates, key=len, reverse=True):
        stem = cand.rstrip("s")  # "betas" -> "beta"
        if cand.lower() in low or stem.lower() in low or cand.replace("_", " ").lower() in low:
            return cand
    if "learning rate" in low:
        return "lr"
    return None


# Built-ins: the torch.optim classes the paper and the spec name; all coordinate-wise.
_BUILTINS = [
    ("sgd", torch.optim.SGD, ("gd",), "Stochastic gradient descent (uniform soup with lr=1, E=1)"),
    ("adam", torch.optim.Adam, (), "Adam"),
    ("adamw", torch.optim.AdamW, (), "Adam with decoupled weight decay (the paper's default)"),
    ("adagrad", torch.optim.Adagrad, (), "Adagrad (approaches SGD for large eps)"),
    ("adadelta", torch.optim.Adadelta, (), "Adadelta"),
    ("rmsprop", torch.optim.RMSprop, (), "RMSprop"),
    ("adamax", torch.optim.Adamax, (), "Adamax (infinity-norm Adam)"),
    ("nadam", torch.optim.NAdam, (), "Adam with Nesterov momentum"),
    ("radam", torch.optim.RAdam, (), "Rectified Adam"),
]
_FUSED = ("sgd", "adam", "adamw", "adagrad")  # hf_ame.kernels has their update formulas
for _n, _c, _a, _d in _BUILTINS:
    _e = register_optimizer(_n, _c, aliases=_a, description=_d, elementwise=True)
    if _n in _FUSED:
        _REGISTRY[_n] = _e = dataclasses.replace(_e, fused_kernel=_n)
