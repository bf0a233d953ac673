"""Recipe files: one YAML document that says everything a merge needs, so it can be shared and re-run.

    hf_ame: 1                       # schema version
    models:                         # Hub ids, folders (relative to the recipe file), or {id, revision}
      - {id: org/vit-ft-a, revision: 3f2a...}
      - ./vit-ft-b
    base_model: null                # a base checkpoint, for pivot: base
    merge: {optimizer: adamw, lr: 0.001, epochs: 5, ...}    # AMEConfig fields
    ordering: {metric: accuracy, dataset: {path: ..., split: validation}, order: best, top_k: 5, greedy: null}
    output: {dtype: bfloat16, max_shard_size: 5GB}
    hub: {repo_id: me/vit-ame, private: true}
    load: {device_map: auto, trust_remote_code: false}
    provenance: {...}               # written by hf_ame (scores, resolved shas); ignored when run

Every error names the field: ``merge.lr: expected a positive number, got 'fast'``.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import yaml

from .config import AMEConfig, ConfigError, parse_dtype
from .errors import RecipeError
from .hub import bound_timeouts, timeout_hint
from .layouts import LAYOUTS
from .limits import MAX_PAD_TO_MULTIPLE_OF, MAX_SCORE_BATCH, check_config_limits, check_count
from .mergekit_config import MERGEKIT_FILE, is_mergekit_config, mergekit_to_recipe_dict
from .methods import get_method
from .options import AlignOptions
from .ordering import GREEDY_MODES, ORDERS
from .writer import parse_size

__all__ = ["Recipe", "RecipeError", "RECIPE_VERSION", "RECIPE_FILE", "load_recipe", "is_plain_metric_name"]

RECIPE_VERSION = 1
RECIPE_FILE = "ame_recipe.yaml"
_TOP = {"hf_ame", "models", "base_model", "merge", "ordering", "output", "hub", "load", "provenance", "slices"}
_ORDERING = {"metric", "dataset", "order", "top_k", "greedy", "greater_is_better", "metric_key", "metric_kwargs",
             "compare_soup", "batch_size"}
_DATASET = {"path", "name", "split", "data_files", "revision", "input_column", "label_column"}
# format: model | lora (hf_ame.lora_out), rank: its r
_OUTPUT = {"dtype", "max_shard_size", *AlignOptions.names(), "format", "rank"}
_HUB = {"repo_id", "private"}
_LOAD = {"device_map", "trust_remote_code", "max_memory"}


_CONSENT = "pass trust_remote_code=True (hf-ame merge --trust-remote-code) if you trust this recipe"


def _refuse_code(data: Mapping[str, Any]) -> None:
    """Raise if the recipe would run code it brings: nothing is imported or loaded before this."""
    load, merge, ordering = (data.get(k) if isinstance(data.get(k), Mapping) else {}
                             for k in ("load", "merge", "ordering"))
    if load.get("trust_remote_code") is True:
        raise RecipeError(f"load.trust_remote_code: a recipe cannot turn on the ingredients' custom code; {_CONSENT}")
    amp = merge.get("amplification")
    if isinstance(amp, str) and ":" in amp:
        raise RecipeError(f"merge.amplification: {amp!r} would import and call Python code named by the recipe; "
                          f"{_CONSENT}")
    metric = ordering.get("metric")
    if isinstance(metric, str) and not is_plain_metric_name(metric):
        raise RecipeError(f"ordering.metric: {metric!r} is a metric script (a path or a Hub repo), which would run "
                          f"code; only evaluate's own metric names are run from a recipe unless you {_CONSENT}")


def is_plain_metric_name(name: str) -> bool:
    """An ``evaluate`` metric name (``accuracy``, ``f1``, ``loss``): no path, no Hub namespace."""
    return bool(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_\-]*", name)) and not Path(name).exists()


def _expect(cond: bool, where: str, what: str, got: Any) -> None:
    if not cond:
        raise RecipeError(f"{where}: expected {what}, got {got!r}")


_ENV_REF = re.compile(r"\$(\w+|\{[^}]*\})")


def _text(value: str, where: str, remote: bool) -> str:
    """A path-like field: ``~`` and ``${VAR}`` expand in a local recipe. A recipe from the Hub may not
    read this machine's environment (a token in a URL it names would be sent to that host)."""
    if not remote:
        return os.path.expanduser(os.path.expandvars(value))
    if _ENV_REF.search(value):
        raise RecipeError(f"{where}: {value!r} reads an environment variable, which a recipe from the Hub cannot do; "
                          "write the value itself in a local copy of the recipe")
    return value


