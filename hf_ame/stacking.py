"""Layer stacking (mergekit's ``passthrough`` slices, "frankenmerges"): output layers copied from
layer ranges of one or more models, tensors renamed by layer index while streaming.

Pure planning on headers and configs: which source tensor (model, name) each output tensor copies,
and the output config (``num_hidden_layers`` and every per-layer list in it, such as Qwen2's and
Gemma's ``layer_types``, rebuilt layer by layer from the sources'). Tensors outside the layers come
from the first slice's model when they precede the layers (embeddings) and from the last slice's
model otherwise (final norm, head), as mergekit takes ``pre_weights`` and ``post_weights``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .algorithm import Pivot
from .checkpoints import Checkpoint
from .config import AMEConfig
from .errors import IncompatibleCheckpointsError
from .methods import resolve_setting
from .plan import MergePlan, Source, TensorPlan
from .writer import plan_shards

__all__ = ["LayerSlice", "stack_names", "stacked_config", "layer_index", "is_pre_layer", "build_stack_plan"]

_LAYER = re.compile(r"^(.*?\.layers\.)(\d+)(\..*)$")
_PRE = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|rotary_emb")


@dataclass(frozen=True)
class LayerSlice:
    """Layers ``[start, end)`` of ingredient ``model`` (an index into the merge's checkpoints); ``scale``:
    mergekit's passthrough ``scale`` (a number, gradient or filter list; None: copied as they are)."""

    model: int
    start: int
    end: int
    scale: Any = None


def layer_index(name: str) -> Optional[Tuple[str, int, str]]:
    """(prefix, index, suffix) of a decoder-layer tensor name (``model.layers.3.mlp.up_proj.weight``)."""
    m = _LAYER.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def is_pre_layer(name: str) -> bool:
    """Whether a tensor outside the layers precedes them (embeddings), as mergekit's ``pre_weights``."""
    return bool(_PRE.search(name))


def stack_names(slices: Sequence[LayerSlice], names: Sequence[Sequence[str]], num_layers: Sequence[int],
                model_names: Sequence[str]) -> List[Tuple[str, int, str, Optional[float]]]:
    """(output name, source model index, source name, scale) for every output tensor, in output order:
    the pre-layer tensors, the layers slice by slice, the post-layer tensors. ``names[k]``: model
    k's tensor names in file order; ``num_layers[k]``: its layer count. The scale is the slice's
    setting on the output name, as mergekit evaluates it: layer i of a slice of L at t = i / (L - 1)
    (1 when L == 1); the pre-layer tensors with the first slice's at t = 0, the post-layer with the last's."""
    for i, s in enumerate(slices):
        if not 0 <= s.start < s.end <= num_layers[s.model]:
            raise IncompatibleCheckpointsError(
                f"slices[{i}].layer_range: [{s.start}, {s.end}] is outside the {num_layers[s.model]} layers of "
                f"{model_names[s.model]!r}")
    first, last = slices[0].model, slices[-1].model
    outside = [n for n in names[first] if layer_index(n) is None]
    out = [(n, first, n, _scale(slices[0], n, 0.0)) for n in outside if _PRE.search(n)]
    o = 0
    for s in slices:
        layer_tensors: Dict[int, List[Tuple[str, str, str]]] = {}
        for n in names[s.model]:
            li = layer_index(n)
            if li is not None and s.start <= li[1] < s.end:
                layer_tensors.setdefault(li[1], []).append(li)
        for src in range(s.start, s.end):
            t = (src - s.start) / (s.end - s.start - 1) if s.end - s.start > 1 else 1.0
            for prefix, _, suffix in layer_tensors.get(src, []):
                name = f"{prefix}{o}{suffix}"
                out.append((name, s.model, f"{prefix}{src}{suffix}", _scale(s, name, t)))
            o += 1
    post = [n for n in names[last] if layer_index(n) is None and not _PRE.search(n)]
    missing = [n for n in post if n not in names[last]]
    if missing:  # pragma: no cover - post names come from the last model itself
        raise IncompatibleCheckpointsError(f"{model_names[last]!r} lacks {missing[0]!r}")
    out += [(n, last, n, _scale(slices[-1], n, 0.0)) for n in post]
    return out


def _scale(s: LayerSlice, name: str, t: float) -> Optional[float]:
    value = resolve_setting(s.scale, name, t) if s.scale is not None else None
    return None if value is None else float(value)


def stacked_config(configs: Sequence[Mapping[str, Any]], slices: Sequence[LayerSlice]) -> Dict[str, Any]:
    """The first slice's model config with ``num_hidden_layers`` = the layers stacked and every list
    that had one entry per layer rebuilt from the sources' entries for the layers taken."""
    out = dict(configs[slices[0].model])
    total = sum(s.end - s.start for s in slices)
    n0 = configs[slices[0].model].get("num_hidden_layers")
    for key, value in list(out.items()):
        if isinstance(value, list) and isinstance(n0, int) and len(value) == n0:
            rebuilt = []
            for s in slices:
                src = configs[s.model].get(key)
                if not (isinstance(src, list) and len(src) == configs[s.model].get("num_hidden_layers")):
                    raise IncompatibleCheckpointsError(f"config {key!r}: a per-layer list missing in a source model")
                rebuilt += src[s.start:s.end]
            out[key] = rebuilt
    out["num_hidden_layers"] = total
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def build_stack_plan(ckpts: Sequence[Checkpoint], entries: Sequence[Tuple[str, int, str, Optional[float]]],
                     output_dir: Path, *, out_dtype: Optional[torch.dtype], model_dtype: torch.dtype,
                     max_shard_size: Any = "5GB", prefetch: bool = True) -> MergePlan:
    """The plan of a layer stacking: ``entries`` are (output name, checkpoint index, source name, scale)
    (:func:`hf_ame.stacking.stack_names`); every tensor is one copy, read whole (and scaled)."""
    scales = {out: scale for out, _, _, scale in entries}
    infos = [(out, ckpts[k].tensors[src], k, src) for out, k, src, _ in entries]
    target = [(out, out_dtype if (out_dtype is not None and i.is_floating) else i.dtype, i.shape)
              for out, i, _, _ in infos]
    shards = plan_shards(target, max_shard_size)
    tensors = []
    for (out, info, k, src), (_, dtype, _) in zip(infos, target):
        write = info.numel * dtype.itemsize
        source = Source(ckpts[k].name, info.file, info.offset, _dtype_name(info.dtype), info.nbytes)
        tensors.append(TensorPlan(out, tuple(info.shape), _dtype_name(dtype), "copy", "tensors", "cpu",
                                  shards.entries[out].shard, 0, [source], info.nbytes, write, info.nbytes + write,
                                  source_names=[src], source_models=[k],
                                  scale=scales[out] if info.is_floating else None))
    return MergePlan(Path(output_dir), [c.name for c in ckpts], None, AMEConfig.soup(), Pivot("index", 0), [], False,
                     "tensor", None, prefetch, _dtype_name(out_dtype or model_dtype), shards, tensors, [],
                     [0] * len(shards.files))
