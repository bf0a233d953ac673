"""The page's form as data, both ways, without gradio (so it is tested without a browser or a server).

Form values (field key -> value, as the page's components hold them) become a validated recipe
(:func:`form_recipe`) and the arguments of ``from_recipe`` / ``merge`` (:func:`load_kwargs`,
:func:`merge_kwargs`); a recipe or mergekit config becomes form values again (:func:`recipe_form`).
:class:`Registry` is what the generated parameter fields are made from; :class:`Settings` says whether
the page is a shared one (``share_safe``), which changes what a form may ask for.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import yaml

from .config import AMEConfig
from .errors import ConfigError
from .methods import list_methods
from .optimizers import list_optimizers
from .recipe import Recipe

NO_METHOD = "none (AME: the mean pseudogradient)"
ONE_SHOT, AME_STEPS = "one-shot (the method alone, as mergekit)", "AME optimizer steps"
# optimizer keyword arguments that choose torch's implementation, not the merge (left out as `hf-ame optimizers` does)
_INTERNAL = ("foreach", "fused", "differentiable", "capturable", "maximize")
SAFE_MAX_MODELS = 8  # --share-safe: ingredients and base together
SAFE_MAX_BYTES = 8 * 2 ** 30  # --share-safe: tensor bytes of all the models, read from their headers
# the merge section's fields that are form fields as they are (the others are converted both ways)
_CONFIG_KEYS = ("optimizer", "lr", "lr_schedule", "lr_power", "epochs", "shuffle", "seed", "adaptive_pivot",
                "compute_dtype")
# what the form has fields for: the rest of a loaded recipe is kept under "more recipe"
_FORM_OUTPUT = ("dtype", "max_shard_size", "tokenizer_source", "heads", "config_source", "chat_template")
_FORM_ORDERING = ("metric", "dataset", "order", "top_k", "greedy", "compare_soup")
_FORM_DATASET = ("path", "split", "input_column", "label_column")


@dataclass(frozen=True)
class Settings:
    """How the page is served. ``share_safe``: for a public page (a Space): Hub repos only, no remote
    code, no server token, sizes capped; merges go to temporary folders (zip download or push)."""

    share_safe: bool = False
    max_models: int = SAFE_MAX_MODELS
    max_bytes: int = SAFE_MAX_BYTES


@dataclass
class Registry:
    """The parameter forms, generated from the registries' declared parameters: every method parameter
    and optimizer keyword argument (name -> boolean or not), and each entry's defaults."""

    methods: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # method -> its defaults
    method_params: Dict[str, bool] = field(default_factory=dict)
    optimizers: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # optimizer -> its keyword defaults
    optimizer_params: Dict[str, bool] = field(default_factory=dict)
    descriptions: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls) -> "Registry":
        """The registries as they are now (entries registered before the page is built included)."""
        reg = cls()
        for e in list_methods():
            reg.methods[e.name] = dict(e.defaults)
            reg.descriptions[e.name] = e.description
            for k, v in e.defaults.items():
                reg.method_params[k] = reg.method_params.get(k, False) or isinstance(v, bool)
        for o in list_optimizers():
            kw = {k: v for k, v in o.defaults().items() if k not in _INTERNAL and v is not None}
            reg.optimizers[o.name] = kw
            for k, v in kw.items():
                reg.optimizer_params[k] = reg.optimizer_params.get(k, False) or isinstance(v, bool)
        return reg


def field_text(value: Any) -> str:
    """A value as the form's text fields show it (JSON is YAML too: lists, gradients, filters)."""
    if value is None:
        return ""
    if isinstance(value, tuple):
        value = list(value)
    return value if isinstance(value, str) else json.dumps(value)


def _parse(text: Any, where: str) -> Any:
    """A text field's value: JSON first (``1e-8`` is a number there, a string in YAML 1.1), then YAML."""
    if not isinstance(text, str):
        return text
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:  # the text as typed: a block scalar's final line break is part of its value
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not a value ({' '.join(str(exc).split())[:120]})") from None


