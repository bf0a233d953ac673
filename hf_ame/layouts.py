"""Checkpoints saved in another layout of the same model, aligned as transformers aligns them.

transformers 5 converts some architectures' weights on load (MoE experts stored one tensor per
expert in the files, fused into one tensor per layer in memory; renamed modules) and writes the
original layout back by default; ``save_pretrained(save_original_format=False)`` writes the
in-memory one. Both load into the same model. Here a checkpoint in the in-memory layout is read in
the original (default) layout through transformers' own reverse conversion
(``revert_weight_conversion`` on an empty-weight skeleton): names and shapes from meta tensors
before anything is read, each fused tensor converted when it is read. No table of ours.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .checkpoints import Checkpoint, TensorInfo
from .errors import CheckpointError

__all__ = ["original_layout", "ConvertedCheckpoint"]


def _revert(model: Any, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, state)


def original_layout(model: Any, tensors: Mapping[str, TensorInfo]) -> Optional[Dict[str, Tuple[Tuple[str, ...], TensorInfo]]]:
    """{name in the original layout: (its source tensors in the file, its info)} for a checkpoint
    saved (wholly or in part) in the in-memory layout of ``model`` (an empty-weight skeleton); None
    when its names are already the original ones. Only tensors named as the skeleton names them are
    converted (a name of the original layout is never converted twice), one module at a time (pieces
    that the original layout fuses, or splits, are converted together). Computed on meta tensors."""
    in_memory = set(model.state_dict())
    out: Dict[str, Tuple[Tuple[str, ...], TensorInfo]] = {}
    groups: Dict[str, List[str]] = {}
    for name in tensors:
        if name in in_memory:
            groups.setdefault(name.rsplit(".", 2)[0], []).append(name)
        else:
            out[name] = ((name,), tensors[name])
    changed = False
    for names in groups.values():
        meta = {n: torch.empty(tensors[n].shape, dtype=tensors[n].dtype, device="meta") for n in names}
        try:
            got = _revert(model, meta)
        except Exception:  # noqa: BLE001 - a group the reverse conversion cannot take: keep it as it is
            got = meta
        if set(got) != set(names) or any(tuple(got[n].shape) != tuple(tensors[n].shape) for n in names):
            changed = True
        info = tensors[names[0]]
        for new, t in got.items():
            src = (new,) if (new in tensors and new in names and tuple(t.shape) == tuple(tensors[new].shape)) else tuple(names)
            base = tensors[new] if src == (new,) else info
            out[new] = (src, dataclasses.replace(base, name=new, shape=tuple(t.shape), dtype=t.dtype,
                                                 offset=base.offset if src == (new,) else -1,
                                                 stored_name=base.stored_name if src == (new,) else None))
    return out if changed else None


class ConvertedCheckpoint(Checkpoint):
    """``inner`` read in the original layout (see :func:`original_layout`): each source tensor is
    converted when first asked for and its outputs kept until another is asked for (one fused
    tensor, e.g. one layer's experts, in memory at a time). Never streamed in byte blocks."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "ConvertedCheckpoint":
        return object.__new__(cls)

    def __init__(self, inner: Checkpoint, model: Any, layout: Mapping[str, Tuple[str, TensorInfo]]):  # noqa: D107
        self.inner, self.model = inner, model
        self.path, self.files_path, self.name, self.config = inner.path, inner.files_path, inner.name, inner.config
        self.weight_file, self.format = inner.weight_file, "converted"
        self.sources = {k: src for k, (src, _) in layout.items()}  # merge name -> its source tensors in the file
        self.converted = {k: k for k in layout}  # merge name -> its name in the original layout
        self.tensors = {k: info for k, (_, info) in layout.items()}
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
                self._cache = (src, _revert(self.model, {s: self.inner.get_tensor(s) for s in src}))
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
