"""mergekit configuration files (``mergekit_config.yml``) read as hf_ame recipes.

Recognised by their keys (``merge_method``, ``models``); translated field by field as mergekit
0.1.5 defines them: ``models`` with per-model ``parameters``, ``base_model`` (also listed among
``models`` in many configs: it is the base, not an ingredient), ``merge_method``, global
``parameters`` (below the per-model ones in precedence, above the method's defaults), ``dtype``
(the merge arithmetic and, without ``out_dtype``, the output), ``out_dtype``. Parameter values may
be scalars, gradients (lists interpolated over the layers) or ``filter`` lists matched on tensor
names, resolved per tensor exactly as mergekit's ``evaluate_setting``. An optional ``ame:`` section
(``optimizer``, ``lr``, ``epochs``, ``batch_size``, ...) runs the same method through AME instead of
mergekit's one-shot merge. What hf_ame does not support yet (``slices``, ``modules``, tokenizer
options, other methods, LoRA ``+`` references) is refused by name before anything is read.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping

import yaml

from .config import AMEConfig
from .errors import RecipeError
from .methods import get_method, list_methods

__all__ = ["is_mergekit_config", "mergekit_to_recipe_dict", "MERGEKIT_FILE"]

MERGEKIT_FILE = "mergekit_config.yml"
_SUPPORTED_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype", "ame", "name",
                   "tokenizer_source", "tokenizer", "chat_template"}
_NOT_YET = {
    "modules": "per-module merges",
}
_TOKENIZER_KEYS = {"source", "pad_to_multiple_of"}
_AME_KEYS = {"optimizer", "lr", "lr_schedule", "lr_power", "epochs", "batch_size", "shuffle", "seed", "adaptive_pivot",
             "amplification", "optimizer_kwargs", "compute_dtype"}


def is_mergekit_config(data: Any) -> bool:
    """A mapping with mergekit's keys (``merge_method``) and none of an hf_ame recipe's (``hf_ame``)."""
    return isinstance(data, Mapping) and "merge_method" in data and "hf_ame" not in data


def _fail(where: str, msg: str) -> RecipeError:
    return RecipeError(f"{where}: {msg}")


def _reference(value: Any, where: str) -> Dict[str, Any]:
    """mergekit's model reference: ``org/name``, ``org/name@revision`` or a folder."""
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"expected a model (Hub id or folder), got {value!r}")
    if "+" in value:  # model+lora: the LoRA adapter read over that model
        model, _, lora = value.partition("+")
        if not model or not lora or "+" in lora:
            raise _fail(where, f"{value!r}: expected model+lora")
        ident, _, rev = lora.partition("@")
        return {"id": ident, "revision": rev or None, "base": model.partition("@")[0]}
    ident, _, rev = value.partition("@")
    return {"id": ident, "revision": rev or None}