def _whole(value: Any, where: str, *, zero_is_none: bool = False) -> Optional[int]:
    """A number field holding a whole number (gradio's numbers arrive as floats)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or float(value) != int(value):
        raise ConfigError(f"{where}: expected a whole number, got {value!r}")
    return None if (zero_is_none and int(value) == 0) else int(value)


def _number(value: Any, where: str) -> float:
    if value is None:
        raise ConfigError(f"{where}: expected a number, got nothing")
    return float(value)


def _local(ident: str, safe: bool) -> str:
    """A folder of this machine as an absolute path (the recipe runs from another folder); else as typed."""
    path = Path(ident).expanduser()
    return str(path.resolve()) if not safe and path.exists() else ident


def _model_entry(line: str, safe: bool) -> Dict[str, Any]:
    """``ID``, ``ID@REVISION`` or mergekit's ``BASE+ADAPTER`` (a LoRA adapter over its base)."""
    text, base = line.strip(), None
    if "+" in text and not Path(text).expanduser().exists():
        base, text = (p.strip() for p in text.split("+", 1))
    rev = None
    if "@" in text and not Path(text).expanduser().exists():
        text, rev = (p.strip() for p in text.rsplit("@", 1))
    entry: Dict[str, Any] = {"id": _local(text, safe), "revision": rev or None}
    if base:
        entry["base"] = _local(base, safe)
    return entry


def _model_line(m: Mapping[str, Any]) -> str:
    line = str(m["id"]) + (f"@{m['revision']}" if m.get("revision") else "")
    return f"{m['base']}+{line}" if m.get("base") else line


def _choice(value: Any) -> Any:
    """tokenizer_source / heads / config_source: blank is None, a number an ingredient index."""
    text = str(value or "").strip()
    return None if not text else (int(text) if text.isdigit() else text)


