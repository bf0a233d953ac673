"""What transformers says about an architecture, asked of an empty-weight skeleton (no memory
used): its class, which tensors are the token embeddings, the head outside ``base_model_prefix``,
and how names in files map to names in memory. No per-architecture tables."""
from __future__ import annotations

import re
from typing import Any, Callable, Collection, Dict, List, Optional

__all__ = ["model_class_for", "empty_model", "file_to_model_renamer", "embedding_tensors", "base_model_prefix",
           "headless_class", "skeleton_from_config"]


def model_class_for(config: Any, trust_remote_code: bool = False):
    """The transformers class named by ``config.architectures[0]``, else the Auto class that fits."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def empty_model(config: Any, trust_remote_code: bool = False):
    """The architecture of ``config`` with empty (meta) weights, its tied weights tied."""
    from accelerate import init_empty_weights
    import transformers

    cls = model_class_for(config, trust_remote_code)
    with init_empty_weights():
        if cls is transformers.AutoModel or trust_remote_code:
            model = transformers.AutoModel.from_config(config, trust_remote_code=trust_remote_code)
        else:
            model = cls._from_config(config)
    model.tie_weights()  # so tied parameters land on one device
    return model


def file_to_model_renamer(model) -> Callable[[str], str]:
    """name-in-file -> name-in-memory, from transformers' checkpoint conversion renames (e.g. ViT's
    ``encoder.layer.N.attention.attention.key`` -> ``layers.N.attention.k_proj``). Only plain
    renames are applied; identity when transformers offers none."""
    pairs = []
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        for c in get_model_conversion_mapping(model):
            if isinstance(c, WeightRenaming) and len(c.target_patterns) == 1:
                prefix = getattr(c, "scope_prefix", None) or ""
                for s in c.source_patterns:
                    pairs.append((prefix, re.compile(s), c.target_patterns[0]))
    except Exception:  # noqa: BLE001 - older/newer transformers: no renames known
        pairs = []

    def rename(name: str) -> str:
        for prefix, pat, target in pairs:
            if not prefix or name.startswith(prefix):
                name = pat.sub(target, name)
        return name

    return rename


def _module_name(model, module) -> Optional[str]:
    return next((n for n, m in model.named_modules() if m is module), None)


def embedding_tensors(config_dir: str, file_names: Collection[str], trust_remote_code: bool = False) -> List[str]:
    """The file names of the tensors whose rows are token ids: the model's input embeddings and
    output embeddings (lm_head), weight and bias, as ``get_input_embeddings`` /
    ``get_output_embeddings`` name them (a tied lm_head that the file leaves out is not listed)."""
    from transformers import AutoConfig

    model = empty_model(AutoConfig.from_pretrained(config_dir, trust_remote_code=trust_remote_code), trust_remote_code)
    rename = file_to_model_renamer(model)
    wanted = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        name = _module_name(model, module) if module is not None else None
        if name is None:
            continue
        wanted.update(f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False))
    return [f for f in file_names if rename(f) in wanted]


def base_model_prefix(config: Any, trust_remote_code: bool = False) -> str:
    """The architecture's ``base_model_prefix`` ("vit", "bert", "model", ...; "" when it has none)."""
    cls = model_class_for(config, trust_remote_code)
    return getattr(cls, "base_model_prefix", "") or ""


def headless_class(config: Any, trust_remote_code: bool = False):
    """The architecture's body without a head (``BertModel`` for ``BertForSequenceClassification``):
    the class ``AutoModel`` maps its config class to."""
    import transformers

    cls = model_class_for(config, trust_remote_code)
    try:
        return transformers.AutoModel._model_mapping[cls.config_class]
    except (KeyError, AttributeError):
        return cls


def skeleton_from_config(config: Dict[str, Any], trust_remote_code: bool = False) -> Optional[Any]:
    """An empty-weight model of a config.json dict (None when transformers does not know it)."""
    from transformers import CONFIG_MAPPING

    try:
        cfg = CONFIG_MAPPING[config["model_type"]].from_dict(dict(config))
        return empty_model(cfg, trust_remote_code)
    except Exception:  # noqa: BLE001 - custom or unknown architectures: no layouts to align
        return None
