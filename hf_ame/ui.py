"""``hf-ame ui``: a local web page to compose, check, preview, run and publish a merge (Gradio).

Nothing here merges, plans or checks by itself: the form becomes a recipe (the YAML shown live and
downloadable is the file that runs), :meth:`AMEMerger.from_recipe` checks it and :meth:`~AMEMerger.plan`
previews it, :meth:`~AMEMerger.merge` runs it in a worker thread whose progress bars (the CLI's) and
search trials are shown as they come, and :meth:`MergeResult.push_to_hub` publishes it in one commit.

- **Compose**: ingredients, base, method and optimizer from the registries, with a parameter form
  generated from each entry's declared parameters; ordering, search, output. A pasted or uploaded
  mergekit config or recipe fills the form; what the form has no field for stays in "more recipe".
- **Check & preview**: each model's header (dtype, vocabulary, labels, config fields that differ, with
  the choice that resolves each), then the dry-run plan. No weight is read.
- **Run / Cancel**: Cancel raises :class:`Cancelled` (a ``KeyboardInterrupt``, as SIGINT in the CLI) in
  the merge's thread, so it ends as an error does: staging and temporary folders removed, nothing left.
- **Safety**: 127.0.0.1 unless told otherwise; ``share_safe`` (a public Space) takes Hub repos only (as a
  recipe from the Hub does: no local path, no environment variable), never runs remote code, never uses
  the server's own Hub token, and caps sizes. Errors are the CLI's one-line messages.
"""
from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import gradio as gr
import yaml

from .card import CHART_FILE
from .checks import storage_dtype
from .config import COMPUTE_DTYPES, AMEConfig
from .config_diff import config_differences
from .errors import ConfigError
from .errors import error_line as cli_error_line
from .labels import labels_of
from .merger import AMEMerger
from .result import MergeResult
from .methods import list_methods, parameter_help
from .optimizers import list_optimizers
from .ordering import GREEDY_MODES, ORDERS
from .output import stale_siblings
from .preflight import parse_models, read_headers
from .recipe import RECIPE_FILE, Recipe
from .schedules import LR_SCHEDULES
from .scratch import scratch_dir

__all__ = ["serve", "UIApp", "Settings", "Cancelled", "form_recipe", "recipe_form", "error_line"]

NO_METHOD = "none (AME: the mean pseudogradient)"
ONE_SHOT, AME_STEPS = "one-shot (the method alone, as mergekit)", "AME optimizer steps"
# optimizer keyword arguments that choose torch's implementation, not the merge (left out as `hf-ame optimizers` does)
_INTERNAL = ("foreach", "fused", "differentiable", "capturable", "maximize")
MAX_TEXT = 256 * 1024  # a pasted or uploaded config / recipe
ZIP_LIMIT = 256 * 2 ** 20  # outputs up to this size are offered as a zip download
SAFE_MAX_MODELS = 8  # --share-safe: ingredients and base together
SAFE_MAX_BYTES = 8 * 2 ** 30  # --share-safe: tensor bytes of all the models, read from their headers
_SCRATCH_KINDS = ("merge", "search", "soup", "greedy")  # hf_ame.scratch folders a merge makes
_GRADIO_CACHE = os.environ.get("GRADIO_TEMP_DIR")  # the user's own choice, if any, wins over the page's folder


class Cancelled(KeyboardInterrupt):
    """Raised in a merge's thread by Cancel: a ``KeyboardInterrupt`` (as the CLI's SIGINT), so no
    ``except Exception`` on the way swallows it and the merge ends as an error does."""


@dataclass(frozen=True)
class Settings:
    """How the page is served. ``share_safe``: for a public page (a Space): Hub repos only, no remote
    code, no server token, sizes capped; merges go to temporary folders (zip download or push)."""

    share_safe: bool = False
    max_models: int = SAFE_MAX_MODELS
    max_bytes: int = SAFE_MAX_BYTES


def error_line(exc: BaseException, secret: Optional[str] = None) -> str:
    """The CLI's one-line message for ``exc`` (``hf-ame: error: ...``), ``secret`` (a token) masked."""
    text = cli_error_line(exc)
    return text.replace(secret, "***") if secret else text


# ----------------------------------------------------------------------------------------------- the form
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


def _text(value: Any) -> str:
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
    v["amplification"] = _text(cfg.amplification)
    v["pivot"] = str(cfg.pivot)
    v["batch_size"] = cfg.batch_size or 0
    v["method"] = cfg.method or NO_METHOD
    one = (AMEConfig.one_shot(cfg.method, **cfg.method_kwargs).replace(compute_dtype=cfg.compute_dtype, seed=cfg.seed)
           if cfg.method else None)
    v["steps"] = ONE_SHOT if one is not None and one.to_dict() == cfg.to_dict() else AME_STEPS
    for name, default in reg.methods.get(cfg.method or "", {}).items():
        value = cfg.method_kwargs.get(name, default)
        v[f"m:{name}"] = value if reg.method_params[name] and isinstance(value, bool) else _text(value)
    for name, default in reg.optimizers[cfg.optimizer].items():
        value = cfg.optimizer_kwargs.get(name, default)
        v[f"o:{name}"] = value if reg.optimizer_params[name] and isinstance(value, bool) else _text(value)
    return v


_CONFIG_KEYS = ("optimizer", "lr", "lr_schedule", "lr_power", "epochs", "shuffle", "seed", "adaptive_pivot",
                "compute_dtype")
_FORM_OUTPUT = ("dtype", "max_shard_size", "tokenizer_source", "heads", "config_source", "chat_template")
_FORM_ORDERING = ("metric", "dataset", "order", "top_k", "greedy", "compare_soup")
_FORM_DATASET = ("path", "split", "input_column", "label_column")


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
    v.update(dtype=out.get("dtype") or "auto", max_shard_size=_text(out.get("max_shard_size")),
             **{k: _text(out.get(k)) if not isinstance(out.get(k), str) else out[k]
                for k in ("tokenizer_source", "heads", "config_source", "chat_template")})
    extra = _leftovers(r)
    v["extra"] = yaml.dump(extra, Dumper=_Dumper, sort_keys=False, width=100) if extra else ""
    return v


