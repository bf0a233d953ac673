"""Checkpoints saved in another layout of the same model, aligned as transformers aligns them.

transformers 5 converts some architectures' weights on load (MoE experts stored one tensor per
expert in the files, fused into one tensor per layer in memory; renamed modules) and writes the
original layout back by default; ``save_pretrained(save_original_format=False)`` writes the
in-memory one. Both load into the same model. Here a checkpoint in the in-memory layout is read in
the original (default) layout through transformers' own reverse conversion
(``revert_weight_conversion`` on an empty-weight skeleton): names and shapes from meta tensors
before anything is read, each fused tensor converted when it is read. No table of ours.

The other direction (:func:`in_memory_layout`) reads a checkpoint as transformers holds it in memory
(fused experts, renamed modules): mergekit's view under transformers 5, which its configs are merged
in, so a method that trims or normalises over a whole tensor sees the fused one as mergekit does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .checkpoints import Checkpoint, TensorInfo
from .errors import CheckpointError

__all__ = ["original_layout", "in_memory_layout", "ConvertedCheckpoint", "Layout", "LAYOUTS"]

LAYOUTS = ("original", "in_memory")  # the layout a merge reads its ingredients in


def revert(model: Any, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` (in-memory names) in the original layout, by transformers' reverse conversion."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, state)


def _load_transforms(model: Any) -> Tuple[list, list, frozenset]:
    """The renamings and converters transformers' ``from_pretrained`` applies to ``model``'s files
    (without legacy renamings and prefix changes, as its reverse conversion), and the names the model
    holds; found once per skeleton (every fused tensor read asks again)."""
    cached = getattr(model, "_hf_ame_load_transforms", None)
    if cached is not None:
        return cached
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

    transforms = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]
    cached = ([t for t in transforms if isinstance(t, WeightRenaming)],
              [t for t in transforms if isinstance(t, WeightConverter)], frozenset(model.state_dict()))
    model._hf_ame_load_transforms = cached  # converters are copied before use (convert), never changed here
    return cached


def _forward_groups(model: Any, names: Sequence[str]) -> Dict[str, List[str]]:
    """{first in-memory name: the file names converted together into it}, as transformers'
    ``convert_and_load_state_dict_in_model`` groups them. A name the model already holds, or one whose
    conversion the model does not hold, stays as it is (never converted twice)."""
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    renamings, converters, in_memory = _load_transforms(model)
    groups: Dict[str, List[str]] = {}
    for name in sorted(names, key=dot_natural_key):
        target = name
        if name not in in_memory:
            renamed, _ = rename_source_key(name, renamings, converters)
            target = renamed if renamed in in_memory else name
        groups.setdefault(target, []).append(name)
    return groups


def convert(model: Any, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` (file names) in the in-memory layout, by transformers' load-time conversion."""
    from copy import deepcopy

    from transformers.core_model_loading import WeightRenaming, rename_source_key

    renamings, converters, _ = _load_transforms(model)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    out: Dict[str, torch.Tensor] = {}
    for target, names in _forward_groups(model, list(state)).items():
        if names == [target]:
            out[target] = state[target]
            continue
        transform = None
        for name in names:
            renamed, pattern = rename_source_key(name, renamings, converters)
            if transform is None:
                transform = deepcopy(by_pattern[pattern]) if pattern is not None else WeightRenaming(name, renamed)
            transform.add_tensor(renamed, name, pattern if pattern is not None else name, state[name])
        for k, v in transform.convert(target, model=model, config=model.config).items():
            out[k] = v[0] if isinstance(v, list) else v
    return out