def _setting(value: Any, where: str) -> Any:
    """mergekit's ParameterSetting as hf_ame's: scalars stay, a list of scalars is a gradient, a list
    of {filter, value} (or one such mapping) is a filter list."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, (bool, int, float)) for v in value):
        return {"gradient": list(value)}
    if isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
        conds = []
        for k, c in enumerate(value):
            if "value" not in c or not set(c) <= {"filter", "value"}:
                raise _fail(f"{where}[{k}]", f"expected {{filter: <substring>, value: <setting>}}, got {c!r}")
            conds.append({"filter": c.get("filter"), "value": _setting(c["value"], f"{where}[{k}].value")})
        return {"filters": conds}
    raise _fail(where, f"expected a number, a list of numbers (a gradient) or a list of filters, got {value!r}")


def _with_fallback(model: Any, shared: Any) -> Any:
    """One ingredient's setting with the global one below it (mergekit's precedence)."""
    if model is None:
        return shared
    if shared is None or not isinstance(model, Mapping) or "filters" not in model:
        return model
    return {"filters": list(model["filters"]) + [{"filter": None, "value": shared}]}


def _slices_as_models(data: Mapping[str, Any], method: str) -> Dict[str, Any]:
    """``slices``: passthrough stacks them (one source per slice); any other method with ONE slice
    taking the same layer range from every source (mergekit's gradient-slerp example) is the
    ``models`` form, checked against each model's layer count when the merge runs."""
    slices = data["slices"]
    if not isinstance(slices, list) or not slices:
        raise _fail("slices", "expected a non-empty list of {sources: [...]}")
    parsed = []
    for i, sl in enumerate(slices):
        if not isinstance(sl, Mapping) or set(sl) - {"sources"} or not isinstance(sl.get("sources"), list):
            bad = sorted(set(sl) - {"sources"}) if isinstance(sl, Mapping) else ["sources"]
            raise _fail(f"slices[{i}]" + (f".{bad[0]}" if bad else ""), "only `sources` (model, layer_range, "
                        "parameters) is supported in a slice yet")
        for j, src in enumerate(sl["sources"]):
            if not isinstance(src, Mapping) or "model" not in src or set(src) - {"model", "layer_range", "parameters"}:
                raise _fail(f"slices[{i}].sources[{j}]", f"expected {{model, layer_range, parameters}}, got {src!r}")
            r = src.get("layer_range")
            if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r) and 0 <= r[0] < r[1]):
                raise _fail(f"slices[{i}].sources[{j}].layer_range", f"expected [start, end], got {r!r}")
        parsed.append(sl["sources"])
    out = dict(data)
    out.pop("slices")
    if method == "passthrough":
        for i, sources in enumerate(parsed):
            if len(sources) != 1:
                raise _fail(f"slices[{i}].sources", "passthrough takes exactly one source per slice")
        out["__slices__"] = parsed
        return out
    ranges = {tuple(src["layer_range"]) for src in parsed[0]}
    if len(parsed) != 1 or len(ranges) != 1 or next(iter(ranges))[0] != 0:
        raise _fail("slices", f"{method} over several slices or partial layer ranges is not supported yet; one slice "
                              "taking layers [0, N] of every model (the models form) is")
    out["models"] = [{"model": s["model"], **({"parameters": s["parameters"]} if s.get("parameters") else {})}
                     for s in parsed[0]]
    out["__layers__"] = next(iter(ranges))[1]
    return out


def _stacking_recipe(data: Mapping[str, Any], original: str) -> Dict[str, Any]:
    """passthrough slices as an hf_ame recipe: the models (in order of first use) and the slices by index."""
    refs: List[Dict[str, Any]] = []
    slices = []
    for i, sources in enumerate(data["__slices__"]):
        ref = _reference(sources[0]["model"], f"slices[{i}].sources[0].model")
        if ref not in refs:
            refs.append(ref)
        slices.append({"model": refs.index(ref), "layer_range": list(sources[0]["layer_range"])})
    recipe: Dict[str, Any] = {"hf_ame": 1, "models": refs, "slices": slices, "merge": AMEConfig.soup().to_dict(),
                              "provenance": {"mergekit_config": original}}
    if data.get("dtype") is not None or data.get("out_dtype") is not None:
        recipe["output"] = {"dtype": str(data.get("out_dtype") or data["dtype"])}
    return recipe


