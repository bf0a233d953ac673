"""LoRA adapters as ingredients: a folder with ``adapter_config.json`` + ``adapter_model.safetensors``
reads like the full fine-tune it stands for, ``W + scaling * B @ A`` one tensor at a time.

The adapter's config is read with peft's own :class:`peft.LoraConfig`; the expansion follows
peft's ``merge_and_unload`` (``get_delta_weight``: float32 product on CPU, cast to the weight's
dtype, added in it; ``lora_alpha / r``, or ``/ sqrt(r)`` with ``use_rslora``; ``rank_pattern`` /
``alpha_pattern``; ``fan_in_fan_out``; embedding adapters transposed; ``modules_to_save`` and
trained biases replace the base's tensors). Adapter kinds and options that change the merge in
other ways (DoRA, LoRA biases, other peft types, ...) are refused by name.

Importing this module registers the format with :class:`~hf_ame.checkpoints.Checkpoint`, so
``Checkpoint(folder)`` of an adapter folder is an :class:`AdapterCheckpoint`: the engine,
ordering and checks see the base model's tensor names, shapes and dtypes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from safetensors.torch import load_file

from .checkpoints import Checkpoint, CheckpointError, TensorInfo, read_safetensors_header, register_checkpoint_kind
from .trust import check_folder, checked_file, hub_snapshot_repo

__all__ = ["AdapterCheckpoint", "is_adapter", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# LoraConfig fields that change what the adapted weights are beyond W + s * B @ A: refused unless unset
_UNSUPPORTED = ("use_dora", "lora_bias", "layer_replication", "target_parameters", "trainable_token_indices",
                "alora_invocation_tokens", "arrow_config", "use_bdlora", "use_qalora", "kasa_config",
                "monteclora_config", "velora_config")


def is_adapter(path: Union[str, Path]) -> bool:
    """A peft adapter folder (``adapter_config.json``) without full weights of its own."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / "model.safetensors").exists() \
        and not (p / "model.safetensors.index.json").exists()


