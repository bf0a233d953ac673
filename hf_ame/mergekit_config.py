"""mergekit configuration files (``mergekit_config.yml``) read as hf_ame recipes.

Recognised by their keys (``merge_method``, ``models``); translated field by field as mergekit
0.1.5 defines them: ``models`` with per-model ``parameters``, ``base_model`` (also listed among
``models`` in many configs: it is the base, not an ingredient), ``merge_method``, global
``parameters`` (below the per-model ones in precedence, above the method's defaults), ``dtype``
(the merge arithmetic and, without ``out_dtype``, the output), ``out_dtype``. Parameter values may
be scalars, gradients (lists interpolated over the layers) or ``filter`` lists matched on tensor
names, resolved per tensor exactly as mergekit's ``evaluate_setting``. An optional ``ame:`` section
(``optimizer``, ``lr``, ``epochs``, ``batch_size``, ...) runs the same method through AME instead of
mergekit's one-shot merge. ``slices``: ``passthrough`` stacks layer ranges; any other method merges
each slice's sources (:mod:`hf_ame.slice_merge`). What hf_ame does not support yet (``modules``,
per-token embedding sources) is refused by name before anything is read.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Mapping

import yaml

from .config import AMEConfig
from .errors import RecipeError
from .methods import get_method, list_methods

__all__ = ["is_mergekit_config", "mergekit_to_recipe_dict", "merge_section", "MERGEKIT_FILE"]

MERGEKIT_FILE = "mergekit_config.yml"
_SUPPORTED_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype", "ame", "name",
                   "tokenizer_source", "tokenizer", "chat_template"}
_NOT_YET = {
    "modules": "per-module merges",
}
# every key mergekit 0.1.5's MergeConfiguration reads: any other top-level key it accepts and ignores (pydantic's
# default), and so does hf_ame, with a warning (``strict``: refused)
_MERGEKIT_KEYS = _SUPPORTED_KEYS | set(_NOT_YET)
_TOKENIZER_KEYS = {"source", "pad_to_multiple_of", "tokens"}
# methods whose mergekit contract ignores the base role: base_model is merged as one more input
_BASE_IS_INPUT = {"karcher", "linear"}
_SLICE_KEYS = {"sources", "parameters", "base_model"}
_MERGEKIT_SLICE_KEYS = _SLICE_KEYS | {"residual_weight"}  # mergekit's OutputSliceDefinition; residual_weight: not yet
_AME_KEYS = {"optimizer", "lr", "lr_schedule", "lr_power", "epochs", "batch_size", "shuffle", "seed", "adaptive_pivot",
             "amplification", "optimizer_kwargs", "compute_dtype"}


IN_MEMORY = "in_memory"  # mergekit merges each tensor as transformers holds it (one fused tensor per layer's experts)


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


def _parse_slices(data: Mapping[str, Any], method: str, ignored: List[str]) -> List[Dict[str, Any]]:
    """``slices``: a list of {sources: [{model, layer_range, parameters}], parameters, base_model}."""
    slices = data["slices"]
    if not isinstance(slices, list) or not slices:
        raise _fail("slices", "expected a non-empty list of {sources: [...]}")
    slices = [_known(sl, _MERGEKIT_SLICE_KEYS, f"slices[{i}]", ignored) for i, sl in enumerate(slices)]
    for i, sl in enumerate(slices):
        if isinstance(sl, Mapping):
            sl["sources"] = ([_known(src, {"model", "layer_range", "parameters"}, f"slices[{i}].sources[{j}]", ignored)
                              for j, src in enumerate(sl["sources"])]
                             if isinstance(sl.get("sources"), list) else sl.get("sources"))
        if not isinstance(sl, Mapping) or set(sl) - _SLICE_KEYS or not isinstance(sl.get("sources"), list) \
                or not sl["sources"]:
            bad = sorted(set(sl) - _SLICE_KEYS) if isinstance(sl, Mapping) else []
            raise _fail(f"slices[{i}]" + (f".{bad[0]}" if bad else ""), "a slice is {sources: [...], parameters, "
                        "base_model}" + (f"; mergekit's {bad[0]!r} is not supported by hf_ame yet" if bad else ""))
        for j, src in enumerate(sl["sources"]):
            if not isinstance(src, Mapping) or "model" not in src or set(src) - {"model", "layer_range", "parameters"}:
                raise _fail(f"slices[{i}].sources[{j}]", f"expected {{model, layer_range, parameters}}, got {src!r}")
            r = src.get("layer_range")
            if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r) and 0 <= r[0] < r[1]):
                raise _fail(f"slices[{i}].sources[{j}].layer_range", f"expected [start, end], got {r!r}")
        if method == "passthrough" and (len(sl["sources"]) != 1 or set(sl) - {"sources", "parameters"}):
            raise _fail(f"slices[{i}].sources", "passthrough takes exactly one source per slice")
    return slices


def _stacking_scale(sl: Mapping[str, Any], data: Mapping[str, Any], i: int, ignored: List[str]) -> Any:
    """passthrough's one parameter, ``scale``, of a slice: its source's setting over the slice's over the
    global one (mergekit's precedence); other parameters are ignored, as mergekit's passthrough ignores them."""
    levels = [(sl["sources"][0].get("parameters"), f"slices[{i}].sources[0].parameters"),
              (sl.get("parameters"), f"slices[{i}].parameters"), (data.get("parameters"), "parameters")]
    scale = None
    for params, where in levels:
        settings = _settings(params, where)
        ignored.extend(f"{where}.{k}" for k in settings if k != "scale" and (where != "parameters" or i == 0))
        scale = _with_fallback(scale, settings.get("scale"))
    return scale


def _stacking_recipe(slices: List[Dict[str, Any]], data: Mapping[str, Any], original: str,
                     ignored: List[str]) -> Dict[str, Any]:
    """passthrough slices as an hf_ame recipe: the models (in order of first use) and the slices by index."""
    for key in ("tokenizer", "tokenizer_source", "chat_template"):  # layers copied, not merged: no row to match
        if data.get(key) is not None:
            raise _fail(key, "not supported yet with passthrough slices (layer stacking copies tensors; the "
                             "output takes the first slice's model's tokenizer)")
    refs: List[Dict[str, Any]] = []
    out = []
    for i, sl in enumerate(slices):
        src = sl["sources"][0]
        ref = _reference(src["model"], f"slices[{i}].sources[0].model")
        if ref not in refs:
            refs.append(ref)
        scale = _stacking_scale(sl, data, i, ignored)
        out.append({"model": refs.index(ref), "layer_range": list(src["layer_range"]),
                    **({"scale": scale} if scale is not None else {})})
    recipe: Dict[str, Any] = {"hf_ame": 1, "models": refs, "slices": out, "merge": AMEConfig.soup().to_dict(),
                              "provenance": {"mergekit_config": original}}
    recipe["output"] = {"layout": IN_MEMORY}
    if data.get("dtype") is not None or data.get("out_dtype") is not None:
        recipe["output"]["dtype"] = str(data.get("out_dtype") or data["dtype"])
    return recipe


def _declared(settings: Dict[str, Any], entry: Any, where: str, ignored: List[str]) -> Dict[str, Any]:
    """``settings`` without the parameters ``entry``'s method does not declare: mergekit binds only its
    method's parameters and ignores the rest (each listed in ``ignored``)."""
    ignored.extend(f"{where}.{name}" for name in settings if name not in entry.defaults)
    return {k: v for k, v in settings.items() if k in entry.defaults}


def _method_kwargs(entry: Any, method: str, shared: Mapping[str, Any], per_model: List[Dict[str, Any]],
                   where: str = "parameters") -> Dict[str, Any]:
    """The method's parameters: per-model lists where any model sets one (the shared setting below
    each model's, then the method's default), else the shared value."""
    kwargs: Dict[str, Any] = {}
    for name in sorted(set(shared) | {p for pm in per_model for p in pm}):
        if name not in entry.defaults:
            raise _fail(f"{where}.{name}", f"not a parameter of {method!r} (hf_ame knows "
                                           f"{', '.join(sorted(entry.defaults)) or 'none'})")
        if any(name in pm for pm in per_model):
            values = [_with_fallback(pm.get(name), shared.get(name)) for pm in per_model]
            kwargs[name] = [entry.defaults[name] if v is None else v for v in values]
        else:
            kwargs[name] = shared[name]
    return kwargs


def _settings(params: Any, where: str) -> Dict[str, Any]:
    if params is not None and not isinstance(params, Mapping):
        raise _fail(where, f"expected a mapping of parameters, got {params!r}")
    return {p: _setting(v, f"{where}.{p}") for p, v in (params or {}).items()}


def _merge_slices_recipe(slices: List[Dict[str, Any]], data: Mapping[str, Any], entry: Any, method: str,
                         shared: Mapping[str, Any], ignored: List[str]) -> Dict[str, Any]:
    """Slices merged with a method: the models in order of first use; per slice its sources by index,
    which one is the base (mergekit's base must be among a slice's sources) and the method's parameters
    (source > slice > global precedence)."""
    refs: List[Dict[str, Any]] = []
    out = []
    for i, sl in enumerate(slices):
        base_value = sl.get("base_model") or data.get("base_model")
        base = _reference(base_value, f"slices[{i}].base_model") if base_value else None
        sources, per_model, base_pos = [], [], None
        for j, src in enumerate(sl["sources"]):
            ref = _reference(src["model"], f"slices[{i}].sources[{j}].model")
            if ref not in refs:
                refs.append(ref)
            sources.append({"model": refs.index(ref), "layer_range": list(src["layer_range"])})
            if base is not None and ref == base and base_pos is None and method not in _BASE_IS_INPUT:
                base_pos = j
            else:
                where = f"slices[{i}].sources[{j}].parameters"
                per_model.append(_declared(_settings(src.get("parameters"), where), entry, where, ignored))
        if entry.needs_base and base_pos is None:
            raise _fail(f"slices[{i}].sources", f"{method!r} needs the base model among every slice's sources, as "
                                                "mergekit does (give base_model and list it as a source)")
        mine = _declared(_settings(sl.get("parameters"), f"slices[{i}].parameters"), entry, f"slices[{i}].parameters",
                         ignored)
        below = {n: _with_fallback(mine.get(n), shared.get(n)) for n in set(mine) | set(shared)}
        kwargs = _method_kwargs(entry, method, below, per_model, f"slices[{i}].parameters")
        out.append({"sources": sources, **({"base": base_pos} if base_pos is not None else {}),
                    **({"method_kwargs": kwargs} if kwargs else {})})
    return {"models": refs, "slices": out}


def merge_section(data: Mapping[str, Any], method: str, kwargs: Dict[str, Any], pivot_base: bool) -> Dict[str, Any]:
    """One-shot settings of the method (or, with an ``ame:`` section, the same transforms through AME)."""
    merge = AMEConfig.one_shot(method).to_dict()
    merge["method_kwargs"] = kwargs
    if pivot_base:
        merge["pivot"] = "base"
    if data.get("dtype") is not None:
        merge["compute_dtype"] = str(data["dtype"])
    ame = data.get("ame")
    if ame is None:
        return merge
    if not isinstance(ame, Mapping) or not set(ame) <= _AME_KEYS:
        bad = sorted(set(ame) - _AME_KEYS) if isinstance(ame, Mapping) else [ame]
        raise _fail(f"ame.{bad[0]}", f"expected AME settings ({', '.join(sorted(_AME_KEYS))})")
    start = AMEConfig().to_dict()
    start.update(pivot=merge["pivot"], method=method, method_kwargs=kwargs, compute_dtype=merge["compute_dtype"])
    start.update(ame)
    return start


def _models_form(data: Mapping[str, Any], entry: Any, method: str, base: Any, shared: Mapping[str, Any],
                 ignored: List[str]):
    """``models``: the ingredients (the base left out unless the method takes it as an input) and their
    per-model parameter settings."""
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise _fail("models", "expected a non-empty list of {model: ..., parameters: ...}")
    models: List[Dict[str, Any]] = []
    per_model: List[Dict[str, Any]] = []
    for k, e in enumerate(entries):
        e = {"model": e} if isinstance(e, str) else _known(e, {"model", "parameters"}, f"models[{k}]", ignored)
        if not isinstance(e, Mapping) or "model" not in e or not set(e) <= {"model", "parameters"}:
            raise _fail(f"models[{k}]", f"expected {{model: ..., parameters: ...}}, got {e!r}")
        ref = _reference(e["model"], f"models[{k}].model")
        if base is not None and ref == base and method not in _BASE_IS_INPUT:
            continue  # the base listed among the models (mergekit's examples do): it is the base
        models.append(ref)
        where = f"models[{k}].parameters"
        per_model.append(_declared(_settings(e.get("parameters"), where), entry, where, ignored))
    if method in _BASE_IS_INPUT and base is not None and base not in models:
        models.append(base)  # mergekit adds the base model to the inputs, last
        per_model.append({})
    return models, _method_kwargs(entry, method, shared, per_model)


def _known(entry: Any, keys: set, where: str, ignored: List[str]) -> Any:
    """``entry`` without the keys mergekit's schema does not have (it accepts and ignores them)."""
    if not isinstance(entry, Mapping):
        return entry
    extra = sorted(set(entry) - keys, key=str)
    ignored.extend(f"{where}.{k}" for k in extra)
    return {k: v for k, v in entry.items() if k in keys}


def mergekit_to_recipe_dict(data: Mapping[str, Any], *, strict: bool = False) -> Dict[str, Any]:
    """An hf_ame recipe (as a dict for :meth:`Recipe.from_dict`) meaning what the mergekit config means.

    Keys and parameters mergekit 0.1.5 accepts and ignores (a key outside its schema, a typo such as
    ``dype``, a parameter its method does not have) are ignored here too, each named in a warning and
    in ``provenance.mergekit_ignored`` (the card lists them); ``strict``: refused instead, by name."""
    ignored: List[str] = []
    for key in sorted(set(data) & set(_NOT_YET)):
        raise _fail(key, f"mergekit's {_NOT_YET[key]} is not supported by hf_ame yet")
    original = yaml.safe_dump(dict(data), sort_keys=False)  # shown in the card as the user wrote it
    data = _known(data, _MERGEKIT_KEYS, "", ignored)
    ignored[:] = [k.lstrip(".") for k in ignored]
    recipe = _translate(data, original, ignored)
    if ignored:
        if strict:
            raise _fail(ignored[0], "mergekit accepts and ignores this; refused in strict mode (ignored: "
                        + ", ".join(ignored) + ")")
        for key in ignored:
            warnings.warn(f"mergekit config: {key} is ignored (mergekit 0.1.5 ignores it too)", stacklevel=4)
        recipe["provenance"]["mergekit_ignored"] = list(ignored)
    return recipe


def _translate(data: Mapping[str, Any], original: str, ignored: List[str]) -> Dict[str, Any]:
    method = str(data["merge_method"]).lower()
    if data.get("slices") is not None and data.get("models") is not None:
        raise _fail("slices", "give either models or slices, as mergekit requires")
    slices = _parse_slices(data, method, ignored) if data.get("slices") is not None else None
    if method == "passthrough" and slices is not None:
        return _stacking_recipe(slices, data, original, ignored)
    try:
        entry = get_method(method)
    except Exception:  # noqa: BLE001 - re-raised with the field and the choices
        raise _fail("merge_method", f"{method!r} is not supported by hf_ame yet; supported: "
                                    f"{', '.join(m.name for m in list_methods())}") from None
    base = _reference(data["base_model"], "base_model") if data.get("base_model") is not None else None
    shared = _declared(_settings(data.get("parameters"), "parameters"), entry, "parameters", ignored)
    recipe: Dict[str, Any] = {"hf_ame": 1, "provenance": {"mergekit_config": original}}
    if slices is not None:
        recipe.update(_merge_slices_recipe(slices, data, entry, method, shared, ignored))
        recipe["merge"] = merge_section(data, method, {}, False)
        recipe["merge"]["pivot"] = "first"  # each slice with a base among its sources pivots on it
    else:
        models, kwargs = _models_form(data, entry, method, base, shared, ignored)
        recipe["models"] = models
        recipe["merge"] = merge_section(data, method, kwargs, entry.optional_base and base is not None
                                         and method not in _BASE_IS_INPUT)
        if base is not None and method not in _BASE_IS_INPUT:
            recipe["base_model"] = base
    out_dtype = data.get("out_dtype") or data.get("dtype")
    recipe["output"] = {"dtype": str(out_dtype)} if out_dtype is not None else {}
    recipe["output"].update(_tokenizer(data, ignored, slices is not None))
    recipe["output"]["layout"] = IN_MEMORY
    return recipe


def _token_source(value: Any, where: str) -> Any:
    """mergekit's TokenEmbeddingConfig.source: a model (its row for the token), ``{kind: zero}`` or
    ``{kind: model_token, model, token | token_id}``, as the recipe's ``tokens`` entry."""
    if isinstance(value, str):
        return _reference(value, where)["id"]
    if isinstance(value, Mapping) and value.get("kind") == "zero" and set(value) == {"kind"}:
        return "zero"
    if (isinstance(value, Mapping) and value.get("kind") == "model_token"
            and set(value) <= {"kind", "model", "token", "token_id"}):
        picked = [k for k in ("token", "token_id") if value.get(k) is not None]
        if len(picked) == 1 and "model" in value:
            return {"model": _reference(value["model"], f"{where}.model")["id"], picked[0]: value[picked[0]]}
    raise _fail(where, "expected a model, {kind: zero} or {kind: model_token, model, token or token_id}, "
                       f"got {value!r}")


def _tokens(tokens: Any) -> Dict[str, Dict[str, Any]]:
    """``tokenizer.tokens``: {token: {source, force}} (mergekit's per-token embedding sources)."""
    if not isinstance(tokens, Mapping):
        raise _fail("tokenizer.tokens", f"expected a mapping of token -> {{source, force}}, got {tokens!r}")
    out: Dict[str, Dict[str, Any]] = {}
    for token, spec in tokens.items():
        where = f"tokenizer.tokens.{token}"
        if (not isinstance(spec, Mapping) or not set(spec) <= {"source", "force"}
                or not isinstance(spec.get("force", False), bool)):
            raise _fail(where, f"expected {{source, force: true|false}}, got {spec!r}")
        if spec.get("source") is None:
            raise _fail(f"{where}.source", "required: where the token's embedding row comes from")
        out[str(token)] = {"source": _token_source(spec["source"], f"{where}.source"),
                           "force": bool(spec.get("force", False))}
    return out


def _tokenizer(data: Mapping[str, Any], ignored: List[str], sliced: bool = False) -> Dict[str, Any]:
    """``tokenizer_source`` or ``tokenizer: {source, pad_to_multiple_of}``, and ``chat_template``, as the
    recipe's output fields (mergekit's default source under ``tokenizer:`` is "union"). With slices the
    recipe has no base model apart from the slices' sources: "base" names ``base_model`` itself."""
    tok = _known(data.get("tokenizer"), _TOKENIZER_KEYS, "tokenizer", ignored)
    if tok is not None and data.get("tokenizer_source") is not None:
        raise _fail("tokenizer", "give tokenizer_source or tokenizer.source, not both")
    if tok is not None and (not isinstance(tok, Mapping) or not set(tok) <= _TOKENIZER_KEYS):
        bad = sorted(set(tok) - _TOKENIZER_KEYS) if isinstance(tok, Mapping) else [tok]
        raise _fail(f"tokenizer.{bad[0]}", "not a tokenizer setting; expected " + ", ".join(sorted(_TOKENIZER_KEYS)))
    source = (tok or {}).get("source", "union") if tok is not None else data.get("tokenizer_source")
    out: Dict[str, Any] = {}
    if source is not None:
        where = "tokenizer.source" if tok is not None else "tokenizer_source"
        if sliced and source == "base":
            if data.get("base_model") is None:
                raise _fail(where, "'base' needs base_model")
            source = data["base_model"]
        out["tokenizer_source"] = source if source in ("base", "union") else _reference(source, where)["id"]
        out["missing_tokens"] = "mergekit"  # a row some models lack: mergekit's default rows, tensors merged whole
    if (tok or {}).get("pad_to_multiple_of") is not None:
        out["pad_to_multiple_of"] = tok["pad_to_multiple_of"]
    if (tok or {}).get("tokens") is not None:
        out["tokens"] = _tokens(tok["tokens"])
    if data.get("chat_template") is not None:
        out["chat_template"] = data["chat_template"]
    return out
