"""Merges by layer slices (mergekit's ``slices`` with a merge method): each output slice merges layer
ranges of its own sources, and the slices are stacked.

Slice k merges, with the method, layer ``start_j + i`` of each of its sources j into output layer
``o_k + i``; the embeddings are merged by the first slice's sources and the final norm and head by
the last slice's, as mergekit 0.1.5 plans them. Within a slice a layer's position (mergekit's t for
parameter gradients) is i / (length - 1), 1 for a one-layer slice, 0 outside the layers.

Each source is seen through a *view*: its checkpoint keyed with the slice's layers renumbered from
0 (and the embeddings or head where the slice takes them), its config cut to those layers. Each
slice is an ordinary streamed merge of views into a temporary folder; the slices are then stacked
into the output (:func:`~hf_ame.engine.stack_checkpoints`), which stages and moves it into place.
Every slice is planned, from headers, before any weight is read.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from .checkpoints import Checkpoint
from .config import AMEConfig
from .engine import merge_checkpoints, plan_merge, stack_checkpoints
from .errors import IncompatibleCheckpointsError
from .output import check_output_dir
from .executor import MergeReport
from .plan import MergePlan
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


def _slice_args(sl: MergeSlice, views: Sequence[Checkpoint], config: AMEConfig):
    base = views[sl.base] if sl.base is not None else None
    ingredients = [v for j, v in enumerate(views) if j != sl.base]
    cfg = config.replace(method_kwargs=dict(sl.method_kwargs), **({"pivot": "base"} if base is not None else {}))
    return ingredients, base, cfg


def _layer_config(folder: Path, view: Checkpoint) -> None:
    """The sub-merge's config.json with the view's layer count and per-layer lists (the rest, such as
    the dtype the merge wrote, kept)."""
    path = folder / "config.json"
    written = json.loads(path.read_text())
    written.update({k: v for k, v in view.config.items()
                    if k == "num_hidden_layers" or (isinstance(v, list) and written.get(k) != v)})
    path.write_text(json.dumps(written, indent=2) + "\n")


def _whole(slices: Sequence[MergeSlice], heads: Sequence[Checkpoint]) -> bool:
    """One slice taking every layer of each source: the plain merge (mergekit's models form)."""
    return len(slices) == 1 and all(s.start == 0 and s.end == heads[s.model].config.get("num_hidden_layers")
                                    for s in slices[0].sources)


def merge_slices(open_model: Callable[[int], Checkpoint], n_models: int, slices: Sequence[MergeSlice],
                 output_dir: Union[str, Path], config: AMEConfig, *, dtype: Union[str, torch.dtype, None] = None,
                 max_shard_size: Union[int, str] = "5GB", overwrite: bool = False, progress: bool = True,
                 extra_files: Optional[Mapping[str, Union[str, bytes]]] = None,
                 dry_run: bool = False) -> Union[MergeReport, List[MergePlan]]:
    """Merge ``slices`` with ``config``'s method and stack them into ``output_dir``.

    ``open_model(i)`` opens model i (a fresh :class:`Checkpoint` per call: each view re-keys its
    own). Every slice is checked and planned from headers first; ``dry_run`` returns those plans
    (one per slice, its layers numbered from 0) and reads no weight. One slice over every layer
    of its sources is merged straight into ``output_dir``."""
    t0 = time.perf_counter()
    heads = [open_model(i) for i in range(n_models)]
    check_output_dir(output_dir, overwrite, [c.path for c in heads])
    _check_slices(slices, heads)
    whole = _whole(slices, heads)
    views = _views(slices, open_model)  # headers only; reused by the plans and the merges (close() keeps them usable)
    with tempfile.TemporaryDirectory(prefix="hf_ame-slices-") as tmp:
        plans = []
        for k, (sl, vs) in enumerate(zip(slices, views)):
            ingredients, base, cfg = _slice_args(sl, vs, config)
            plans.append(plan_merge(ingredients, output_dir if whole else Path(tmp) / f"slice{k}", cfg, base=base,
                                    dtype=dtype, min_ingredients=1, overwrite=overwrite))
        if dry_run:
            return plans
        if whole:
            ingredients, base, cfg = _slice_args(slices[0], views[0], config)
            return merge_checkpoints(ingredients, output_dir, cfg, base=base, dtype=dtype, progress=progress,
                                     max_shard_size=max_shard_size, overwrite=overwrite, min_ingredients=1,
                                     extra_files=extra_files)
        for k, (sl, vs) in enumerate(zip(slices, views)):
            ingredients, base, cfg = _slice_args(sl, vs, config)
            out = Path(tmp) / f"slice{k}"
            merge_checkpoints(ingredients, out, cfg, base=base, dtype=dtype, progress=progress, min_ingredients=1)
            _layer_config(out, vs[0])
        stacked = [LayerSlice(k, 0, sl.length) for k, sl in enumerate(slices)]
        report = stack_checkpoints([Path(tmp) / f"slice{k}" for k in range(len(slices))], stacked, output_dir,
                                   dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                                   progress=progress, extra_files=extra_files)
    report.seconds = time.perf_counter() - t0
    return report
