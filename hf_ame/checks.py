"""Compatibility checks on configs and tensor headers only: they run before any weight is read."""
from __future__ import annotations

from typing import Any, Collection, Dict, List, Mapping, Optional, Protocol, Sequence, Union

import torch

from .checkpoints import TensorInfo
from .config import COMPUTE_DTYPES
from .errors import IncompatibleCheckpointsError, NonFiniteWeightsError

__all__ = ["IncompatibleCheckpointsError", "NonFiniteWeightsError", "check_compatible", "align_tied_copies",
           "HeaderLike", "storage_dtype", "model_dtype", "resolve_model_choice"]


class HeaderLike(Protocol):
    name: str
    config: Mapping[str, Any]
    tensors: Mapping[str, TensorInfo]


def _fmt_shape(s) -> str:
    return "(" + ", ".join(str(d) for d in s) + ")"


def check_compatible(ingredients: Sequence[HeaderLike], base: Optional[HeaderLike] = None, *,
                     min_ingredients: int = 2, varying_rows: Collection[str] = ()) -> None:
    """Raise :class:`IncompatibleCheckpointsError` unless all ingredients (and the base) share
    model_type, architectures, tensor names, shapes and dtypes. The first ingredient is the reference.
    Tensors in ``varying_rows`` (rows matched by token or label) may differ in their first dimension."""
    if len(ingredients) < min_ingredients:
        raise IncompatibleCheckpointsError(
            f"a merge needs at least {min_ingredients} ingredients, got {len(ingredients)}"
            + (f" ({', '.join(i.name for i in ingredients)})" if ingredients else "")
        )
    align_tied_copies(list(ingredients) + ([base] if base is not None else []))
    names = [i.name for i in ingredients]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise IncompatibleCheckpointsError(f"ingredient {dup[0]!r} is listed more than once")
    for ck in list(ingredients) + ([base] if base is not None else []):
        if not ck.config:
            raise IncompatibleCheckpointsError(
                f"{'base model' if ck is base else 'model'} {ck.name!r} has no config.json: its architecture "
                "cannot be checked and the merge could not be loaded; save it with save_pretrained")
    ref = ingredients[0]
    others = list(ingredients[1:]) + ([base] if base is not None else [])
    for other in others:
        role = "base model" if other is base else "model"
        for key in ("model_type", "architectures") if other is not base else ("model_type",):  # a base may be headless
            a, b = ref.config.get(key), other.config.get(key)
            if a is not None and b is not None and a != b:
                raise IncompatibleCheckpointsError(
                    f"{role} {other.name!r} has {key} {b!r} but {ref.name!r} has {a!r}: "
                    "only checkpoints of one architecture can be merged"
                )
        # a base may lack row-matched tensors (a headless body lacks the head): those merge without it
        missing = [k for k in ref.tensors if k not in other.tensors and not (other is base and k in varying_rows)]
        extra = [k for k in other.tensors if k not in ref.tensors]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} tensor(s) of {ref.name!r}, e.g. {missing[0]!r}")
            if extra:
                parts.append(f"has {len(extra)} tensor(s) that {ref.name!r} lacks, e.g. {extra[0]!r}")
            raise IncompatibleCheckpointsError(f"{role} {other.name!r} " + " and ".join(parts))
        for k, info in ref.tensors.items():
            if k not in other.tensors:
                continue
            o = other.tensors[k]
            same = (tuple(o.shape[1:]) == tuple(info.shape[1:]) and len(o.shape) == len(info.shape)
                    if k in varying_rows else tuple(o.shape) == tuple(info.shape))
            if not same:
                raise IncompatibleCheckpointsError(
                    f"tensor {k!r} has shape {_fmt_shape(o.shape)} in {role} {other.name!r} "
                    f"but {_fmt_shape(info.shape)} in {ref.name!r}" + _rows_hint(k, o.shape, info.shape, other, ref))
            # floating dtypes may differ (bf16 and fp32 uploads of one model): the merge runs in the
            # compute dtype and writes the first ingredient's dtype (or dtype=)
            if o.dtype != info.dtype and not (o.is_floating and info.is_floating):
                raise IncompatibleCheckpointsError(
                    f"tensor {k!r} has dtype {str(o.dtype).replace('torch.', '')} in {role} {other.name!r} "
                    f"but {str(info.dtype).replace('torch.', '')} in {ref.name!r}"
                )


