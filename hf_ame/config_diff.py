"""config.json fields that differ between ingredients: found before any weight is read.

Fields that say nothing about what the weights compute pass (names, versions, dtype, ``use_cache``,
labels and vocabulary handled by ``heads=`` / ``tokenizer_source=``). Any other difference
(``rope_theta`` / ``rope_parameters``, ``max_position_embeddings``, activation, norm epsilon,
sliding window, token ids, ...) is refused with one error listing each field and each model's
value, unless the caller picks ``config_source="first" | "base" | <ingredient>``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

from .checks import resolve_model_choice
from .errors import IncompatibleCheckpointsError

__all__ = ["HARMLESS_FIELDS", "config_differences", "choose_config"]

HARMLESS_FIELDS = frozenset({
    "_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "id2label", "label2id", "num_labels",
    "architectures", "finetuning_task", "problem_type", "_attn_implementation", "attn_implementation",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript", "tokenizer_class",
    "task_specific_params", "transformers_weights", "_commit_hash", "quantization_config",
    "_model_name_or_path",  # a GGUF's general.name, as transformers reads it into the config
})
_VOCAB_FIELDS = ("vocab_size",)
_MISSING = object()


def _flatten(config: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in config.items():
        if k in HARMLESS_FIELDS:
            continue
        if isinstance(v, Mapping) and k.endswith("_config"):  # text_config, vision_config, ...
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _as_transformers_reads(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The config as transformers loads it (its class's defaults filled in), so two saves of one
    config by different transformers versions compare equal; the raw JSON for unknown model types."""
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[config["model_type"]].from_dict(dict(config)).to_dict()
    except Exception:  # noqa: BLE001 - custom or unknown model types: compare the files as they are
        return dict(config)


def config_differences(headers: Sequence[Any], *, skip_vocab: bool = False) -> Dict[str, List[Any]]:
    """{dotted field: each model's value} for every field that differs (a model lacking it: None)."""
    flat = [_flatten(_as_transformers_reads(h.config)) for h in headers]
    fields = list(dict.fromkeys(k for f in flat for k in f))
    out: Dict[str, List[Any]] = {}
    for key in fields:
        leaf = key.rsplit(".", 1)[-1]
        if leaf in _VOCAB_FIELDS or (skip_vocab and leaf.endswith("_token_id")):
            continue  # rows: the tensor shapes say it (and tokenizer_source decides); token ids follow tokenizer_source
        values = [f.get(key, _MISSING) for f in flat]
        if any(v != values[0] for v in values[1:]):
            out[key] = [None if v is _MISSING else v for v in values]
    return out


def choose_config(headers: Sequence[Any], source: Union[str, int, None], *, has_base: bool,
                  skip_vocab: bool = False) -> Tuple[Dict[str, Any], List[str]]:
    """The config fields the output takes (from ``config_source``) and notes for the card; with no
    ``source``, any difference is refused, listing every field and every model's value."""
    names = [h.name for h in headers]
    diff = config_differences(headers, skip_vocab=skip_vocab)
    if not diff:
        return {}, []
    if source is None:
        listing = "; ".join(f"{k}: " + ", ".join(f"{n!r}={v!r}" for n, v in zip(names, vals))
                            for k, vals in diff.items())
        raise IncompatibleCheckpointsError(
            f"the models' configs differ in what the weights compute ({listing}); pick the output's with "
            "config_source='first', 'base' or an ingredient's id")
    k = resolve_model_choice("config_source", source, names, has_base=has_base, expected="'first', 'base'")
    changes: Dict[str, Any] = {}
    for key in diff:  # a field of a nested config: the chosen one's whole sub-config
        top = key.split(".")[0]
        changes[top] = headers[k].config.get(top)
    notes = [f"config: {names[k]!r}'s fields taken where the models differ: "
             + "; ".join(f"{key} (" + ", ".join(f"{n!r}={v!r}" for n, v in zip(names, vals)) + ")"
                         for key, vals in diff.items())]
    return changes, notes