class _Dumper(yaml.SafeDumper):
    """YAML with multi-line strings as blocks (a mergekit config kept in ``provenance`` stays readable)."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                            style="|" if "\n" in s else None))


# ------------------------------------------------------------------------------------------ the checks
def _vocab(config: Mapping[str, Any]) -> Any:
    return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")


def _labels(config: Mapping[str, Any]) -> str:
    names = labels_of(dict(config)) or []
    return ", ".join(names[:4]) + (f" (+{len(names) - 4})" if len(names) > 4 else "")


def _model_row(role: str, ing: Any, header: Any) -> List[Any]:
    """One model's line of the header table (from config.json and the safetensors header only)."""
    where = "local folder" if ing.local else (ing.sha or ing.revision or "main")[:12]
    if header is None:
        return [role, ing.id, where, "", "", "", "", "", "no safetensors header (.bin): checked after download"]
    cfg = header.config or {}
    tensors = header.tensors.values()
    return [role, ing.id, where, ",".join(cfg.get("architectures") or []) or cfg.get("model_type", ""),
            storage_dtype(header.tensors) or "", f"{sum(t.numel for t in tensors) / 1e6:.2f}M",
            f"{sum(t.nbytes for t in tensors) / 2 ** 20:.1f} MiB", _vocab(cfg) or "", _labels(cfg)]


_ADVICE = (  # (column of the header table, what a difference means: the choices the README describes)
    (3, "architectures differ: only checkpoints of one architecture can be merged"),
    (4, "stored dtypes differ: each is read as stored and merged in the compute dtype; the output takes "
        "Output dtype (default: the first model's)"),
    (7, "vocabularies differ: pick a Tokenizer source (union, first, base or an ingredient); embedding rows "
        "are matched by token"),
    (8, "label sets differ: pick Heads (union, drop or an ingredient); the same labels in another order are "
        "aligned by name"),
)


def _differences(rows: Sequence[Sequence[Any]], headers: Sequence[Any]) -> List[str]:
    """What differs between the models, each with the choice that resolves it."""
    notes = []
    ingredients = [r for r in rows if r[0] == "ingredient" and r[3]]
    for col, advice in _ADVICE:
        compared = ingredients if col == 8 else [r for r in rows if r[3]]  # a headless base has no labels
        values = {str(r[col]) for r in compared if r[col] != "" or col == 8}
        if len(values) > 1:
            notes.append(advice)
    present = [h for h in headers if h is not None and h.config]
    diffs = config_differences(present) if len(present) > 1 else {}
    if diffs:
        shown = "; ".join(f"{k}: {', '.join(repr(x) for x in vals)}" for k, vals in list(diffs.items())[:6])
        notes.append(f"config fields differ ({shown}): pick a Config source (first, base or an ingredient)")
    return notes or ["the models agree on architecture, stored dtype, vocabulary, labels and config fields"]


def inspect_models(recipe: Recipe, settings: Settings) -> Tuple[List[List[Any]], List[str]]:
    """Every model's header row and what differs between them: config.json and the safetensors
    headers only (HTTP range reads for Hub repos; a LoRA adapter repo's own small files), no weights
    downloaded. ``share_safe``: sizes capped here, before any download, and the Hub asked anonymously
    (never with the server's token)."""
    ings, base, _ = parse_models(recipe.models, recipe.base_model, None, 1)
    everyone = ings + ([base] if base is not None else [])
    if settings.share_safe and len(everyone) > settings.max_models:
        raise ConfigError(f"models: {len(everyone)} models; this shared page merges at most {settings.max_models}")
    adapter_base = Path(base.path) if base is not None and base.local else None
    headers, _ = read_headers(everyone, cache_dir=None, token=False if settings.share_safe else None,
                              local_files_only=False, endpoint=None, adapter_base=adapter_base)
    rows = [_model_row("base" if ing is base else "ingredient", ing, h) for ing, h in zip(everyone, headers)]
    if settings.share_safe:
        _check_sizes(everyone, headers, settings)
    return rows, _differences(rows, headers)


def _check_sizes(everyone: Sequence[Any], headers: Sequence[Any], settings: Settings) -> None:
    """--share-safe: a size known from the headers, within the cap, before anything is downloaded."""
    for ing, h in zip(everyone, headers):
        if h is None:
            raise ConfigError(f"models: {ing.id!r} has no safetensors header to size it before downloading; this "
                              "shared page merges safetensors checkpoints only")
    total = sum(t.nbytes for h in headers for t in h.tensors.values())
    if total > settings.max_bytes:
        raise ConfigError(f"models: {total / 2 ** 30:.1f} GiB of weights in all; this shared page merges at most "
                          f"{settings.max_bytes / 2 ** 30:.1f} GiB")


# ---------------------------------------------------------------------------------- running a merge
class _Routed:
    """``sys.stderr`` while the page runs: what a merge thread writes (its tqdm bars, its warnings) goes
    to that merge's :class:`Job`, everything else where it went before."""

    def __init__(self, real: Any):
        self.real = real

    def write(self, text: str) -> int:
        job = _JOBS.get(threading.get_ident())
        return job.write(text) if job is not None else self.real.write(text)

    def flush(self) -> None:
        if threading.get_ident() not in _JOBS:
            self.real.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class _TrialLog(logging.Handler):
    """A merge thread's scored search trials (``hf_ame.search`` logs each one) go to its :class:`Job`."""

    def emit(self, record: logging.LogRecord) -> None:
        job = _JOBS.get(record.thread or 0)
        trial = getattr(record, "hf_ame_trial", None)
        if job is not None and trial is not None:
            job.trials.append(trial)


_JOBS: Dict[int, "Job"] = {}  # merge thread id -> its job
_TRIAL_LOG = _TrialLog(logging.INFO)


def _route_output() -> None:
    """Install the stderr router and the trial handler (once; again if someone replaced sys.stderr)."""
    if not isinstance(sys.stderr, _Routed):
        sys.stderr = _Routed(sys.stderr)
    log = logging.getLogger("hf_ame.search")
    if _TRIAL_LOG not in log.handlers:
        log.addHandler(_TRIAL_LOG)
        log.setLevel(logging.INFO)


