"""Everything checked before any weight is read or downloaded: the ingredient list parsed, each
ingredient's header read (local safetensors headers, or Hub config.json plus HTTP range reads),
names, vocabulary rows, label rows and config fields aligned, then the downloads. A mismatch fails
here, named, before the first weight byte moves."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from huggingface_hub import constants as hf_constants

from .adapters import is_adapter
from .architecture import base_model_prefix, headless_class, skeleton_from_config
from .checkpoints import Checkpoint
from .checks import check_compatible, storage_dtype
from .config import ConfigError
from .config_diff import choose_config
from .errors import IncompatibleCheckpointsError, IngredientError
from .hub import Ingredient, RemoteHeader, download, inspect_remote, parse_ingredient
from .labels import align_labels, drop_renames, prefix_renames
from .layouts import LAYOUTS, in_memory_layout, original_layout
from .limits import MAX_PAD_TO_MULTIPLE_OF, check_count
from .output import TOKENIZER_FILES
from .quantization import check_quantization, dequantized_infos, is_fp8
from .rows import MISSING_TOKENS, RowAlignment
from .vocab import align_vocab, resolve_chat_template

__all__ = ["Preflight", "check_and_download", "open_ingredient", "parse_models"]


def read_headers(everyone: Sequence[Ingredient], *, cache_dir: Any, token: Union[bool, str, None],
                  local_files_only: bool, endpoint: Optional[str],
                  adapter_base: Optional[Path] = None) -> Tuple[List[Any], Dict[int, List[str]]]:
    """Each ingredient's header (None for a .bin-only Hub repo) and each Hub repo's file list: local
    folders read their safetensors headers; Hub repos answer with config.json and HTTP range reads
    of the headers; cached-only mode resolves the snapshot. HF_HUB_OFFLINE=1 means the cache, as
    transformers reads it (``local_files_only=True``); an id that is not cached fails there, named."""
    local_files_only = local_files_only or bool(hf_constants.HF_HUB_OFFLINE)
    headers: List[Any] = []
    remote_files: Dict[int, List[str]] = {}
    for k, ing in enumerate(everyone):
        if ing.local:
            headers.append(open_ingredient(ing, adapter_base))
        elif ing.gguf_file:  # a GGUF of a Hub repo: that one file is downloaded, its header read
            ing.path, ing.sha = download(ing, cache_dir=cache_dir, token=token, local_files_only=local_files_only,
                                         endpoint=endpoint)
            headers.append(open_ingredient(ing, adapter_base))
        elif local_files_only:
            ing.path, ing.sha = download(ing, cache_dir=cache_dir, token=token, local_files_only=True,
                                         endpoint=endpoint)
            headers.append(open_ingredient(ing, adapter_base))
        else:
            h: RemoteHeader = inspect_remote(ing, token=token, endpoint=endpoint)
            ing.sha = h.sha
            remote_files[k] = h.files
            if h.adapter:  # a LoRA adapter repo: small; read as its base plus the adapter
                ing.path, ing.sha = download(ing, cache_dir=cache_dir, token=token, endpoint=endpoint)
                headers.append(open_ingredient(ing, adapter_base))
            else:
                headers.append(h if h.safetensors else None)
    return headers, remote_files


def open_ingredient(ing: Ingredient, adapter_base: Optional[Path] = None) -> Checkpoint:
    """The ingredient's checkpoint; a LoRA adapter over its own ``base`` entry (mergekit's
    ``model+lora``), else over ``adapter_base`` (``from_pretrained(base_model=...)``), else over its
    ``base_model_name_or_path``."""
    base = ing.adapter_base if ing.adapter_base is not None else adapter_base
    if ing.gguf_file:  # the named GGUF file of its folder (hf_ame.gguf)
        return Checkpoint(Path(ing.path) / ing.gguf_file, name=ing.id)
    if base is not None and is_adapter(ing.path):
        return Checkpoint(ing.path, name=ing.id, base=base)
    return Checkpoint(ing.path, name=ing.id)


def parse_models(models: Any, base_model: Any, revision: Optional[str],
                  min_models: Optional[int]) -> Tuple[List[Ingredient], Optional[Ingredient], int]:
    """(the ingredients, the base, the fewest ingredients accepted), refused when too few."""
    if isinstance(models, (str, os.PathLike, Mapping)):
        raise IngredientError("models: expected a list of ingredients (repo ids or folders), got a single one")
    ings = [parse_ingredient(m, revision, f"models[{i}]") for i, m in enumerate(models)]
    base = parse_ingredient(base_model, revision, "base_model") if base_model is not None else None
    least = min_models if min_models is not None else (1 if base is not None else 2)
    if len(ings) < least:  # one model and a base: slerp
        raise IncompatibleCheckpointsError(f"a merge needs at least {least} ingredients, got {len(ings)}"
                                           + (" (one is enough with a base_model, for slerp)" if least == 2 else ""))
    return ings, base, least


def check_and_download(check: "Preflight", *, local_files_only: bool) -> float:
    """Read the headers (see :func:`read_headers`), run the checks, then download what the merge
    needs (safetensors, configs, tokenizer/processor files); .bin-only Hub repos are checked after
    their download. Returns the time the checks ended (``time.perf_counter``)."""
    everyone, a = check.everyone, check.access
    base = everyone[check.n] if len(everyone) > check.n else None  # a local base is every adapter's base
    headers, remote_files = read_headers(everyone, cache_dir=a["cache_dir"], token=a["token"],
                                          local_files_only=local_files_only, endpoint=a["endpoint"],
                                          adapter_base=Path(base.path) if base is not None and base.local else None)
    ready = all(h is not None for h in headers)
    if ready:
        check.run(headers)
    t1 = time.perf_counter()
    for k, ing in enumerate(everyone):
        if not ing.local and ing.path is None:
            ing.path, ing.sha = download(ing, files=remote_files.get(k, []), cache_dir=a["cache_dir"], token=a["token"],
                                         trust_remote_code=a["trust_remote_code"], endpoint=a["endpoint"])
    if not ready:
        headers = [open_ingredient(i, Path(base.path) if base is not None else None) for i in everyone]
        check.run(headers)
    for ing, h in zip(everyone, headers):
        ing.dtype = storage_dtype(getattr(h, "raw_tensors", h.tensors))
        if getattr(h, "gguf_file", None):  # recorded in the card and the recipe: which file, which quantization
            ing.gguf_file, ing.quantization = h.gguf_file, h.quantization
    return t1


class Preflight:
    """Everything checked before any weight is read: names aligned by ``base_model_prefix`` (or the
    head dropped), vocabulary rows (``tokenizer_source``), label rows (``heads``), config fields
    (``config_source``), then tensor names, shapes and dtypes. Fills ``rows`` and ``renames``."""

    def __init__(self, everyone: Sequence[Ingredient], n: int, least: int, choices: Mapping[str, Any],
                 access: Mapping[str, Any]):
        self.everyone, self.n, self.least, self.choices, self.access = list(everyone), n, least, dict(choices), access
        if self.choices.get("missing_tokens") not in MISSING_TOKENS:
            raise ConfigError(f"missing_tokens: expected None or 'mergekit', got {self.choices['missing_tokens']!r}")
        if self.choices.get("pad_to_multiple_of") is not None:  # rows are padded up to it: bounded
            check_count(self.choices["pad_to_multiple_of"], "pad_to_multiple_of", 1, MAX_PAD_TO_MULTIPLE_OF)
        if self.choices.get("layout") not in (None, *LAYOUTS):
            raise ConfigError(f"layout: expected one of {', '.join(LAYOUTS)}, got {self.choices['layout']!r}")
        if self.choices.get("tokens") and self.choices.get("tokenizer_source") is None:
            raise ConfigError("tokens: per-token row sources need tokenizer_source (the output's vocabulary)")
        self.rows: Optional[RowAlignment] = None
        self.renames: Dict[str, Dict[str, str]] = {}
        self.layouts: Dict[str, Any] = {}  # model id -> its tensors in the original layout (see hf_ame.layouts)
        self.skeleton: Any = None

    def align_layouts(self, headers: Sequence[Any], notes: List[str]) -> None:
        """``layout="original"`` (default): checkpoints saved in transformers' in-memory layout (fused
        MoE experts, ...) read in the original one, when the ingredients' tensor names differ.
        ``layout="in_memory"`` (mergekit configs): every checkpoint read in the in-memory layout."""
        in_memory = self.choices.get("layout") == "in_memory"
        if (not headers[0].config.get("model_type")
                or (not in_memory and len({frozenset(h.tensors) for h in headers}) <= 1)):
            return
        self.skeleton = skeleton_from_config(headers[0].config, self.access["trust_remote_code"])
        for h in headers:
            layout = None if self.skeleton is None else (in_memory_layout if in_memory else original_layout)(
                self.skeleton, h.tensors)
            if layout:
                self.layouts[h.name] = layout
                h.tensors = {k: info for k, (_, info) in layout.entries.items()}
                notes.append(f"{h.name!r} read in transformers' in-memory layout (fused experts), as mergekit reads it"
                             if in_memory else f"{h.name!r} is saved in transformers' in-memory layout "
                             "(save_original_format=False): read in the original layout, as transformers converts it")

    def run(self, headers: Sequence[Any]) -> None:
        ings, base = list(headers[:self.n]), (headers[self.n] if len(headers) > self.n else None)
        rows, c = RowAlignment(), self.choices
        for h in headers:  # quantized: FP8 read as the weights it stands for; any other scheme refused by name
            check_quantization(h.name, h.config, getattr(h, "raw_tensors", h.tensors))
            if is_fp8(h.config) and not hasattr(h, "raw_tensors"):  # a Hub header: the same view as FP8Checkpoint's
                h.tensors = dequantized_infos(h.tensors)[0]
        prefix = base_model_prefix(ConfigView(ings[0].config)) if ings[0].config else ""
        layout_notes: List[str] = []
        self.align_layouts(headers, layout_notes)
        self.renames, notes = ((drop_renames(headers, prefix), []) if c["heads"] == "drop"
                               else prefix_renames(headers, prefix))
        notes = layout_notes + notes
        for h in headers:
            if h.name in self.renames:
                h.rekey(self.renames[h.name])
        rows.notes.extend(notes)
        if c["tokenizer_source"] is not None:
            folders = [files_folder(i, h, **self.access) for i, h in zip(self.everyone, headers)]
            rows.update(align_vocab(headers, folders, c["tokenizer_source"], has_base=base is not None,
                                    pad_to_multiple_of=c["pad_to_multiple_of"],
                                    trust_remote_code=self.access["trust_remote_code"],
                                    missing_tokens=c.get("missing_tokens"), tokens=c.get("tokens")))
        if c.get("chat_template") is not None:
            folders = [files_folder(i, h, **self.access) for i, h in zip(self.everyone, headers)]
            rows.chat_template, note = resolve_chat_template(c["chat_template"], folders, [h.name for h in headers],
                                                             self.access["trust_remote_code"])
            rows.notes.append(note)
        labels, _ = align_labels(ings, c["heads"], prefix=prefix, base=base)
        rows.update(labels)
        if c["heads"] == "drop":
            rows.config_changes["architectures"] = [headless_class(ConfigView(ings[0].config)).__name__]
            rows.notes.append(f"heads: dropped; the merged body is saved as {rows.config_changes['architectures'][0]}")
        check_compatible(ings, base, min_ingredients=self.least, varying_rows=rows.tensors)
        changes, notes = choose_config(headers, c["config_source"], has_base=base is not None,
                                       skip_vocab=c["tokenizer_source"] is not None)
        rows.config_changes = {**changes, **rows.config_changes}
        rows.notes.extend(notes)
        self.rows = rows


class ConfigView:
    """A config.json dict seen as a config object (``.architectures``) by transformers' class lookup."""

    def __init__(self, config: Mapping[str, Any]):
        self.architectures = config.get("architectures")
        self.model_type = config.get("model_type")


def files_folder(ing: Ingredient, header: Any, *, cache_dir: Any, token: Any, endpoint: Optional[str],
                  **_: Any) -> Path:
    """A folder with the ingredient's config and tokenizer files: its own folder (an adapter without
    tokenizer files: its base's), or, for a Hub repo not downloaded yet, its small files only."""
    if ing.path is None:
        folder, _ = download(ing, cache_dir=cache_dir, token=token, endpoint=endpoint, weights=False)
        return folder
    own = Path(ing.path)
    return own if any((own / f).is_file() for f in TOKENIZER_FILES) else Path(header.files_path)