def _hub_only(value: str, where: str) -> None:
    """A recipe from the Hub names Hub repos only: no folder or file of this machine, no URL."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        raise RecipeError(f"{where}: {value!r} is not a Hub repo id; a recipe from the Hub may only name Hub repos "
                          "(no folders, files or URLs): use a local copy of the recipe to name others") from None
    if os.path.lexists(value):  # resolved as a local path before the Hub would be asked
        raise RecipeError(f"{where}: {value!r} is also a path here, which a recipe from the Hub may not read; run it "
                          "from another folder")


def _hub_data_files(ds: Mapping[str, Any]) -> None:
    """A Hub recipe's data files: hf:// URLs, or files of the Hub dataset it names (never local
    files or other hosts, unless the caller passes eval_dataset= itself)."""
    where, files = "ordering.dataset.data_files", ds.get("data_files")
    values = ([files] if isinstance(files, str) else list(files.values()) if isinstance(files, Mapping)
              else list(files or []))
    for f in (v for x in values for v in (x if isinstance(x, list) else [x])):
        _expect(isinstance(f, str), where, "file names or hf:// URLs", f)
        _text(f, where, remote=True)
        local = "://" in f or os.path.isabs(f) or f.startswith("~") or ".." in Path(f).parts or "/" not in ds["path"]
        if local and not f.startswith("hf://"):
            raise RecipeError(f"{where}: {f!r}: a recipe from the Hub reads data files from the Hub only (hf:// URLs, "
                              "or files of the Hub dataset in dataset.path); pass eval_dataset= yourself for others")


def _mapping(value: Any, where: str, allowed: set) -> Dict[str, Any]:
    _expect(isinstance(value, Mapping), where, "a mapping", value)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise RecipeError(f"{where}.{unknown[0]}: unknown field; expected one of {', '.join(sorted(allowed))}")
    return dict(value)


@dataclass
class Recipe:
    """A parsed, validated recipe. ``models`` entries are ``{"id": str, "revision": str | None}``."""

    models: List[Dict[str, Any]]
    merge: AMEConfig = field(default_factory=AMEConfig)
    base_model: Optional[Dict[str, Any]] = None
    ordering: Optional[Dict[str, Any]] = None
    output: Dict[str, Any] = field(default_factory=dict)
    hub: Dict[str, Any] = field(default_factory=dict)
    load: Dict[str, Any] = field(default_factory=dict)
    provenance: Optional[Dict[str, Any]] = None
    source: Optional[str] = None  # where it was read from
    slices: Optional[List[Dict[str, Any]]] = None  # layer stacking: [{model: index, layer_range: [a, b]}]
    remote: bool = False  # read from the Hub: no environment variables, no local paths, no other hosts

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, data: Any, *, base_dir: Union[str, Path, None] = None, source: Optional[str] = None,
                  trust_remote_code: bool = False, remote: bool = False, strict: bool = False) -> "Recipe":
        """Validate ``data`` completely. ``strict``: a mergekit config's keys that mergekit ignores are
        refused instead of ignored with a warning (see ``mergekit_to_recipe_dict``). A recipe cannot turn
        on code execution by itself: remote
        code (``load.trust_remote_code``), ``module:function`` amplifications and metric scripts
        (a path or a Hub metric repo) are refused unless the caller passes ``trust_remote_code=True``.
        ``remote`` (a recipe from the Hub): no ``${VAR}``, and only Hub repo ids (see :func:`_hub_only`)."""
        base_dir = None if remote else base_dir
        if is_mergekit_config(data):  # a mergekit_config.yml: translated field by field
            data = mergekit_to_recipe_dict(data, strict=strict)
        data = _mapping(data, "recipe", _TOP)
        if not trust_remote_code:
            _refuse_code(data)
        version = data.get("hf_ame", RECIPE_VERSION)
        _expect(version == RECIPE_VERSION, "hf_ame", f"schema version {RECIPE_VERSION}", version)
        models_raw = data.get("models")
        _expect(isinstance(models_raw, list) and len(models_raw) >= 1, "models", "a non-empty list", models_raw)
        models = [cls._model(m, f"models[{i}]", base_dir, remote) for i, m in enumerate(models_raw)]
        base = (cls._model(data["base_model"], "base_model", base_dir, remote) if data.get("base_model") is not None
                else None)
        try:
            raw = data.get("merge") or {}
            # a method's parameters may sit beside the fields, as in mergekit configs
            # (merge: {method: ties, density: 0.5})
            method = raw.get("method") if isinstance(raw, Mapping) else None
            allowed = set(AMEConfig.__dataclass_fields__) | (set(get_method(method).defaults) if method else set())
            merge = AMEConfig.from_options(prefix="merge.", **_mapping(raw, "merge", allowed))
            check_config_limits(merge, len(models), prefix="merge.")
        except RecipeError:
            raise
        except ConfigError as exc:
            raise RecipeError(str(exc)) from None
        ordering = cls._ordering(data["ordering"], base_dir, remote) if data.get("ordering") is not None else None
        output = _check_output(_mapping(data.get("output") or {}, "output", _OUTPUT))
        hub = _check_hub(_mapping(data.get("hub") or {}, "hub", _HUB))
        load = _mapping(data.get("load") or {}, "load", _LOAD)
        if "trust_remote_code" in load:
            _expect(isinstance(load["trust_remote_code"], bool), "load.trust_remote_code", "true or false",
                    load["trust_remote_code"])
        prov = data.get("provenance")
        if prov is not None:
            _expect(isinstance(prov, Mapping), "provenance", "a mapping", prov)
        slices = cls._slices(data["slices"], len(models)) if data.get("slices") is not None else None
        return cls(models, merge, base, ordering, output, hub, load, dict(prov) if prov else None, source, slices,
                   remote=remote)

    @staticmethod
    def _slices(value: Any, n_models: int) -> List[Dict[str, Any]]:
        """Layer stacking: [{model, layer_range}]; slices merged by the method: [{sources: [{model,
        layer_range}], base: index into sources (optional), method_kwargs: {...} (optional)}]."""
        _expect(isinstance(value, list) and len(value) >= 1, "slices",
                "a non-empty list of {model, layer_range} or of {sources, base, method_kwargs}", value)
        merged = isinstance(value[0], Mapping) and "sources" in value[0]
        out = []
        for i, sl in enumerate(value):
            if not merged:  # a stacked slice may scale its tensors (mergekit's passthrough ``scale``)
                scale = sl.get("scale") if isinstance(sl, Mapping) else None
                out.append(Recipe._source({k: v for k, v in sl.items() if k != "scale"} if scale is not None else sl,
                                          f"slices[{i}]", n_models))
                if scale is not None:
                    out[-1]["scale"] = _scale_setting(scale, f"slices[{i}].scale")
                continue
            sl = _mapping(sl, f"slices[{i}]", {"sources", "base", "method_kwargs"})
            srcs = sl.get("sources")
            _expect(isinstance(srcs, list) and len(srcs) >= 1, f"slices[{i}].sources", "a non-empty list", srcs)
            entry: Dict[str, Any] = {"sources": [Recipe._source(s, f"slices[{i}].sources[{j}]", n_models)
                                                 for j, s in enumerate(srcs)]}
            b = sl.get("base")
            if b is not None:
                _expect(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < len(srcs), f"slices[{i}].base",
                        f"an index into the slice's sources (0 to {len(srcs) - 1})", b)
                entry["base"] = b
            mk = sl.get("method_kwargs") or {}
            _expect(isinstance(mk, Mapping), f"slices[{i}].method_kwargs", "a mapping", mk)
            entry["method_kwargs"] = dict(mk)
            out.append(entry)
        return out

    @staticmethod
    def _source(sl: Any, where: str, n_models: int) -> Dict[str, Any]:
        sl = _mapping(sl, where, {"model", "layer_range"})
        m, r = sl.get("model"), sl.get("layer_range")
        _expect(isinstance(m, int) and not isinstance(m, bool) and 0 <= m < n_models, f"{where}.model",
                f"an index into models (0 to {n_models - 1})", m)
        _expect(isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                and 0 <= r[0] < r[1], f"{where}.layer_range", "[start, end) with 0 <= start < end", r)
        return {"model": m, "layer_range": list(r)}

    @staticmethod
    def _model(entry: Any, where: str, base_dir: Union[str, Path, None], remote: bool = False) -> Dict[str, Any]:
        if isinstance(entry, str):
            entry = {"id": entry}
        m = _mapping(entry, where, {"id", "revision", "path", "base", "gguf_file"})
        ident = m.get("id") or m.get("path")
        _expect(isinstance(ident, str) and ident.strip() != "", f"{where}.id", "a Hub repo id or a folder", ident)
        rev = m.get("revision")
        _expect(rev is None or isinstance(rev, str), f"{where}.revision", "a branch, tag or commit sha", rev)
        ident = _text(ident, f"{where}.id", remote)
        if remote:
            _hub_only(ident, f"{where}.id")
        if base_dir is not None and ident.startswith((".", "..")) and not os.path.isabs(ident):
            ident = str((Path(base_dir) / ident).resolve())
        if m.get("base") is not None:  # a LoRA adapter over this base (mergekit's model+lora)
            base = m["base"]
            _expect(isinstance(base, str) and base.strip() != "", f"{where}.base", "a Hub repo id or a folder", base)
            if remote:
                _hub_only(_text(base, f"{where}.base", remote), f"{where}.base")
            if base_dir is not None and base.startswith((".", "..")) and not os.path.isabs(base):
                base = str((Path(base_dir) / base).resolve())
            return {"id": ident, "revision": rev, "base": base}
        if m.get("gguf_file") is not None:  # a GGUF file of this folder or Hub repo (checked by parse_ingredient)
            _expect(isinstance(m["gguf_file"], str), f"{where}.gguf_file", "a .gguf file name", m["gguf_file"])
            return {"id": ident, "revision": rev, "gguf_file": m["gguf_file"]}
        return {"id": ident, "revision": rev}

    @staticmethod
    def _ordering(value: Any, base_dir: Union[str, Path, None], remote: bool = False) -> Dict[str, Any]:
        o = _mapping(value, "ordering", _ORDERING)
        _expect(isinstance(o.get("metric"), str), "ordering.metric", "an evaluate metric name", o.get("metric"))
        ds = _mapping(o.get("dataset"), "ordering.dataset", _DATASET)
        _expect(isinstance(ds.get("path"), str), "ordering.dataset.path",
                "a Hub dataset id, a builder name or a folder", ds.get("path"))
        ds["path"] = _text(ds["path"], "ordering.dataset.path", remote)
        if isinstance(ds.get("data_files"), str):
            ds["data_files"] = _text(ds["data_files"], "ordering.dataset.data_files", remote)
        if remote:
            _hub_only(ds["path"], "ordering.dataset.path")
            _hub_data_files(ds)
        if base_dir is not None and ds["path"].startswith("."):
            ds["path"] = str((Path(base_dir) / ds["path"]).resolve())
        if isinstance(ds.get("data_files"), str) and base_dir is not None and ds["data_files"].startswith("."):
            ds["data_files"] = str((Path(base_dir) / ds["data_files"]).resolve())
        o["dataset"] = ds
        order = o.get("order", "best")
        _expect(order in ORDERS, "ordering.order", f"one of {', '.join(ORDERS)}", order)
        top_k = o.get("top_k")
        _expect(top_k is None or (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1),
                "ordering.top_k", "an integer >= 1", top_k)
        _expect(o.get("greedy") in GREEDY_MODES, "ordering.greedy", "null, soup or ame", o.get("greedy"))
        gib = o.get("greater_is_better")
        _expect(gib is None or isinstance(gib, bool), "ordering.greater_is_better", "true or false", gib)
        mk = o.get("metric_kwargs")
        _expect(mk is None or isinstance(mk, Mapping), "ordering.metric_kwargs", "a mapping", mk)
        if o.get("batch_size") is not None:
            try:
                check_count(o["batch_size"], "ordering.batch_size", 1, MAX_SCORE_BATCH)
            except ConfigError as exc:
                raise RecipeError(str(exc)) from None
        return o

    @classmethod
    def from_yaml(cls, text: str, *, base_dir: Union[str, Path, None] = None, source: Optional[str] = None,
                  trust_remote_code: bool = False, remote: bool = False, strict: bool = False) -> "Recipe":
        try:
            data = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError) as exc:
            raise RecipeError(f"recipe{' ' + source if source else ''}: not valid YAML: {exc}") from None
        return cls.from_dict(data, base_dir=base_dir, source=source, trust_remote_code=trust_remote_code, remote=remote,
                             strict=strict)

    @classmethod
    def from_file(cls, path: Union[str, Path], *, trust_remote_code: bool = False, remote: bool = False,
                  strict: bool = False) -> "Recipe":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise RecipeError(f"recipe: no such file: {path}") from None
        return cls.from_yaml(text, base_dir=path.parent, source=str(path), trust_remote_code=trust_remote_code,
                             remote=remote, strict=strict)

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"hf_ame": RECIPE_VERSION,
                               "models": [{k: v for k, v in m.items() if v is not None} for m in self.models]}
        if self.base_model:
            out["base_model"] = {k: v for k, v in self.base_model.items() if v is not None}
        out["merge"] = self.merge.to_dict()
        if self.ordering:
            out["ordering"] = self.ordering
        for name in ("output", "hub", "load"):
            value = {k: v for k, v in getattr(self, name).items() if v is not None}
            if value:
                out[name] = value
        if self.slices:
            out["slices"] = self.slices
        if self.provenance:
            out["provenance"] = self.provenance
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)


def _check_output(output: Dict[str, Any]) -> Dict[str, Any]:
    """A recipe's ``output`` section, each field checked (and named) before anything is read."""
    if output.get("dtype") is not None:
        try:
            parse_dtype(output["dtype"], "output.dtype")
        except ConfigError as exc:
            raise RecipeError(str(exc)) from None
    if output.get("pad_to_multiple_of") is not None:
        v = output["pad_to_multiple_of"]
        _expect(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_PAD_TO_MULTIPLE_OF,
                "output.pad_to_multiple_of", f"a whole number from 1 to {MAX_PAD_TO_MULTIPLE_OF:,}", v)
    for key, what in (("tokenizer_source", "'first', 'base', 'union'"), ("heads", "'union', 'drop'"),
                      ("config_source", "'first', 'base'")):
        v = output.get(key)
        _expect(v is None or (isinstance(v, (str, int)) and not isinstance(v, bool)), f"output.{key}",
                f"{what}, an ingredient's id or index", v)
    _expect(output.get("missing_tokens") in (None, "mergekit"), "output.missing_tokens", "'mergekit' or absent",
            output.get("missing_tokens"))
    _expect(output.get("layout") in (None, *LAYOUTS), "output.layout", " or ".join(map(repr, LAYOUTS)),
            output.get("layout"))
    _expect(output.get("tokens") is None or isinstance(output["tokens"], Mapping), "output.tokens",
            "a mapping of token -> {source, force}", output.get("tokens"))
    _expect(output.get("format") in (None, "model", "lora"), "output.format", "'model' or 'lora'", output.get("format"))
    _expect(output.get("rank") is None or (isinstance(output["rank"], int) and not isinstance(output["rank"], bool)
                                           and output["rank"] > 0),
            "output.rank", "a LoRA rank >= 1", output.get("rank"))
    if output.get("chat_template") is not None:
        _expect(isinstance(output["chat_template"], str), "output.chat_template",
                "'auto', a template name or Jinja text", output["chat_template"])
    if output.get("max_shard_size") is not None:
        try:
            parse_size(output["max_shard_size"])
        except ValueError as exc:
            raise RecipeError(f"output.{exc}") from None
    return output