def _unroute_output() -> None:
    """Undo :func:`_route_output` (the page is closed)."""
    if isinstance(sys.stderr, _Routed):
        sys.stderr = sys.stderr.real
    log = logging.getLogger("hf_ame.search")
    log.removeHandler(_TRIAL_LOG)
    log.setLevel(logging.NOTSET)


class Job:
    """One merge in a worker thread: its captured output and trials, its result or error, and Cancel."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.chunks: List[str] = []
        self.trials: List[Dict[str, Any]] = []
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.cancelled = self.finished = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._target, name="hf_ame-ui-merge", daemon=True)

    def start(self) -> "Job":
        _route_output()
        self.thread.start()
        return self

    def _target(self) -> None:
        """Run the merge; whatever it raises is kept (shown on the page), never raised in this thread."""
        me = threading.get_ident()
        _JOBS[me] = self
        try:
            try:
                self.result = self.fn()
            except BaseException as exc:  # noqa: BLE001 - Cancelled included: reported on the page
                exc.__traceback__ = None  # its frames hold the merge's tensors and progress bars: freed now, here
                self.error = exc
            with self.lock:
                self.finished = True
        except Cancelled:  # the cancel arrived after the merge had returned: the merge stands
            self.finished = True
        finally:
            _JOBS.pop(me, None)

    def cancel(self) -> bool:
        """Stop the merge: :class:`Cancelled` raised in its thread (at most once, never after it ended)."""
        with self.lock:
            if self.finished or self.cancelled or not self.thread.is_alive():
                return False
            self.cancelled = True
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread.ident), ctypes.py_object(Cancelled))
        return True

    def write(self, text: str) -> int:
        self.chunks.append(text)
        return len(text)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def progress(self, limit: int = 30) -> str:
        """The CLI's progress lines: each tqdm bar at its latest state, and the warnings, in order."""
        lines: Dict[str, str] = {}
        for part in re.split(r"[\r\n]+", "".join(self.chunks)):
            part = part.strip()
            if part:
                lines[part.split(":", 1)[0] if "|" in part else part] = part
        return "\n".join(list(lines.values())[-limit:])


def _scratch() -> set:
    """This process's scratch folders of merges now (another tab's temporary output among them)."""
    tmp = Path(tempfile.gettempdir())
    return {p for kind in _SCRATCH_KINDS for p in tmp.glob(f"hf_ame-{kind}-{os.getpid()}-*")}


def _leftovers_of(out: Optional[Path], existed: bool, scratch_before: set) -> List[str]:
    """What a cancelled merge left: its output (new), staging siblings, scratch folders it made."""
    left = [str(out)] if out is not None and out.exists() and not existed else []
    left += [str(p) for p in stale_siblings(out)] if out is not None else []
    return left + sorted(str(p) for p in _scratch() - scratch_before)


@dataclass
class Session:
    """One browser tab: its folder (recipes and zips to download), its merge and its last result."""

    dir: Path
    job: Optional[Job] = None
    result: Optional[MergeResult] = None

    def drop_result(self) -> None:
        """Forget the last result; a temporary output (no output folder given) is removed with it."""
        if self.result is not None and hasattr(self.result, "cleanup"):
            self.result.cleanup()
        self.result = None

    def file(self, name: str, text: str, sub: str = "recipe") -> Path:
        """A file to download, named as it should arrive (the browser keeps the name)."""
        folder = self.dir / sub
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
        return folder / name


# ------------------------------------------------------------------------------------------ the page
def _session_key(request: Any) -> str:
    """A browser tab's key (its Gradio session), usable as a folder name."""
    return re.sub(r"\W", "", str(getattr(request, "session_hash", None) or "default"))[:32] or "default"


def _label(text: str, key: str) -> Dict[str, Any]:
    return {"label": text, "elem_id": f"ui-{key}".replace(":", "-").replace("_", "-")}


