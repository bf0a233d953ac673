"""Merges by layer slices (mergekit's ``slices`` with a merge method): each output slice merges layer
ranges of its own sources, and the slices are stacked.

Slice k merges, with the method, layer ``start_j + i`` of each of its sources j into output layer
``o_k + i``; the embeddings are merged by the first slice's sources and the final norm and head by
the last slice's, as mergekit 0.1.5 plans them. Within a slice a layer's position (mergekit's t for
parameter gradients) is i / (length - 1), 1 for a one-layer slice, 0 outside the layers.

Each source is seen through a *view*: its checkpoint keyed with the slice's layers renumbered from
0 (and the embeddings or head where the slice takes them), its config cut to those layers. Each
slice is an ordinary streamed merge of views (:class:`~hf_ame.engine.MergePart`), its tensors
renamed to their output layers as they are written; every slice is planned, from headers, before
any weight is read, and all of them are written into one staged output
(:func:`~hf_ame.engine.merge_parts`): each tensor once, no temporary copy of the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from .checkpoints import Checkpoint
from .config import AMEConfig
from .engine import MergePart, merge_parts
from .errors import IncompatibleCheckpointsError
from .executor import MergeReport
from .output import check_output_dir
from .plan import MergePlan
from .rows import RowAlignment
from .stacking import LayerSlice, is_pre_layer, layer_index, stacked_config

__all__ = ["SliceSource", "MergeSlice", "slice_view", "merge_slices"]


@dataclass(frozen=True)
class SliceSource:
    """Layers ``[start, end)`` of model ``model`` (an index into the merge's models)."""

    model: int
    start: int
    end: int


@dataclass
class MergeSlice:
    """One output slice: its ``sources`` (equal lengths), which of them is the base (an index into
    ``sources``, or None) and the method's parameters for it (per-source lists over the other sources)."""

    sources: List[SliceSource]
    base: Optional[int] = None
    method_kwargs: Dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.sources[0].end - self.sources[0].start


def slice_view(ckpt: Checkpoint, start: int, end: int, *, pre: bool, post: bool) -> Checkpoint:
    """``ckpt`` keyed as a model of layers ``[start, end)`` renumbered from 0, plus its embeddings
    (``pre``) and final norm / head (``post``); its config cut to those layers. Changes ``ckpt``."""
    names: Dict[str, str] = {}
    for name in ckpt.tensors:
        li = layer_index(name)
        if li is None:
            if (pre and is_pre_layer(name)) or (post and not is_pre_layer(name)):
                names[name] = name
        elif start <= li[1] < end:
            names[name] = f"{li[0]}{li[1] - start}{li[2]}"
    ckpt.rekey(names)
    ckpt.config = stacked_config([ckpt.config], [LayerSlice(0, start, end)])
    return ckpt


def _check_slices(slices: Sequence[MergeSlice], ckpts: Sequence[Checkpoint]) -> None:
    for k, sl in enumerate(slices):
        for j, s in enumerate(sl.sources):
            layers = ckpts[s.model].config.get("num_hidden_layers")
            if not isinstance(layers, int) or not 0 <= s.start < s.end <= layers:
                raise IncompatibleCheckpointsError(
                    f"slices[{k}].sources[{j}].layer_range: [{s.start}, {s.end}] is outside the {layers} layers of "
                    f"{ckpts[s.model].name!r}")
            if s.end - s.start != sl.length:
                raise IncompatibleCheckpointsError(
                    f"slices[{k}].sources[{j}].layer_range: every source of a slice takes the same number of layers "
                    f"({sl.length} in sources[0], {s.end - s.start} here)")


def _views(slices: Sequence[MergeSlice], open_model: Callable[[int], Checkpoint]) -> List[List[Checkpoint]]:
    last = len(slices) - 1
    return [[slice_view(open_model(s.model), s.start, s.end, pre=k == 0, post=k == last) for s in sl.sources]
            for k, sl in enumerate(slices)]


def _part(sl: MergeSlice, views: Sequence[Checkpoint], config: AMEConfig, offset: int) -> MergePart:
    """The slice as one part of the output: its views (the base apart), config and layer renaming."""
    base = views[sl.base] if sl.base is not None else None
    ingredients = [v for j, v in enumerate(views) if j != sl.base]
    cfg = config.replace(method_kwargs=dict(sl.method_kwargs), **({"pivot": "base"} if base is not None else {}))
    return MergePart(ingredients, base, cfg, lambda name: _shifted(name, offset))


def _shifted(name: str, offset: int) -> str:
    li = layer_index(name)
    return name if li is None else f"{li[0]}{li[1] + offset}{li[2]}"


def _layer_changes(slices: Sequence[MergeSlice], parts: Sequence[MergePart]) -> Dict[str, Any]:
    """The output config's layer count and per-layer lists (each part's first ingredient's, cut to its layers)."""
    stacked = stacked_config([p.ingredients[0].config for p in parts],
                             [LayerSlice(k, 0, sl.length) for k, sl in enumerate(slices)])
    return {k: v for k, v in stacked.items() if k == "num_hidden_layers" or isinstance(v, list)}


def _notes(slices: Sequence[MergeSlice], parts: Sequence[MergePart], names: Sequence[str]) -> List[str]:
    out, o = [], 0
    for k, (sl, p) in enumerate(zip(slices, parts)):
        src = ", ".join(f"{names[s.model]} [{s.start}, {s.end})" for s in sl.sources)
        out.append(f"slice {k + 1} of {len(slices)}: output layers [{o}, {o + sl.length}) merge {src}"
                   + (f" (base {p.base.name})" if p.base is not None else ""))
        o += sl.length
    return out


def merge_slices(open_model: Callable[[int], Checkpoint], n_models: int, slices: Sequence[MergeSlice],
                 output_dir: Union[str, Path], config: AMEConfig, *, dtype: Union[str, torch.dtype, None] = None,
                 max_shard_size: Union[int, str] = "5GB", overwrite: bool = False, progress: bool = True,
                 extra_files: Optional[Mapping[str, Union[str, bytes]]] = None, rows: Optional[RowAlignment] = None,
                 dry_run: bool = False) -> Union[MergeReport, MergePlan]:
    """Merge ``slices`` with ``config``'s method and stack them into ``output_dir``.

    ``open_model(i)`` opens model i (a fresh :class:`Checkpoint` per call: each view re-keys its
    own). Every slice is checked and planned from headers first (``dry_run`` returns that plan, one
    for all slices, and reads no weight); then each slice's tensors are merged and written, under
    their output layer numbers, straight into the staged output: each tensor is written once.
    ``rows``: embedding / head rows matched by token (a mergekit ``tokenizer_source``), merged by
    the slice that holds them."""
    heads = [open_model(i) for i in range(n_models)]
    check_output_dir(output_dir, overwrite, [c.path for c in heads])
    _check_slices(slices, heads)
    for c in heads:
        c.close()
    views = _views(slices, open_model)  # headers only
    offsets = [sum(sl.length for sl in slices[:k]) for k in range(len(slices))]
    parts = [_part(sl, vs, config, o) for sl, vs, o in zip(slices, views, offsets)]
    out = merge_parts(parts, output_dir, config_changes=_layer_changes(slices, parts),
                      dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
                      extra_files=extra_files, rows=rows, dry_run=dry_run)
    if isinstance(out, MergePlan):
        out.notes.extend(_notes(slices, parts, [c.name for c in heads]))
    return out