def mergekit_to_recipe_dict(data: Mapping[str, Any]) -> Dict[str, Any]:
    """An hf_ame recipe (as a dict for :meth:`Recipe.from_dict`) meaning what the mergekit config means."""
    unknown = sorted(set(data) - _SUPPORTED_KEYS - {"__slices__", "__layers__"})
    for key in unknown:
        if key in _NOT_YET:
            raise _fail(key, f"mergekit's {_NOT_YET[key]} is not supported by hf_ame yet")
    if unknown:
        raise _fail(unknown[0], f"not a mergekit config key hf_ame knows; expected one of {', '.join(sorted(_SUPPORTED_KEYS))}")
    method = str(data["merge_method"]).lower()
    original = yaml.safe_dump(dict(data), sort_keys=False)  # shown in the card as the user wrote it
    if data.get("slices") is not None:
        if data.get("models") is not None:
            raise _fail("slices", "give either models or slices, as mergekit requires")
        data = _slices_as_models(data, method)
        if method == "passthrough":
            return _stacking_recipe(data, original)
    try:
        entry = get_method(method)
    except Exception:  # noqa: BLE001 - re-raised with the field and the choices
        raise _fail("merge_method", f"{method!r} is not supported by hf_ame yet; supported: "
                                    f"{', '.join(m.name for m in list_methods())}") from None
    base = _reference(data["base_model"], "base_model") if data.get("base_model") is not None else None
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise _fail("models", "expected a non-empty list of {model: ..., parameters: ...}")
    models: List[Dict[str, Any]] = []
    per_model: List[Dict[str, Any]] = []
    for k, e in enumerate(entries):
        e = {"model": e} if isinstance(e, str) else e
        if not isinstance(e, Mapping) or "model" not in e or not set(e) <= {"model", "parameters"}:
            raise _fail(f"models[{k}]", f"expected {{model: ..., parameters: ...}}, got {e!r}")
        ref = _reference(e["model"], f"models[{k}].model")
        params = e.get("parameters") or {}
        if base is not None and ref == base:
            continue  # the base listed among the models (mergekit's examples do): it is the base
        models.append(ref)
        per_model.append({p: _setting(v, f"models[{k}].parameters.{p}") for p, v in params.items()})
    shared = {p: _setting(v, f"parameters.{p}") for p, v in (data.get("parameters") or {}).items()}
    kwargs: Dict[str, Any] = {}
    for name in sorted(set(shared) | {p for pm in per_model for p in pm}):
        if name not in entry.defaults:
            raise _fail(f"parameters.{name}", f"not a parameter of {method!r} (hf_ame knows "
                                              f"{', '.join(sorted(entry.defaults)) or 'none'})")
        if any(name in pm for pm in per_model):
            kwargs[name] = [_with_fallback(pm.get(name), shared.get(name)) for pm in per_model]
            kwargs[name] = [entry.defaults[name] if v is None else v for v in kwargs[name]]
        else:
            kwargs[name] = shared[name]
    merge = AMEConfig.one_shot(method).to_dict()
    merge["method_kwargs"] = kwargs
    dtype = data.get("dtype")
    if dtype is not None:
        merge["compute_dtype"] = str(dtype)
    ame = data.get("ame")
    if ame is not None:  # the same transforms through AME
        if not isinstance(ame, Mapping) or not set(ame) <= _AME_KEYS:
            bad = sorted(set(ame) - _AME_KEYS) if isinstance(ame, Mapping) else [ame]
            raise _fail(f"ame.{bad[0]}", f"expected AME settings ({', '.join(sorted(_AME_KEYS))})")
        start = AMEConfig().to_dict()
        start.update(pivot=merge["pivot"], method=method, method_kwargs=kwargs, compute_dtype=merge["compute_dtype"])
        start.update(ame)
        merge = start
    out_dtype = data.get("out_dtype") or dtype
    recipe: Dict[str, Any] = {"hf_ame": 1, "models": models, "merge": merge,
                              "provenance": {"mergekit_config": original}}
    if data.get("__layers__") is not None:  # the slice's layer range must be every layer
        recipe["provenance"]["num_hidden_layers"] = data["__layers__"]
    if base is not None:
        recipe["base_model"] = base
    if out_dtype is not None:
        recipe["output"] = {"dtype": str(out_dtype)}
    recipe.setdefault("output", {}).update(_tokenizer(data))
    if not recipe["output"]:
        del recipe["output"]
    return recipe


def _tokenizer(data: Mapping[str, Any]) -> Dict[str, Any]:
    """``tokenizer_source`` or ``tokenizer: {source, pad_to_multiple_of}``, and ``chat_template``, as the
    recipe's output fields (mergekit's default source under ``tokenizer:`` is "union")."""
    tok = data.get("tokenizer")
    if tok is not None and data.get("tokenizer_source") is not None:
        raise _fail("tokenizer", "give tokenizer_source or tokenizer.source, not both")
    if tok is not None and (not isinstance(tok, Mapping) or not set(tok) <= _TOKENIZER_KEYS):
        bad = sorted(set(tok) - _TOKENIZER_KEYS) if isinstance(tok, Mapping) else [tok]
        raise _fail(f"tokenizer.{bad[0]}", "not supported yet (per-token embedding sources); supported: "
                    + ", ".join(sorted(_TOKENIZER_KEYS)))
    source = (tok or {}).get("source", "union") if tok is not None else data.get("tokenizer_source")
    out: Dict[str, Any] = {}
    if source is not None:
        where = "tokenizer.source" if tok is not None else "tokenizer_source"
        out["tokenizer_source"] = source if source in ("base", "union") else _reference(source, where)["id"]
    if (tok or {}).get("pad_to_multiple_of") is not None:
        out["pad_to_multiple_of"] = tok["pad_to_multiple_of"]
    if data.get("chat_template") is not None:
        out["chat_template"] = data["chat_template"]
    return out