class UIApp:
    """The page: built from the registries by :meth:`build`, served by :func:`serve`."""

    def __init__(self, settings: Settings = Settings()):
        self.settings = settings
        self.reg = Registry.read()
        self.form: Dict[str, Any] = {}  # field key -> component (the order of the handlers' values)
        self.c: Dict[str, Any] = {}  # every other component by name
        self.root = scratch_dir("ui")  # removed by close(), or by the next hf_ame run if this one was killed
        self.sessions: Dict[str, Session] = {}
        self.demo: Any = None
        self.url: Optional[str] = None

    # ------------------------------------------------------------------ state
    def session(self, request: gr.Request) -> Session:
        key = _session_key(request)
        if key not in self.sessions:
            self.sessions[key] = Session(self.root / key)
        return self.sessions[key]

    def values(self, values: Sequence[Any]) -> Dict[str, Any]:
        return dict(zip(self.form, values))

    def recipe(self, values: Sequence[Any]) -> Recipe:
        return form_recipe(self.values(values), self.reg, self.settings)

    def build(self) -> Any:
        """The Gradio page (see :func:`_build_page`)."""
        self.demo = _build_page(self)
        return self.demo

    def unload(self, request: gr.Request) -> None:
        """A closed tab: its merge cancelled, its temporary output and files removed."""
        s = self.sessions.pop(_session_key(request), None)
        if s is None:
            return
        if s.job is not None and s.job.cancel():
            s.job.thread.join(timeout=60)
        s.drop_result()
        shutil.rmtree(s.dir, ignore_errors=True)

    def close(self) -> None:
        """Stop the server, cancel running merges, remove temporary outputs and this page's folder."""
        for s in self.sessions.values():
            if s.job is not None and s.job.cancel():
                s.job.thread.join(timeout=60)
            s.drop_result()
        if self.demo is not None:
            self.demo.close()
        shutil.rmtree(self.root, ignore_errors=True)
        _unroute_output()

    # ------------------------------------------------------------------ handlers
    def compose(self, request: gr.Request, *values: Any) -> Dict[Any, Any]:
        """The live recipe: its YAML, whether it is valid, and the file the download button gives."""
        c = self.c
        try:
            text = self.recipe(values).to_yaml()
        except Exception as exc:  # noqa: BLE001 - shown as the CLI shows it
            return {c["compose_status"]: error_line(exc), c["download_recipe"]: gr.update(interactive=False)}
        path = self.session(request).file(RECIPE_FILE, text)
        return {c["recipe"]: text, c["compose_status"]: "recipe valid: check and preview it, or run it",
                c["download_recipe"]: gr.update(value=str(path), interactive=True)}

    def load(self, text: str) -> Dict[Any, Any]:
        """A pasted or uploaded mergekit config or recipe, into the form."""
        c = self.c
        try:
            if len(text or "") > MAX_TEXT:
                raise ConfigError(f"paste: {len(text):,} characters; at most {MAX_TEXT:,}")
            safe = self.settings.share_safe
            recipe = Recipe.from_yaml(text or "", base_dir=None if safe else Path.cwd(), remote=safe, source="pasted")
            v = recipe_form(recipe, self.reg)
        except Exception as exc:  # noqa: BLE001
            return {c["load_status"]: error_line(exc)}
        out: Dict[Any, Any] = {self.form[k]: val for k, val in v.items() if k in self.form}
        kind = "mergekit config" if (recipe.provenance or {}).get("mergekit_config") else "recipe"
        out[c["load_status"]] = f"{kind} loaded into the form ({len(recipe.models)} models)"
        if recipe.hub.get("repo_id"):
            out[c["push_repo"]] = recipe.hub["repo_id"]
        return out

    def upload(self, path: Optional[str]) -> Dict[Any, Any]:
        if not path:
            return {}
        if os.path.getsize(path) > MAX_TEXT:
            return {self.c["load_status"]: error_line(ConfigError(f"upload: larger than {MAX_TEXT:,} bytes"))}
        text = Path(path).read_text(errors="replace")
        return {self.c["paste"]: text, **self.load(text)}

    def method_changed(self, method: str, steps: str) -> List[Any]:
        """Which generated fields a method shows (their help from the method's checks), and its steps."""
        entry = self.reg.methods.get(method)
        ups = [gr.update(visible=entry is not None), gr.update(visible=entry is None or steps == AME_STEPS)]
        ups.append(self.reg.descriptions.get(method, "") if entry is not None else "AME: each step's pseudogradient "
                   "is the mean of (merge - ingredient), fed to the optimizer below.")
        for name in self.reg.method_params:
            shown = entry is not None and name in entry
            info = parameter_help(method, name) if shown else None
            ups.append(gr.update(visible=shown, info=info))
        return ups

    def method_picked(self, method: str) -> List[Any]:
        """A method the user picked: its parameters at their defaults, one-shot first."""
        defaults = self.reg.methods.get(method, {})
        ups = [gr.update(value=ONE_SHOT if method in self.reg.methods else AME_STEPS)]
        for name, is_bool in self.reg.method_params.items():
            d = defaults.get(name)
            ups.append(gr.update(value=d if isinstance(d, bool) else (False if is_bool else _text(d))))
        return ups

    def optimizer_changed(self, name: str) -> List[Any]:
        kw = self.reg.optimizers.get(name, {})
        return [gr.update(visible=k in kw, info=f"default {_text(kw[k])}" if k in kw else None)
                for k in self.reg.optimizer_params]

    def optimizer_picked(self, name: str) -> List[Any]:
        kw = self.reg.optimizers.get(name, {})
        return [gr.update(value=kw[k] if isinstance(kw.get(k), bool) else
                          (False if is_bool and k not in kw else _text(kw.get(k))))
                for k, is_bool in self.reg.optimizer_params.items()]

    # ------------------------------------------------------------------ check, preview, run, push
    def load_kwargs(self, v: Mapping[str, Any]) -> Dict[str, Any]:
        """``from_recipe``'s arguments: remote code only when ticked (never on a shared page, where the Hub
        is asked anonymously: a visitor never borrows the server's token)."""
        if self.settings.share_safe:
            return {"token": False}
        return {"trust_remote_code": True} if v.get("trust_remote_code") else {}

    def merge_kwargs(self, v: Mapping[str, Any]) -> Dict[str, Any]:
        """``merge()``'s arguments besides the recipe: where to write, and the search."""
        safe = self.settings.share_safe
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

    def merger(self, recipe: Recipe, v: Mapping[str, Any], session: Session) -> AMEMerger:
        """The recipe's merger, read from the file the page shows (checks from the headers first)."""
        path = session.file(RECIPE_FILE, recipe.to_yaml(), sub="run")
        return AMEMerger.from_recipe(str(path), **self.load_kwargs(v))

    def preview(self, request: gr.Request, *values: Any) -> Dict[Any, Any]:
        """Headers (what differs), then the checks and the dry-run plan: no weight read, nothing written."""
        c = self.c
        out: Dict[Any, Any] = {c["tabs"]: gr.Tabs(selected="check"), c["plan"]: "", c["plan_table"]: []}
        try:
            v = self.values(values)
            recipe = self.recipe(values)
            rows, notes = inspect_models(recipe, self.settings)
        except Exception as exc:  # noqa: BLE001
            return {**out, c["check_status"]: error_line(exc), c["models_table"]: [], c["differences"]: ""}
        out.update({c["models_table"]: rows, c["differences"]: "\n".join(f"- {n}" for n in notes)})
        try:
            kw = {k: val for k, val in self.merge_kwargs(v).items() if k != "allow_unchanged"}
            plan = self.merger(recipe, v, self.session(request)).plan(**kw)
        except Exception as exc:  # noqa: BLE001 - an incompatibility: named as the CLI names it
            return {**out, c["check_status"]: error_line(exc)}
        rows = [[t.name, str(list(t.shape)), t.dtype, t.transform, t.reader, t.device, t.shard, t.read_bytes,
                 t.write_bytes] for t in plan.mine()[:5000]]
        return {**out, c["check_status"]: "checks passed: the models can be merged as composed; the plan below is "
                "what Run reads, writes and holds", c["plan"]: plan.summary(), c["plan_table"]: rows}

    def run(self, request: gr.Request, *values: Any) -> Iterator[Dict[Any, Any]]:
        """Merge in a worker thread; its progress bars and search trials shown as they come."""
        c, s = self.c, self.session(request)
        if s.job is not None and s.job.alive:
            yield {c["run_status"]: "a merge is already running on this page: cancel it first"}
            return
        try:
            v = self.values(values)
            recipe = self.recipe(values)
            if self.settings.share_safe:
                inspect_models(recipe, self.settings)  # the caps, before anything is downloaded
            kw, load = self.merge_kwargs(v), self.load_kwargs(v)
            path = s.file(RECIPE_FILE, recipe.to_yaml(), sub="run")
        except Exception as exc:  # noqa: BLE001
            yield {c["tabs"]: gr.Tabs(selected="run"), c["run_status"]: error_line(exc)}
            return
        s.drop_result()
        out = Path(kw["output_dir"]) if kw["output_dir"] else None
        before = (out is not None and out.exists(), _scratch())  # what a cancel may not take for its leftovers
        t0 = time.perf_counter()
        s.job = job = Job(lambda: AMEMerger.from_recipe(str(path), **load).merge(**kw)).start()
        yield {c["tabs"]: gr.Tabs(selected="run"), c["run_status"]: "running", c["progress"]: "", c["trials"]: []}
        while job.alive:
            time.sleep(0.25)
            status = "cancelling: the merge stops at its next step" if job.cancelled else \
                f"running ({time.perf_counter() - t0:.0f} s)"
            yield {c["run_status"]: status, c["progress"]: job.progress(), c["trials"]: _trial_rows(job.trials)}
        yield self.finished(s, job, out, before, time.perf_counter() - t0)

    def finished(self, s: Session, job: Job, out: Optional[Path], before: Tuple[bool, set],
                 seconds: float) -> Dict[Any, Any]:
        """The run's end: the result, or what a cancel left behind (nothing, checked), or the error line."""
        c = self.c
        done = {c["progress"]: job.progress(), c["trials"]: _trial_rows(job.trials)}
        if job.result is not None:
            s.result = job.result
            return {**done, **self.result_view(s), c["tabs"]: gr.Tabs(selected="result"),
                    c["run_status"]: f"merged in {seconds:.1f} s: " + " ".join(job.result.report.summary().split())}
        if isinstance(job.error, Cancelled):
            left = _leftovers_of(out, *before)
            msg = ("cancelled: nothing was written (no output folder, no staging or temporary folder left)" if not left
                   else f"cancelled; left behind: {', '.join(left)}")
            return {**done, c["run_status"]: msg}
        return {**done, c["run_status"]: error_line(job.error or RuntimeError("the merge ended without a result"))}

    def cancel(self, request: gr.Request) -> None:
        """Cancel this page's merge (the run's status says when it has stopped and what is left)."""
        s = self.session(request)
        if s.job is not None:
            s.job.cancel()

    def result_view(self, s: Session) -> Dict[Any, Any]:
        """Scores, chart, card, recipe, where the merge is (a zip of a small one), ready to push."""
        c, r = self.c, s.result
        folder = Path(r.output_dir)
        recipe_text = (folder / RECIPE_FILE).read_text() if (folder / RECIPE_FILE).is_file() else ""
        card = (folder / "README.md").read_text() if (folder / "README.md").is_file() else ""
        chart = folder / CHART_FILE
        svg = f"data:image/svg+xml;base64,{base64.b64encode(chart.read_bytes()).decode()}" if chart.is_file() else ""
        img = f'<img alt="scores" style="max-width:560px" src="{svg}">' if svg else ""
        where = (f"Temporary folder `{folder}`: removed when you run another merge or stop `hf-ame ui`; download it "
                 "as a zip or push it." if r.is_temporary else f"Saved to `{folder}`.")
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        zipped = None
        if size <= ZIP_LIMIT:
            zipped = shutil.make_archive(str(s.dir / "zip" / folder.name), "zip", root_dir=folder)
        metric = (r.metric or {}).get("name")
        return {c["folder"]: where + f" {size / 2 ** 20:.1f} MiB.",
                c["zip"]: gr.update(value=zipped, visible=bool(zipped)),
                c["scores"]: gr.update(value=_score_rows(r), label=f"scores ({metric})" if metric else "scores"),
                c["chart"]: img, c["card"]: _card_body(card, svg), c["result_recipe"]: recipe_text,
                c["download_result_recipe"]: gr.update(value=str(s.file(RECIPE_FILE, recipe_text, sub="result")),
                                                       visible=bool(recipe_text))}

    def push(self, request: gr.Request, repo: str, private: bool, token: str) -> Dict[Any, Any]:
        """One commit to the repo typed; the token is used for this call only: never shown, logged or kept."""
        c, s = self.c, self.session(request)
        token = (token or "").strip() or None
        cleared = {c["push_token"]: ""}
        try:
            if s.result is None:
                raise ConfigError("push: run a merge first")
            if self.settings.share_safe and token is None:
                raise ConfigError("push: type your Hub token (a shared page never uses the server's own)")
            from huggingface_hub.utils import validate_repo_id

            repo = (repo or "").strip()
            validate_repo_id(repo)
            info = s.result.push_to_hub(repo, private=bool(private), token=token)
        except Exception as exc:  # noqa: BLE001
            return {**cleared, c["push_status"]: error_line(exc, token), c["push_link"]: ""}
        url = str(getattr(info, "commit_url", info))
        return {**cleared, c["push_status"]: f"pushed to {repo} in one commit: {url}",
                c["push_link"]: f"[{url}]({url})"}