def _rows_hint(name: str, a: Sequence[int], b: Sequence[int], ca: HeaderLike, cb: HeaderLike) -> str:
    """Why two shapes may differ only in rows: vocabularies (tokenizer_source) or label sets."""
    if len(a) != len(b) or tuple(a[1:]) != tuple(b[1:]) or not a:
        return ""

    def vocab(c: HeaderLike) -> Any:
        return c.config.get("vocab_size") or (c.config.get("text_config") or {}).get("vocab_size")

    if (vocab(ca), vocab(cb)) == (a[0], b[0]):
        return (f"; the vocabularies differ ({a[0]} and {b[0]} embedding rows): pass tokenizer_source='union', "
                "'first', 'base' or an ingredient's id to match the rows by token")
    return ""


def resolve_model_choice(field: str, value: Union[str, int], names: Sequence[str], *, has_base: bool, expected: str,
                         keywords: Sequence[str] = ()) -> Union[str, int]:
    """A choice of one model (``tokenizer_source``, ``config_source``, ``heads``): one of ``keywords``
    as it is; "first": 0; "base": the base's index (the last of ``names``; needs a base); an
    ingredient's index, or a model's id (the base's too): its index. Anything else is refused, saying
    ``expected``."""
    n = len(names) - (1 if has_base else 0)
    if value in keywords:
        return value
    if value == "first":
        return 0
    if value == "base":
        if not has_base:
            raise IncompatibleCheckpointsError(f"{field}: 'base' needs a base_model")
        return len(names) - 1
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < n:
            raise IncompatibleCheckpointsError(f"{field}: ingredient index {value} is out of range for {n} ingredients")
        return value
    if isinstance(value, str) and value in names:  # an ingredient's id, or the base's
        return list(names).index(value)
    raise IncompatibleCheckpointsError(f"{field}: expected {expected}, an ingredient's id or index; got {value!r} "
                                       f"(ingredients: {', '.join(names[:n])})")


def storage_dtype(tensors: Mapping[str, TensorInfo]) -> Optional[str]:
    """The floating dtype holding most of a checkpoint's parameters ("bfloat16", ...), or None."""
    counts: dict = {}
    for info in tensors.values():
        if info.is_floating:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    return str(max(counts, key=counts.get)).replace("torch.", "") if counts else None


def model_dtype(ckpt: HeaderLike) -> torch.dtype:
    """The dtype a checkpoint says it is (``config.json``'s ``dtype`` / ``torch_dtype``, as
    transformers reads it), else the floating dtype most of its parameters are stored in. Not the
    first tensor's: bf16 models keep a few float32 tensors (routers, T5's ``wo``), listed first."""
    name = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
    if isinstance(name, str) and name.replace("torch.", "") in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[name.replace("torch.", "")]
    stored = storage_dtype(ckpt.tensors)
    return COMPUTE_DTYPES[stored] if stored in COMPUTE_DTYPES else torch.float32


def align_tied_copies(headers: Sequence[HeaderLike]) -> List[str]:
    """Drop stored copies of tied weights that other ingredients leave out, as transformers does on
    load. Older ``pytorch_model.bin`` files store ``lm_head.weight`` beside the embedding it is tied
    to; ``save_pretrained`` now writes it once. A key is dropped only when the architecture ties it
    (the model class's ``_tied_weights_keys``), the config ties word embeddings, its source is
    stored, and another ingredient lacks it (so the merge is written as save_pretrained would).
    Returns the dropped names."""
    keys = [set(h.tensors) for h in headers]
    if len({frozenset(k) for k in keys}) <= 1:
        return []
    tied = _tied_keys(headers[0].config)
    dropped = sorted(t for t, src in tied.items()
                     if any(t not in k for k in keys) and all(src in k for k in keys))
    for h in headers:
        for t in dropped:
            h.tensors.pop(t, None)  # type: ignore[attr-defined]
    return dropped


def _tied_keys(config: Mapping[str, Any]) -> Dict[str, str]:
    """{tied name: its source} for this config's architecture, when its word embeddings are tied."""
    import transformers  # heavy; needed only when ingredients store different tensor sets

    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    tied = getattr(cls, "_tied_weights_keys", None)
    if not isinstance(tied, dict):
        return {}
    tie = config.get("tie_word_embeddings")
    if tie is None and config.get("model_type"):
        try:  # through transformers' accessor: a multimodal config keeps it on its text config
            cfg = transformers.AutoConfig.for_model(config["model_type"])
            tie = getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "tie_word_embeddings",
                          getattr(cfg, "tie_word_embeddings", None))
        except (ValueError, KeyError, AttributeError):
            tie = None
    return dict(tied) if tie else {}
