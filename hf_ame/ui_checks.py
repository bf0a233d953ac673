"""Check & preview's first half: every model's header row and what differs between them, with the
choice that resolves each (config.json and safetensors headers only: no weight is downloaded), and the
shared page's size caps, applied before anything is downloaded. No gradio."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping, Sequence, Tuple

from .checks import storage_dtype
from .config_diff import config_differences
from .errors import ConfigError
from .labels import labels_of
from .preflight import parse_models, read_headers
from .recipe import Recipe
from .ui_form import Settings


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