def _trial_rows(trials: Sequence[Mapping[str, Any]]) -> List[List[Any]]:
    return [[t["trial"], _text(t["params"]), t["score"]] for t in trials]


def _score_rows(r: MergeResult) -> List[List[Any]]:
    """Every ingredient's score, order and use, then the merge's (and the soup's, when compared)."""
    rows: List[List[Any]] = [[f"{Path(i.id).name} (local)" if i.local else i.id, i.score, i.order,
                              "yes" if i.kept else "no"] for i in r.ingredients]  # named as the card names them
    if r.scores:
        rows.append(["merged (this merge)", r.scores.get("merged"), None, ""])
        if "soup" in r.scores:
            rows.append(["uniform soup", r.scores["soup"], None, ""])
    return rows


def _card_body(card: str, chart: str) -> str:
    """The card as the Hub renders it: its body (the YAML metadata block is for the Hub), the chart inline."""
    m = re.match(r"^---\n.*?\n---\n", card, re.S)
    body = card[m.end():] if m else card
    return body.replace(f"({CHART_FILE})", f"({chart})") if chart else body


# ------------------------------------------------------------------------------------------ the layout
def _build_models(app: UIApp) -> None:
    f = app.form
    f["models"] = gr.Textbox(lines=4, placeholder="org/model  |  org/model@revision  |  ./folder  |  base+adapter",
                             info="one per line, in merge order: Hub ids (optionally @revision), folders, or "
                                  "mergekit's BASE+ADAPTER for a LoRA adapter", **_label("Ingredients", "models"))
    f["base"] = gr.Textbox(placeholder="optional: org/base-model or ./base", info="where task-vector methods measure "
                           "from; the pivot of pivot: base", **_label("Base model", "base"))