Conversion = Callable[[Any, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Layout:
    """A checkpoint seen in another layout: ``entries`` {merge name: (its source tensors in the
    file, its info)}, and the ``conversion`` (:func:`revert` or :func:`convert`) that makes them."""

    entries: Dict[str, Tuple[Tuple[str, ...], TensorInfo]]
    conversion: Conversion


def _layout(model: Any, tensors: Mapping[str, TensorInfo], groups: Sequence[List[str]],
            conversion: Conversion) -> Optional[Layout]:
    """Each group of file names converted together on meta tensors (names and shapes, nothing read);
    a group the conversion cannot take is kept as it is. None when nothing changes."""
    grouped = {n for names in groups for n in names}
    out = {n: ((n,), tensors[n]) for n in tensors if n not in grouped}
    changed = False
    for names in groups:
        meta = {n: torch.empty(tensors[n].shape, dtype=tensors[n].dtype, device="meta") for n in names}
        try:
            got = conversion(model, meta)
        except Exception:  # noqa: BLE001 - a group the conversion cannot take: keep it as it is
            got = meta
        if set(got) != set(names) or any(tuple(got[n].shape) != tuple(tensors[n].shape) for n in names):
            changed = True
        for new, t in got.items():
            same = new in names and tuple(t.shape) == tuple(tensors[new].shape)
            base = tensors[new] if same else tensors[names[0]]
            out[new] = ((new,) if same else tuple(names),
                        dataclasses.replace(base, name=new, shape=tuple(t.shape), dtype=t.dtype,
                                            offset=base.offset if same else -1,
                                            stored_name=base.stored_name if same else None))
    return Layout(out, conversion) if changed else None


def original_layout(model: Any, tensors: Mapping[str, TensorInfo]) -> Optional[Layout]:
    """{name in the original layout: (its source tensors in the file, its info)} for a checkpoint
    saved (wholly or in part) in the in-memory layout of ``model`` (an empty-weight skeleton); None
    when its names are already the original ones. Only tensors named as the skeleton names them are
    converted (a name of the original layout is never converted twice), one module at a time (pieces
    that the original layout fuses, or splits, are converted together). Computed on meta tensors."""
    in_memory = set(model.state_dict())
    groups: Dict[str, List[str]] = {}
    for name in tensors:
        if name in in_memory:
            groups.setdefault(name.rsplit(".", 2)[0], []).append(name)
    return _layout(model, tensors, list(groups.values()), revert)


def in_memory_layout(model: Any, tensors: Mapping[str, TensorInfo]) -> Optional[Layout]:
    """{name in ``model``'s in-memory layout: (its source tensors in the file, its info)}: the
    checkpoint as transformers' ``from_pretrained`` holds it (each layer's experts one fused tensor,
    renamed modules); None when that is how it is saved. Names the model already holds stay."""
    groups = [names for target, names in _forward_groups(model, list(tensors)).items() if names != [target]]
    return _layout(model, tensors, groups, convert)


class ConvertedCheckpoint(Checkpoint):
    """``inner`` read in another layout (from :func:`original_layout` or :func:`in_memory_layout`): each
    group of source tensors is converted when first asked for and its outputs kept until another is
    asked for (one fused tensor, e.g. one layer's experts, in memory at a time). Never streamed in
    byte blocks."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "ConvertedCheckpoint":
        return object.__new__(cls)

    def __init__(self, inner: Checkpoint, model: Any, layout: Layout):  # noqa: D107
        self.inner, self.model, self.conversion = inner, model, layout.conversion
        self.path, self.files_path, self.name, self.config = inner.path, inner.files_path, inner.name, inner.config
        self.weight_file, self.format = inner.weight_file, "converted"
        self.sources = {k: src for k, (src, _) in layout.entries.items()}  # merge name -> its source tensors
        self.converted = {k: k for k in layout.entries}  # merge name -> its name in the converted layout
        self.tensors = {k: info for k, (_, info) in layout.entries.items()}
        self._bin_state, self._fds = {}, {}
        self._cache: Tuple[Optional[Tuple[str, ...]], Dict[str, torch.Tensor]] = (None, {})

    @property
    def bytes_read(self) -> int:  # type: ignore[override]
        return self.inner.bytes_read

    @bytes_read.setter
    def bytes_read(self, value: int) -> None:
        pass

    def get_tensor(self, name: str, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        src = self.sources.get(name)
        if src is None:
            raise CheckpointError(f"{self.name}: has no tensor {name!r}")
        want = self.converted[name]
        if self._cache[0] != src:
            self._cache = (None, {})
            if src == (want,):
                self._cache = (src, {want: self.inner.get_tensor(want)})
            else:  # the module's tensors converted together (one module in memory at a time)
                self._cache = (src, self.conversion(self.model, {s: self.inner.get_tensor(s) for s in src}))
        t = self._cache[1].get(want)
        if t is None:
            raise CheckpointError(f"{self.name}: converting {src!r} gave no tensor {name!r}")
        return t.to(device, copy=True)

    def read_flat(self, name: str, start: int, end: int) -> torch.Tensor:
        return self.get_tensor(name).reshape(-1)[start:end].clone()

    def rekey(self, names: Mapping[str, str]) -> "ConvertedCheckpoint":
        self.sources = {names[k]: s for k, s in self.sources.items() if k in names}
        self.converted = {names[k]: c for k, c in self.converted.items() if k in names}
        self.tensors = {names[k]: dataclasses.replace(i, name=names[k]) for k, i in self.tensors.items() if k in names}
        return self

    def close(self) -> None:
        self._cache = (None, {})
        self.inner.close()