class AdapterCheckpoint(Checkpoint):
    """A LoRA adapter over its base checkpoint, read as the merged model. ``base``: the base
    folder (default: the adapter's ``base_model_name_or_path``, a folder or a Hub id in the local
    Hugging Face cache). ``files_path`` is the base's folder: config and tokenizer come from there."""

    def __init__(self, path: Union[str, Path], name: Optional[str] = None, base: Union[str, Path, None] = None):
        self.path = Path(path)
        self.name = name or str(path)
        check_folder(self.path, self.name)  # links out of the folder, FIFOs: refused before any read
        self.lora = _read_lora_config(self.path, self.name)
        # an adapter downloaded from the Hub names its base on the Hub: never a folder of this machine
        where = base if base is not None and Path(base).is_dir() else _resolve_base(
            str(base) if base is not None else self.lora.base_model_name_or_path, self.name,
            hub_only=base is None and hub_snapshot_repo(self.path) is not None)
        self.base = Checkpoint(where, name=f"{base or self.lora.base_model_name_or_path} (base of {self.name})")
        self.files_path = self.base.files_path
        self.config = self.base.config
        self.format, self.weight_file = "adapter", ADAPTER_WEIGHTS
        # offsets unknown (-1): the engine never reads adapter tensors by byte range
        self.tensors = {k: TensorInfo(k, i.dtype, i.shape, i.file) for k, i in self.base.tensors.items()}
        self._bin_state, self._fds = {}, {}
        weights = _load_adapter(checked_file(self.path, ADAPTER_WEIGHTS, self.name), self.name) \
            if os.path.lexists(self.path / ADAPTER_WEIGHTS) else None
        if weights is None:
            raise CheckpointError(f"{self.name}: adapter folder without {ADAPTER_WEIGHTS}")
        self._own_bytes = sum(t.numel() * t.element_size() for t in weights.values())
        self._counted = False
        self.deltas, self.replaced = self._plan(weights)
        self._cache: Tuple[Optional[str], Optional[torch.Tensor]] = (None, None)
        self._source: Dict[str, str] = {}  # merge name -> base tensor name, once rekeyed (a slice's layers)

    @property
    def bytes_read(self) -> int:  # type: ignore[override]
        return self.base.bytes_read + (self._own_bytes if self._counted else 0)

    def _plan(self, weights: Dict[str, torch.Tensor]) -> Tuple[Dict[str, tuple], Dict[str, torch.Tensor]]:
        """Map the adapter's tensors onto base tensor names: name -> (A, B, scaling, transpose) and
        name -> full replacement (modules_to_save, trained biases). Every key must land on a base
        tensor of the right shape; nothing is skipped silently."""
        pairs: Dict[str, Dict[str, torch.Tensor]] = {}
        replaced: Dict[str, torch.Tensor] = {}
        for key, t in weights.items():
            k = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", k)
            if m is None:
                replaced[self._target(k, key, tuple(t.shape))] = t
                continue
            module, part = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            pairs.setdefault(module, {})[part] = t
        deltas: Dict[str, tuple] = {}
        for module, p in pairs.items():
            embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
            a, b = ((p.get("lora_embedding_A"), p.get("lora_embedding_B")) if embedding
                    else (p.get("lora_A"), p.get("lora_B")))
            if a is None or b is None or a.dim() != 2 or b.dim() != 2:
                raise CheckpointError(f"{self.name}: module {module!r} needs a 2-D lora A and B pair (convolution "
                                      "and other layer kinds are not supported)")
            r = a.shape[0]
            if b.shape[1] != r:  # B @ A would fail mid-merge, naming neither
                raise CheckpointError(f"{self.name}/{ADAPTER_WEIGHTS}: module {module!r} has rank {r} in its A tensor "
                                      f"{tuple(a.shape)} but {b.shape[1]} in its B tensor {tuple(b.shape)}")
            alpha = self.lora.alpha_pattern.get(_pattern_key(self.lora.alpha_pattern, module), self.lora.lora_alpha)
            scaling = alpha / (math.sqrt(r) if self.lora.use_rslora else r)
            transpose = embedding or bool(self.lora.fan_in_fan_out)
            shape = (b.shape[0], a.shape[1]) if not transpose else (a.shape[1], b.shape[0])
            deltas[self._target(f"{module}.weight", f"{_PREFIX}{module}", shape)] = (a, b, scaling, transpose)
        return deltas, replaced

    def _target(self, name: str, key: str, shape: Tuple[int, ...]) -> str:
        info = self.base.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.name}: adapter tensor {key!r} has no tensor {name!r} in its base "
                                  f"{self.base.name!r}")
        if tuple(info.shape) != tuple(shape):
            raise CheckpointError(f"{self.name}: adapter tensor {key!r} gives shape {tuple(shape)} but {name!r} of "
                                  f"the base has {tuple(info.shape)}")
        return name

    def _expanded(self, name: str) -> torch.Tensor:
        """The adapted tensor, computed once per name (the engine reads one tensor at a time)."""
        if self._cache[0] == name:
            return self._cache[1]  # type: ignore[return-value]
        if name not in self.tensors:
            raise CheckpointError(f"{self.name}: has no tensor {name!r}")
        self._counted = True
        src = self._source.get(name, name)
        if src in self.replaced:
            t = self.replaced[src].to(self.tensors[name].dtype)
        else:
            t = self.base.get_tensor(src)
            if src in self.deltas:
                a, b, scaling, transpose = self.deltas[src]
                delta = b.float() @ a.float()
                delta = (delta.t() if transpose else delta) * scaling
                t = t + delta.to(t.dtype)  # as peft's merge: the delta in the weight's dtype, added in it
        self._cache = (name, t)
        return t

    def get_tensor(self, name: str, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        return self._expanded(name).to(device, copy=True)

    def rekey(self, names: Mapping[str, str]) -> "AdapterCheckpoint":  # type: ignore[override]
        """Key the adapted tensors by other names (a slice's layers, a prefix alignment): reads still
        expand the base tensor of the old name."""
        self._source = {names[k]: self._source.get(k, k) for k in self.tensors if k in names}
        self.tensors = {names[k]: dataclasses.replace(i, name=names[k]) for k, i in self.tensors.items() if k in names}
        self._cache = (None, None)
        return self

    def read_flat(self, name: str, start: int, end: int) -> torch.Tensor:
        return self._expanded(name).reshape(-1)[start:end].clone()

    def weight_files(self):
        return [ADAPTER_WEIGHTS]

    def close(self) -> None:
        self._cache = (None, None)
        self.base.close()

    def __repr__(self) -> str:
        return f"AdapterCheckpoint({self.name!r}, base={self.base.name!r}, {len(self.deltas)} LoRA tensors)"


def _pattern_key(pattern: Dict[str, Any], module: str) -> str:
    # peft.utils.other.get_pattern_key: a pattern matches the module name's dotted suffix
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def _read_lora_config(path: Path, name: str) -> Any:
    from peft import LoraConfig, PeftConfig  # optional heavy import, only when an adapter is met

    try:
        raw = json.loads((path / ADAPTER_CONFIG).read_text())
    except ValueError as exc:
        raise CheckpointError(f"{name}: {ADAPTER_CONFIG} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{name}: {ADAPTER_CONFIG} is a JSON {type(raw).__name__}, not an object")
    kind = raw.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(f"{name}: peft adapter type {kind!r} is not supported (LoRA only); merge it into its "
                              "base with peft's merge_and_unload() and use that folder")
    cfg = PeftConfig.from_pretrained(str(path))
    if not isinstance(cfg, LoraConfig):
        raise CheckpointError(f"{name}: {ADAPTER_CONFIG} is not a LoraConfig")
    for field_name in _UNSUPPORTED:
        if getattr(cfg, field_name, None) not in (None, False, [], {}):
            raise CheckpointError(f"{name}: adapter_config.{field_name} = {getattr(cfg, field_name)!r} "
                                  "is not supported (LoRA with W + scaling * B @ A only); merge it with peft's "
                                  "merge_and_unload() first")
    if not cfg.base_model_name_or_path:
        raise CheckpointError(f"{name}: {ADAPTER_CONFIG} names no base_model_name_or_path")
    return cfg


def _load_adapter(path: Path, name: str) -> Dict[str, torch.Tensor]:
    """The adapter's tensors, its header checked first as every weight file's is (a truncated or
    corrupt file is refused naming it, not with safetensors' bare error)."""
    read_safetensors_header(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type is not a ValueError
        raise CheckpointError(f"{name}: cannot read {path}: {exc}") from None


def _resolve_base(base: str, name: str, hub_only: bool = False) -> Path:
    if hub_only and (base.startswith((".", "/", "~", "\\")) or os.path.isabs(base) or base.count("/") > 1):
        raise CheckpointError(f"{name}: this adapter came from the Hub; its base_model_name_or_path {base!r} names a "
                              "folder of this machine, which is never read for it: pass the base yourself "
                              "(base_model=, or {id, base} in the models list)")
    if not hub_only and Path(os.path.expanduser(base)).is_dir():
        return Path(os.path.expanduser(base))
    from huggingface_hub import snapshot_download

    try:  # a Hub id: as transformers would find it offline, in the local cache
        return Path(snapshot_download(base, local_files_only=True))
    except Exception:  # noqa: BLE001
        raise CheckpointError(f"{name}: its base model {base!r} is neither a folder nor in the local Hugging Face "
                              "cache; download it first (huggingface-cli download) or point "
                              "base_model_name_or_path at a folder") from None


register_checkpoint_kind(is_adapter, AdapterCheckpoint)