def _build_method(app: UIApp) -> None:
    """The method and its parameter form: one field per parameter any method declares, shown for the
    methods that have it, with that method's default and allowed values."""
    f, reg, c = app.form, app.reg, app.c
    f["method"] = gr.Dropdown([NO_METHOD] + list(reg.methods), value=NO_METHOD, **_label("Merge method", "method"))
    c["method_info"] = gr.Markdown("AME: each step's pseudogradient is the mean of (merge - ingredient), fed to the "
                                   "optimizer below.", elem_id="ui-method-info")
    with gr.Column(visible=False, variant="panel") as c["method_box"]:
        f["steps"] = gr.Radio([ONE_SHOT, AME_STEPS], value=ONE_SHOT, **_label("Steps", "steps"))
        with gr.Row(elem_classes="ui-params"):
            for name, is_bool in reg.method_params.items():
                kw = _label(name, f"m:{name}")
                f[f"m:{name}"] = (gr.Checkbox(visible=False, min_width=200, **kw) if is_bool else
                                  gr.Textbox(visible=False, min_width=200, **kw))


def _build_optimizer(app: UIApp) -> None:
    """AME's settings and the optimizer's keyword arguments (generated from its signature)."""
    f, reg, c, d = app.form, app.reg, app.c, AMEConfig()
    with gr.Column(visible=True, variant="panel") as c["optimizer_box"]:
        with gr.Row():
            f["optimizer"] = gr.Dropdown(list(reg.optimizers), value=d.optimizer, **_label("Optimizer", "optimizer"))
            f["lr"] = gr.Number(value=d.lr, **_label("lr", "lr"))
            f["lr_schedule"] = gr.Dropdown(list(LR_SCHEDULES), value=d.lr_schedule,
                                           **_label("lr schedule", "lr_schedule"))
            f["lr_power"] = gr.Number(value=d.lr_power, **_label("lr power", "lr_power"))
        with gr.Row():
            f["epochs"] = gr.Number(value=d.epochs, precision=0, **_label("epochs", "epochs"))
            f["batch_size"] = gr.Number(value=d.batch_size, precision=0, info="0: all ingredients in one step",
                                        **_label("batch size", "batch_size"))
            f["pivot"] = gr.Textbox(value=str(d.pivot), info="soup, first, base or an ingredient's index",
                                    **_label("pivot", "pivot"))
            f["amplification"] = gr.Textbox(value=_text(d.amplification), info="a number or linear",
                                            **_label("amplification", "amplification"))
        with gr.Row():
            f["shuffle"] = gr.Checkbox(value=d.shuffle, **_label("shuffle", "shuffle"))
            f["adaptive_pivot"] = gr.Checkbox(value=d.adaptive_pivot, **_label("adaptive pivot", "adaptive_pivot"))
        with gr.Row(elem_classes="ui-params"):
            kw = reg.optimizers[d.optimizer]
            for name, is_bool in reg.optimizer_params.items():
                opts = dict(visible=name in kw, **_label(name, f"o:{name}"))
                f[f"o:{name}"] = (gr.Checkbox(value=bool(kw.get(name, False)), min_width=200, **opts) if is_bool else
                                  gr.Textbox(value=_text(kw.get(name)), min_width=200,
                                             info=f"default {_text(kw[name])}" if name in kw else None, **opts))


def _build_ordering(app: UIApp) -> None:
    """How ingredients are scored, ranked and kept (a recipe's ``ordering``), and a validation search."""
    f = app.form
    with gr.Accordion("Ordering and search (scores need a metric and a dataset)", open=False, elem_id="ui-ordering"):
        with gr.Row():
            f["metric"] = gr.Textbox(info="accuracy, f1, loss, perplexity, ...", **_label("metric", "metric"))
            f["dataset"] = gr.Textbox(info="Hub dataset id, builder name or a save_to_disk folder",
                                      **_label("dataset", "dataset"))
            f["split"] = gr.Textbox(**_label("split", "split"))
        with gr.Row():
            f["input_column"] = gr.Textbox(**_label("input column", "input_column"))
            f["label_column"] = gr.Textbox(**_label("label column", "label_column"))
            f["order"] = gr.Dropdown(list(ORDERS), value="best", **_label("order", "order"))
            f["top_k"] = gr.Number(value=0, precision=0, info="0: keep all", **_label("top k", "top_k"))
            f["greedy"] = gr.Dropdown(["none"] + [g for g in GREEDY_MODES if g], value="none",
                                      **_label("greedy", "greedy"))
            f["compare_soup"] = gr.Checkbox(value=False, **_label("compare with the soup", "compare_soup"))
        with gr.Row():
            f["search"] = gr.Textbox(placeholder="{lr: [0.0001, 0.001], epochs: [1, 3]}",
                                     info="AMEConfig fields to search; trial 0 is the uniform soup, the best trial "
                                          "is kept", **_label("search", "search"))
            f["n_trials"] = gr.Number(value=0, precision=0, info="0: the whole grid; N: Optuna picks N",
                                      **_label("trials", "n_trials"))