def _extra_kwargs(v: Mapping[str, Any], prefix: str, defaults: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """The generated fields ``prefix:<name>`` that differ from the entry's defaults (the recipe stays short)."""
    out = {}
    for name, default in defaults.items():
        raw = v.get(f"{prefix}:{name}")
        value = raw if isinstance(default, bool) else _parse(raw, f"{where}.{name}")
        if value is None or value == (list(default) if isinstance(default, tuple) else default):
            continue
        out[name] = value
    return out


def form_config(v: Mapping[str, Any], reg: Registry) -> AMEConfig:
    """The merge section of the form: a method alone (one-shot), or AME steps (a method optional)."""
    method = None if v["method"] in (None, "", NO_METHOD) else v["method"]
    params = _extra_kwargs(v, "m", reg.methods[method], "method_kwargs") if method else {}
    seed = _whole(v["seed"], "seed")
    if method and v["steps"] == ONE_SHOT:
        return AMEConfig.one_shot(method, **params).replace(compute_dtype=v["compute_dtype"], seed=seed)
    pivot = str(v["pivot"] or "soup").strip()
    amp = str(v["amplification"] or "1").strip()
    return AMEConfig(
        optimizer=v["optimizer"], lr=_number(v["lr"], "lr"), lr_schedule=v["lr_schedule"],
        lr_power=_number(v["lr_power"], "lr_power"), epochs=_whole(v["epochs"], "epochs"),
        batch_size=_whole(v["batch_size"], "batch_size", zero_is_none=True), shuffle=bool(v["shuffle"]), seed=seed,
        pivot=int(pivot) if pivot.lstrip("-").isdigit() else pivot, adaptive_pivot=bool(v["adaptive_pivot"]),
        amplification=amp if amp == "linear" else _number(_parse(amp, "amplification"), "amplification"),
        optimizer_kwargs=_extra_kwargs(v, "o", reg.optimizers[v["optimizer"]], "optimizer_kwargs"),
        compute_dtype=v["compute_dtype"], method=method, method_kwargs=params).validate()


def _ordering(v: Mapping[str, Any], safe: bool) -> Optional[Dict[str, Any]]:
    if not str(v["metric"] or "").strip():
        return None
    ds = {"path": _local(str(v["dataset"] or "").strip(), safe)}
    for key in ("split", "input_column", "label_column"):
        if str(v[key] or "").strip():
            ds[key] = str(v[key]).strip()
    out = {"metric": str(v["metric"]).strip(), "dataset": ds, "order": None if v["order"] == "best" else v["order"],
           "top_k": _whole(v["top_k"] or 0, "top_k", zero_is_none=True),
           "greedy": None if v["greedy"] == "none" else v["greedy"], "compare_soup": bool(v["compare_soup"]) or None}
    return {k: val for k, val in out.items() if val is not None}  # defaults left out: the recipe stays short


def _deep_merge(base: Dict[str, Any], top: Mapping[str, Any]) -> Dict[str, Any]:
    """``top`` over ``base``, mappings merged key by key."""
    out = dict(base)
    for k, val in top.items():
        out[k] = _deep_merge(out[k], val) if isinstance(val, Mapping) and isinstance(out.get(k), Mapping) else val
    return out


def form_dict(v: Mapping[str, Any], reg: Registry, safe: bool) -> Dict[str, Any]:
    """The recipe the form says, as a plain dict (its "more recipe" sections underneath)."""
    lines = [ln for ln in str(v["models"] or "").splitlines() if ln.strip() and not ln.strip().startswith("#")]
    data: Dict[str, Any] = {"hf_ame": 1, "models": [_model_entry(ln, safe) for ln in lines]}
    if str(v["base"] or "").strip():
        data["base_model"] = _model_entry(v["base"], safe)
    data["merge"] = form_config(v, reg).to_dict()
    ordering = _ordering(v, safe)
    if ordering:
        data["ordering"] = ordering
    output = {"dtype": None if v["dtype"] == "auto" else v["dtype"],
              "max_shard_size": str(v["max_shard_size"] or "").strip() or None,
              "tokenizer_source": _choice(v["tokenizer_source"]), "heads": _choice(v["heads"]),
              "config_source": _choice(v["config_source"]),
              "chat_template": str(v["chat_template"] or "").strip() or None}
    data["output"] = {k: val for k, val in output.items() if val is not None}
    extra = _parse(v.get("extra") or "", "more recipe") or {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"more recipe: expected YAML sections (slices:, provenance:, ...), got {extra!r}")
    return _deep_merge(dict(extra), data)


def form_recipe(v: Mapping[str, Any], reg: Registry, settings: Settings) -> Recipe:
    """The form as a validated :class:`Recipe`. ``share_safe``: validated as a recipe from the Hub is
    (Hub repos only, no environment variables) and never allowed to run code."""
    trust = bool(v.get("trust_remote_code")) and not settings.share_safe
    safe = settings.share_safe
    return Recipe.from_dict(form_dict(v, reg, safe), base_dir=None if safe else Path.cwd(), remote=safe,
                            trust_remote_code=trust)


def _config_form(cfg: AMEConfig, reg: Registry) -> Dict[str, Any]:
    """The form fields of a merge section (generated fields at their entry's defaults unless set)."""
    v: Dict[str, Any] = {k: val for k, val in cfg.to_dict().items() if k in _CONFIG_KEYS}
    v["amplification"] = field_text(cfg.amplification)
    v["pivot"] = str(cfg.pivot)
    v["batch_size"] = cfg.batch_size or 0
    v["method"] = cfg.method or NO_METHOD
    one = (AMEConfig.one_shot(cfg.method, **cfg.method_kwargs).replace(compute_dtype=cfg.compute_dtype, seed=cfg.seed)
           if cfg.method else None)
    v["steps"] = ONE_SHOT if one is not None and one.to_dict() == cfg.to_dict() else AME_STEPS
    for name, default in reg.methods.get(cfg.method or "", {}).items():
        value = cfg.method_kwargs.get(name, default)
        v[f"m:{name}"] = value if reg.method_params[name] and isinstance(value, bool) else field_text(value)
    for name, default in reg.optimizers[cfg.optimizer].items():
        value = cfg.optimizer_kwargs.get(name, default)
        v[f"o:{name}"] = value if reg.optimizer_params[name] and isinstance(value, bool) else field_text(value)
    return v


def _leftovers(r: Recipe) -> Dict[str, Any]:
    """What a recipe says that the form has no field for: kept as YAML under "more recipe"."""
    d = r.to_dict()
    extra = {k: d[k] for k in ("slices", "load", "hub", "provenance") if k in d}
    out = {k: val for k, val in (d.get("output") or {}).items() if k not in _FORM_OUTPUT}
    if out:
        extra["output"] = out
    o = dict(d.get("ordering") or {})
    more = {k: val for k, val in o.items() if k not in _FORM_ORDERING}
    ds = {k: val for k, val in (o.get("dataset") or {}).items() if k not in _FORM_DATASET}
    if ds:
        more["dataset"] = ds
    if more:
        extra["ordering"] = more
    return extra


def recipe_form(r: Recipe, reg: Registry) -> Dict[str, Any]:
    """The form fields of a recipe (a mergekit config is read as its recipe first): what
    :func:`form_recipe` turns back into the same recipe."""
    v: Dict[str, Any] = {"models": "\n".join(_model_line(m) for m in r.models),
                         "base": _model_line(r.base_model) if r.base_model else ""}
    v.update(_config_form(r.merge, reg))
    o = r.ordering or {}
    ds = o.get("dataset") or {}
    v.update(metric=o.get("metric", ""), dataset=ds.get("path", ""), split=ds.get("split", ""),
             input_column=ds.get("input_column", ""), label_column=ds.get("label_column", ""),
             order=o.get("order", "best"), top_k=o.get("top_k") or 0, greedy=o.get("greedy") or "none",
             compare_soup=bool(o.get("compare_soup", False)))
    out = r.output or {}
    v.update(dtype=out.get("dtype") or "auto", max_shard_size=field_text(out.get("max_shard_size")),
             **{k: field_text(out.get(k)) if not isinstance(out.get(k), str) else out[k]
                for k in ("tokenizer_source", "heads", "config_source", "chat_template")})
    extra = _leftovers(r)
    v["extra"] = yaml.dump(extra, Dumper=_Dumper, sort_keys=False, width=100) if extra else ""
    return v


class _Dumper(yaml.SafeDumper):
    """YAML with multi-line strings as blocks (a mergekit config kept in ``provenance`` stays readable)."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                            style="|" if "\n" in s else None))


def load_kwargs(v: Mapping[str, Any], settings: Settings) -> Dict[str, Any]:
    """``from_recipe``'s arguments: remote code only when ticked (never on a shared page, where the Hub
    is asked anonymously: a visitor never borrows the server's token)."""
    if settings.share_safe:
        return {"token": False}
    return {"trust_remote_code": True} if v.get("trust_remote_code") else {}


def merge_kwargs(v: Mapping[str, Any], settings: Settings) -> Dict[str, Any]:
    """``merge()``'s arguments besides the recipe: where to write, and the search."""
    safe = settings.share_safe
    out = None if safe else (str(v.get("output_dir") or "").strip() or None)
    kw: Dict[str, Any] = {"output_dir": _local(out, safe) if out else None,
                          "overwrite": bool(v.get("overwrite")) and not safe,
                          "allow_unchanged": bool(v.get("allow_unchanged"))}
    space = _parse(v.get("search") or "", "search")
    if space is not None:
        n = _whole(v.get("n_trials") or 0, "n_trials", zero_is_none=True)
        if safe and (n or math.prod(len(x) if isinstance(x, list) else 1 for x in dict(space).values())) > 16:
            raise ConfigError("search: this shared page runs at most 16 trials")
        kw.update(search=space, n_trials=n)
    return kw