def _check_hub(hub: Dict[str, Any]) -> Dict[str, Any]:
    """A recipe's ``hub`` section: a valid repo id and a boolean ``private``."""
    if hub.get("repo_id") is not None:
        _expect(isinstance(hub["repo_id"], str) and "/" in hub["repo_id"], "hub.repo_id", "'namespace/name'",
                hub["repo_id"])
        # huggingface_hub.utils pulls its HTTP stack (~8 MiB): imported when a recipe names a repo
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(hub["repo_id"])
        except HFValidationError as exc:
            raise RecipeError(f"hub.repo_id: {exc}") from None
    if hub.get("private") is not None:
        _expect(isinstance(hub["private"], bool), "hub.private", "true or false", hub["private"])
    return hub


def _scale_setting(value: Any, where: str) -> Any:
    """A stacked slice's ``scale``: a number, a gradient {gradient: [numbers]} or {filters: [{filter, value}]}
    (mergekit's setting, resolved per tensor as :func:`hf_ame.methods.resolve_setting`)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if number(value):
        return float(value)
    if isinstance(value, Mapping) and set(value) == {"gradient"} and isinstance(value["gradient"], list) \
            and value["gradient"] and all(number(v) for v in value["gradient"]):
        return {"gradient": [float(v) for v in value["gradient"]]}
    if isinstance(value, Mapping) and set(value) == {"filters"} and isinstance(value["filters"], list):
        conds = []
        for k, c in enumerate(value["filters"]):
            _expect(isinstance(c, Mapping) and set(c) <= {"filter", "value"} and "value" in c
                    and (c.get("filter") is None or isinstance(c["filter"], str)), f"{where}.filters[{k}]",
                    "{filter: <substring or null>, value: <setting>}", c)
            conds.append({"filter": c.get("filter"),
                          "value": _scale_setting(c["value"], f"{where}.filters[{k}].value")})
        return {"filters": conds}
    raise RecipeError(f"{where}: expected a finite number, {{gradient: [...]}} or {{filters: [...]}}, got {value!r}")


def _reachable(repo_id: str, revision: Optional[str], token: Union[bool, str, None], endpoint: Optional[str]) -> None:
    """One bounded call before hf_hub_download, which retries a Hub that never answers for minutes
    (5 tries of 60 s per file): a silent endpoint fails here within HF_HUB_DOWNLOAD_TIMEOUT."""
    from huggingface_hub import HfApi, constants

    bound_timeouts()
    if constants.HF_HUB_OFFLINE:
        return
    try:
        HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision)
    except Exception as exc:  # noqa: BLE001 - only a timeout is reported here; the download reports the rest
        hint = timeout_hint(exc)
        if hint:
            raise RecipeError(f"recipe: {repo_id!r}: {hint}") from None


def load_recipe(path_or_repo_id: Union[str, Path], *, revision: Optional[str] = None,
                token: Union[bool, str, None] = None, endpoint: Optional[str] = None, filename: str = RECIPE_FILE,
                trust_remote_code: bool = False, strict: bool = False) -> Recipe:
    """A recipe from a local file, or the ``ame_recipe.yaml`` of a Hub repo (``hf_hub_download``); a
    mergekit config (a file, or a repo's ``mergekit_config.yml``) is read as the same merge.
    ``trust_remote_code``: allow the recipe to run code (see :meth:`Recipe.from_dict`); default False.
    ``strict``: refuse a mergekit config's keys that mergekit ignores (default: ignored with a warning)."""
    p = Path(str(path_or_repo_id)).expanduser()
    if p.is_file():
        return Recipe.from_file(p, trust_remote_code=trust_remote_code, strict=strict)
    for name in (filename, MERGEKIT_FILE):  # a merge's folder: its hf_ame recipe, else its mergekit config
        if p.is_dir() and (p / name).is_file():
            return Recipe.from_file(p / name, trust_remote_code=trust_remote_code, strict=strict)
    text = str(path_or_repo_id)
    if text.endswith((".yaml", ".yml")):  # a YAML name is a file, never a repo id
        raise RecipeError(f"recipe: no such file: {text}")
    from huggingface_hub import hf_hub_download

    _reachable(text, revision, token, endpoint)
    try:
        local = hf_hub_download(text, filename, revision=revision, token=token, endpoint=endpoint)
    except Exception as exc:  # noqa: BLE001
        try:  # a repo merged by mergekit carries its mergekit_config.yml
            local = hf_hub_download(text, MERGEKIT_FILE, revision=revision, token=token, endpoint=endpoint)
        except Exception:  # noqa: BLE001 - the recipe's own error is the one to report
            raise RecipeError(f"recipe: {text!r} is not a file and neither its {filename} nor its {MERGEKIT_FILE} "
                              f"could be read from the Hub "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    r = Recipe.from_file(local, trust_remote_code=trust_remote_code, remote=True, strict=strict)  # a stranger's
    r.source = f"{text}@{revision or 'main'}"
    return r