def _build_output(app: UIApp) -> None:
    """The recipe's ``output`` (dtype, shards, choices for models that differ), where to write, "more recipe"."""
    f, safe, d = app.form, app.settings.share_safe, AMEConfig()
    with gr.Accordion("Output and choices for models that differ", open=True, elem_id="ui-output"):
        with gr.Row():
            f["dtype"] = gr.Dropdown(["auto"] + list(COMPUTE_DTYPES), value="auto", **_label("output dtype", "dtype"))
            f["compute_dtype"] = gr.Dropdown(list(COMPUTE_DTYPES), value=d.compute_dtype,
                                             **_label("compute dtype", "compute_dtype"))
            f["seed"] = gr.Number(value=d.seed, precision=0, info="shuffles, DARE masks", **_label("seed", "seed"))
            f["max_shard_size"] = gr.Textbox(placeholder="5GB", **_label("max shard size", "max_shard_size"))
        with gr.Row():
            for key, info in (("tokenizer_source", "vocabularies differ: union, first, base or an ingredient"),
                              ("heads", "label sets differ: union, drop or an ingredient"),
                              ("config_source", "config fields differ: first, base or an ingredient"),
                              ("chat_template", "auto, a name (chatml, ...) or Jinja text")):
                f[key] = gr.Textbox(info=info, **_label(key.replace("_", " "), key))
        with gr.Row(visible=not safe):
            f["output_dir"] = gr.Textbox(info="empty: a temporary folder (zip download or push)", scale=3,
                                         **_label("output folder", "output_dir"))
            f["overwrite"] = gr.Checkbox(value=False, **_label("overwrite", "overwrite"))
            f["allow_unchanged"] = gr.Checkbox(value=False, **_label("allow unchanged", "allow_unchanged"))
            f["trust_remote_code"] = gr.Checkbox(value=False, info="the models' custom code", **_label(
                "trust remote code", "trust_remote_code"))
        f["extra"] = gr.Textbox(lines=3, info="recipe sections the form has no field for (slices:, provenance:, "
                                "output.tokens, ...): YAML, kept as they are", **_label("more recipe", "extra"))


def _build_side(app: UIApp) -> None:
    """Paste or upload a mergekit config or recipe; the live recipe and its download."""
    c = app.c
    c["paste"] = gr.Textbox(lines=6, placeholder="paste a mergekit_config.yml or an hf_ame recipe",
                            **_label("mergekit config or recipe", "paste"))
    with gr.Row():
        c["upload"] = gr.UploadButton("Upload a file", file_types=[".yaml", ".yml"], elem_id="ui-upload")
        c["load"] = gr.Button("Fill the form", elem_id="ui-load")
    c["load_status"] = gr.Textbox(interactive=False, **_label("", "load_status"), show_label=False)
    c["recipe"] = gr.Code(language="yaml", interactive=False, **_label("recipe (what runs)", "recipe"))
    c["compose_status"] = gr.Textbox(interactive=False, show_label=False, elem_id="ui-compose-status")
    c["download_recipe"] = gr.DownloadButton("Download the recipe", interactive=False, elem_id="ui-download-recipe")


def _build_check(app: UIApp) -> None:
    c = app.c
    c["check_status"] = gr.Textbox(interactive=False, show_label=False, elem_id="ui-check-status")
    c["models_table"] = gr.Dataframe(headers=["role", "model", "revision", "architecture", "dtype", "parameters",
                                              "size", "vocabulary", "labels"], interactive=False,
                                     **_label("models (from their headers)", "models_table"))
    c["differences"] = gr.Markdown(elem_id="ui-differences")
    c["plan"] = gr.Code(language=None, interactive=False, **_label("plan (dry run)", "plan"))
    c["plan_table"] = gr.Dataframe(headers=["tensor", "shape", "dtype", "transform", "reader", "device", "shard",
                                            "read bytes", "write bytes"], interactive=False, max_height=360,
                                   **_label("tensors", "plan_table"))


def _build_run(app: UIApp) -> None:
    c = app.c
    c["run_status"] = gr.Textbox(interactive=False, show_label=False, lines=2, elem_id="ui-run-status")
    c["progress"] = gr.Textbox(lines=6, interactive=False, **_label("progress (as the CLI shows it)", "progress"))
    c["trials"] = gr.Dataframe(headers=["trial", "settings", "score"], interactive=False,
                               **_label("search trials, as they are scored", "trials"))


def _build_result(app: UIApp) -> None:
    """Where the merge is, its scores and chart, Push, its recipe and its card."""
    c = app.c
    c["folder"] = gr.Markdown(elem_id="ui-folder")
    c["zip"] = gr.DownloadButton("Download the merge (zip)", visible=False, elem_id="ui-zip")
    with gr.Row():
        c["scores"] = gr.Dataframe(headers=["model", "score", "order", "used"], interactive=False,
                                   **_label("scores", "scores"))
        c["chart"] = gr.HTML(elem_id="ui-chart")
    with gr.Accordion("Push to the Hub", open=True, elem_id="ui-push-box"):
        with gr.Row():
            c["push_repo"] = gr.Textbox(placeholder="namespace/name", **_label("repo id", "push_repo"))
            c["push_private"] = gr.Checkbox(value=True, **_label("private", "push_private"))
            c["push_token"] = gr.Textbox(type="password", placeholder="hf_... (empty: your login)",
                                         info="used for this push only: never shown, logged or kept",
                                         **_label("token", "push_token"))
        c["push"] = gr.Button("Push (one commit)", variant="primary", elem_id="ui-push")
        c["push_status"] = gr.Textbox(interactive=False, show_label=False, elem_id="ui-push-status")
        c["push_link"] = gr.Markdown(elem_id="ui-push-link")
    c["result_recipe"] = gr.Code(language="yaml", interactive=False, **_label("recipe", "result_recipe"))
    c["download_result_recipe"] = gr.DownloadButton("Download the recipe", visible=False,
                                                    elem_id="ui-download-result-recipe")
    c["card"] = gr.Markdown(elem_id="ui-card")


_HEADER = ("## hf_ame: compose, check, run and publish a merge\n"
           "Compose it (or paste a mergekit config), **Check & preview** reads only headers and plans it, **Run** "
           "merges with live progress (**Cancel** leaves nothing behind), then push the result in one commit.")
_SAFE_NOTE = ("\n\n*Shared page*: Hub repos only (no local paths), no remote code, sizes capped; merges are "
              "temporary (download them as a zip or push them with your own token).")
_CSS = ("#ui-progress textarea, #ui-run-status textarea {font-family: ui-monospace, monospace; font-size: 12px}\n"
        ".ui-params .form {flex-wrap: wrap}\n"  # the generated parameter fields wrap, each at least 200 px wide
        ".ui-params .form > * {flex: 1 1 200px !important; min-width: 200px !important}")


def _build_page(app: UIApp) -> Any:
    """The four steps as tabs under one row of actions; every handler wired by :func:`_wire`."""
    c = app.c
    with gr.Blocks(title="hf_ame", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(_HEADER + (_SAFE_NOTE if app.settings.share_safe else ""))
        with gr.Row():
            c["preview"] = gr.Button("Check & preview", elem_id="ui-preview")
            c["run"] = gr.Button("Run", variant="primary", elem_id="ui-run")
            c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="ui-cancel")
        with gr.Tabs(selected="compose", elem_id="ui-tabs") as c["tabs"]:
            with gr.Tab("1. Compose", id="compose", elem_id="ui-tab-compose"):
                with gr.Row():
                    with gr.Column(scale=3):
                        for part in (_build_models, _build_method, _build_optimizer, _build_ordering, _build_output):
                            part(app)
                    with gr.Column(scale=2):
                        _build_side(app)
            for tab_id, title, part in (("check", "2. Check & preview", _build_check), ("run", "3. Run", _build_run),
                                        ("result", "4. Result", _build_result)):
                with gr.Tab(title, id=tab_id, elem_id=f"ui-tab-{tab_id}"):
                    part(app)
        _wire(app, demo)
    return demo


def _wire(app: UIApp, demo: Any) -> None:
    """Every event: any field changed -> the live recipe; method / optimizer picked -> their generated
    fields; Fill the form, Check & preview, Run (streamed), Cancel (outside the queue), Push."""
    c, f, reg = app.c, app.form, app.reg
    comps = list(f.values())
    live = [c["recipe"], c["compose_status"], c["download_recipe"]]
    gr.on([x.change for x in comps], app.compose, inputs=comps, outputs=live, trigger_mode="always_last",
          show_progress="hidden")
    demo.load(app.compose, inputs=comps, outputs=live, show_progress="hidden")
    params = [f[f"m:{n}"] for n in reg.method_params]
    shown = [c["method_box"], c["optimizer_box"], c["method_info"], *params]
    f["method"].change(app.method_changed, [f["method"], f["steps"]], shown, show_progress="hidden")
    f["steps"].change(app.method_changed, [f["method"], f["steps"]], shown, show_progress="hidden")
    f["method"].input(app.method_picked, [f["method"]], [f["steps"], *params], show_progress="hidden")
    kwargs = [f[f"o:{n}"] for n in reg.optimizer_params]
    f["optimizer"].change(app.optimizer_changed, [f["optimizer"]], kwargs, show_progress="hidden")
    f["optimizer"].input(app.optimizer_picked, [f["optimizer"]], kwargs, show_progress="hidden")
    filled = comps + [c["load_status"], c["push_repo"]]
    c["load"].click(app.load, [c["paste"]], filled)
    c["upload"].upload(app.upload, [c["upload"]], filled + [c["paste"]])
    c["preview"].click(app.preview, comps, [c["tabs"], c["check_status"], c["models_table"], c["differences"],
                                            c["plan"], c["plan_table"]])
    results = [c[k] for k in ("folder", "zip", "scores", "chart", "card", "result_recipe", "download_result_recipe")]
    c["run"].click(app.run, comps, [c["tabs"], c["run_status"], c["progress"], c["trials"], *results],
                   show_progress="hidden")
    c["cancel"].click(app.cancel, None, None, queue=False)
    c["push"].click(app.push, [c["push_repo"], c["push_private"], c["push_token"]],
                    [c["push_token"], c["push_status"], c["push_link"]])
    demo.unload(app.unload)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(host: str = "127.0.0.1", port: Optional[int] = None, share_safe: bool = False, *, block: bool = True,
          quiet: bool = False) -> UIApp:
    """Serve the page on ``host:port`` (127.0.0.1 unless told otherwise; port: Gradio's 7860 or the next
    free one). ``block``: until Ctrl-C (or SIGTERM), then close; else return the running :class:`UIApp`
    (``.url``, ``.close()``)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = UIApp(Settings(share_safe=share_safe))
    # Gradio's copies of the files it serves (recipes, zips, uploads): in the page's folder, removed with it
    os.environ["GRADIO_TEMP_DIR"] = _GRADIO_CACHE or str(app.root / "gradio")
    try:
        _launch(app, host, port, quiet)
    except BaseException as exc:
        app.close()
        if block and isinstance(exc, KeyboardInterrupt):  # Ctrl-C while starting: the same clean stop
            return app
        raise
    if not block:
        return app
    try:
        app.demo.block_thread()  # until Ctrl-C (or, through the CLI, SIGTERM)
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return app


def _launch(app: UIApp, host: str, port: Optional[int], quiet: bool) -> None:
    demo = app.build()
    demo.queue(default_concurrency_limit=1)  # one merge at a time: it takes the cores
    # system fonts: the page asks nothing of the internet; no run history: the browser would keep every input
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    _, app.url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=quiet,
                                ssr_mode=False, run_history=False, footer_links=[], show_error=False,
                                max_file_size=MAX_TEXT if app.settings.share_safe else None, theme=theme, css=_CSS)
