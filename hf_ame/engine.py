"""Merge checkpoint folders: open and check them, plan (:mod:`hf_ame.plan`), execute
(:mod:`hf_ame.executor`) into a staged output folder, finish it (config, tokenizer, extra files).

How the ingredients of one tensor are held is the plan's choice (see :func:`hf_ame.plan.build_plan`):

- on CPU with a coordinate-wise optimizer and safetensors inputs ("ingredient" stream, the default
  there): one block of ~2**18 coordinates of every ingredient is read (``os.preadv``) and taken
  through every step of every epoch: each input byte is read once, memory is a few MiB of slices
  + one block's optimizer state + the output tensor, whatever N and the model size;
- "tensor" stream: the N memory-mapped copies of a tensor, merged in cache blocks on CPU, whole on
  a GPU;
- "ingredient" stream otherwise (GPU, .bin inputs, optimizers that need whole tensors): one
  ingredient's copy of a tensor at a time, the next one prefetched.
Never a whole model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

import torch

from .algorithm import resolve_pivot
from .blocks import DEFAULT_BLOCK_SIZE
from .checkpoints import Checkpoint, TensorInfo
from .checks import check_compatible, model_dtype
from .config import AMEConfig, ConfigError, parse_dtype
from .devices import DeviceMap, device_lookup
from .errors import IncompatibleCheckpointsError
from .executor import MergeReport, run_parts, run_plan
from .limits import check_config_limits
from .methods import check_counts, get_method
from .output import check_output_dir, finish_output, staged_output
from .plan import STREAM_MODES, MergePlan, build_plan, combine_plans
from .quantization import FP8Checkpoint, check_quantization
from .ranks import Ranks
from .rows import RowAlignment
from .stacking import LayerSlice, build_stack_plan, stack_names, stacked_config
from .writer import ShardedWriter, parse_size, plan_shards

__all__ = ["MergeReport", "MergePart", "merge_checkpoints", "merge_parts", "plan_merge", "stack_checkpoints",
           "open_checkpoints", "save_state"]


def open_checkpoints(items: Sequence[Union[Checkpoint, str, Path]]) -> List[Checkpoint]:
    """Checkpoint objects for folders (or pass through ones already open)."""
    return [c if isinstance(c, Checkpoint) else Checkpoint(c) for c in items]


@dataclass
class _Opened:
    """A merge's checked inputs: what :func:`plan_merge` and :func:`merge_checkpoints` share."""

    ckpts: List[Checkpoint]
    base: Optional[Checkpoint]
    config: AMEConfig
    out_dtype: Optional[torch.dtype]
    inputs: List[Path]
    rows: Optional[RowAlignment] = None


@dataclass(frozen=True)
class _PlanOptions:
    """How a merge's opened inputs are planned: the arguments of :func:`plan_merge`,
    :func:`merge_checkpoints` and :func:`merge_parts` that :func:`_plan` takes."""

    device_map: DeviceMap
    max_shard_size: Union[int, str]
    stream: str
    memory_budget: Optional[int]
    block_size: Optional[int]
    prefetch: bool
    reference: int
    extra_files: Optional[Mapping[str, Union[str, bytes]]]


def _validate_args(stream: str, block_size: Optional[int], max_shard_size: Union[int, str]) -> None:
    parse_size(max_shard_size)
    if stream not in STREAM_MODES:
        raise ValueError(f"stream: expected one of {', '.join(STREAM_MODES)}, got {stream!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 64):
        raise ValueError(f"block_size: expected a number of elements >= 64 (or None for whole tensors), "
                         f"got {block_size!r}")


def _check_rows(rows: RowAlignment, ckpts: Sequence[Checkpoint], base: Optional[Checkpoint]) -> None:
    """Every source of a row-matched tensor is in its map, and the map stays inside its rows (a base
    may lack the tensor: a headless body has no head; those rows merge without it)."""
    for name, axis in rows.tensors.items():
        m = rows.maps[axis]
        for c in list(ckpts) + ([base] if base is not None and name in base.tensors else []):
            idx = m.sources.get(c.name)
            if idx is None:
                raise IncompatibleCheckpointsError(f"model {c.name!r} is not in the {axis} row map of tensor {name!r}")
            have = c.tensors[name].shape[0]
            if max(idx, default=-1) >= have:
                raise IncompatibleCheckpointsError(
                    f"tensor {name!r} has {have} rows in model {c.name!r}, but its {axis} puts "
                    f"{m.keys[idx.index(max(idx))]!r} at row {max(idx)}")


def _name_of(ckpt: Union[Checkpoint, str, Path]) -> str:
    return ckpt.name if isinstance(ckpt, Checkpoint) else str(ckpt)


def _open_and_check(ingredients, output_dir, config, base, dtype, overwrite, min_ingredients, reference,
                    rows=None) -> _Opened:
    """Open and check everything a merge reads, from headers only; refuse a bad output folder first."""
    config = (config or AMEConfig()).validate()
    check_config_limits(config, len(ingredients))
    out_dtype = parse_dtype(dtype, "dtype")
    ckpts = open_checkpoints(ingredients)
    for c in ckpts:
        check_quantization(c.name, c.config, getattr(c, "raw_tensors", c.tensors))
    if out_dtype is None and any(isinstance(c, FP8Checkpoint) for c in ckpts):
        out_dtype = torch.bfloat16  # dequantized FP8: written in bfloat16 unless dtype= says otherwise
    inputs = [c.path for c in ckpts] + ([Path(base.path if isinstance(base, Checkpoint) else base)] if base else [])
    check_output_dir(output_dir, overwrite, inputs)  # before reading anything big
    names = [c.name for c in ckpts]
    base_ckpt: Optional[Checkpoint] = None
    if resolve_pivot(config.pivot, len(ckpts), names).is_base:
        if base is None:
            if not Path(str(config.pivot)).is_dir():
                raise ConfigError(
                    f"pivot: {config.pivot!r} is neither 'soup', 'first', an ingredient index or name "
                    f"({', '.join(names)}) nor a checkpoint folder"
                )
            base = config.pivot  # type: ignore[assignment]
        base_ckpt = base if isinstance(base, Checkpoint) else Checkpoint(base, name=str(base))
    elif base is not None and rows is not None and any(_name_of(base) in m.sources for m in rows.maps.values()):
        base_ckpt = base if isinstance(base, Checkpoint) else Checkpoint(base, name=str(base))  # rows taken from it
    if config.method is not None:  # a method's model count and base (slerp: one model and the base)
        pivot_base = resolve_pivot(config.pivot, len(ckpts), names).is_base
        check_counts(config.method, config.method_arguments(), len(ckpts), pivot_base and base_ckpt is not None)
        min_ingredients = min(min_ingredients, get_method(config.method).models[0])
    check_compatible(ckpts, base_ckpt, min_ingredients=min_ingredients, varying_rows=rows.tensors if rows else ())
    if rows is not None:
        _check_rows(rows, ckpts, base_ckpt)
    if not 0 <= reference < len(ckpts):
        raise ValueError(f"reference: index {reference} out of range for {len(ckpts)} ingredients")
    return _Opened(ckpts, base_ckpt, config, out_dtype, inputs, rows)


def _plan(o: _Opened, output_dir, opts: _PlanOptions, ranks: Optional[Ranks]) -> MergePlan:
    where = device_lookup(opts.device_map)
    local = ranks.local_device() if ranks is not None else None
    if local is not None:
        where = lambda name: local  # noqa: E731 - one GPU per rank
    return build_plan(o.ckpts, o.config, Path(output_dir),
                      pivot=resolve_pivot(o.config.pivot, len(o.ckpts), [c.name for c in o.ckpts]), base=o.base,
                      out_dtype=o.out_dtype, model_dtype=model_dtype(o.ckpts[opts.reference]),
                      max_shard_size=opts.max_shard_size, where=where, stream=opts.stream,
                      memory_budget=opts.memory_budget, block_size=opts.block_size, prefetch=opts.prefetch,
                      reference=opts.reference,
                      rank=ranks.rank if ranks is not None else 0, world_size=ranks.world if ranks is not None else 1,
                      extra_files=list(opts.extra_files or {}), rows=o.rows)


def plan_merge(
    ingredients: Sequence[Union[Checkpoint, str, Path]],
    output_dir: Union[str, Path],
    config: Optional[AMEConfig] = None,
    *,
    base: Optional[Union[Checkpoint, str, Path]] = None,
    dtype: Union[str, torch.dtype, None] = None,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
    device_map: DeviceMap = None,
    prefetch: bool = True,
    reference: int = 0,
    min_ingredients: int = 2,
    stream: str = "auto",
    memory_budget: Optional[int] = None,
    block_size: Optional[int] = DEFAULT_BLOCK_SIZE,
    rows: Optional[RowAlignment] = None,
) -> MergePlan:
    """The :class:`~hf_ame.plan.MergePlan` that :func:`merge_checkpoints` would run with the same
    arguments, from configs and headers alone: no tensor byte is read and nothing is written
    (the output folder is checked as the merge would check it)."""
    _validate_args(stream, block_size, max_shard_size)
    o = _open_and_check(ingredients, output_dir, config, base, dtype, overwrite, min_ingredients, reference, rows)
    try:
        return _plan(o, output_dir, _PlanOptions(device_map, max_shard_size, stream, memory_budget, block_size,
                                                 prefetch, reference, None), None)
    finally:
        for c in o.ckpts + ([o.base] if o.base is not None else []):
            c.close()


def merge_checkpoints(
    ingredients: Sequence[Union[Checkpoint, str, Path]],
    output_dir: Union[str, Path],
    config: Optional[AMEConfig] = None,
    *,
    base: Optional[Union[Checkpoint, str, Path]] = None,
    dtype: Union[str, torch.dtype, None] = None,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    device_map: DeviceMap = None,
    prefetch: bool = True,
    reference: int = 0,
    extra_files: Optional[Mapping[str, Union[str, bytes]]] = None,
    min_ingredients: int = 2,
    stream: str = "auto",
    memory_budget: Optional[int] = None,
    distributed: Optional[bool] = None,
    block_size: Optional[int] = DEFAULT_BLOCK_SIZE,
    tokenizer_from: Union[str, Path, None] = None,
    rows: Optional[RowAlignment] = None,
) -> MergeReport:
    """Merge checkpoint folders with AME into ``output_dir`` (sharded safetensors + index).

    Args:
        ingredients: folders (or open :class:`Checkpoint`) in merge order (the order AME steps in).
        output_dir: destination; refused if it exists and is not empty unless ``overwrite``.
        config: the AME hyperparameters; default :class:`AMEConfig` ().
        base: a base checkpoint used as pivot when ``config.pivot`` names one (else opened from
            ``config.pivot`` when that is a folder).
        dtype: output dtype of floating tensors; default: the ingredients' own.
        max_shard_size: bytes per output shard (int) or a size string; default "5GB".
        device_map: where each tensor is merged: None (CPU), a device, or Accelerate-style
            {module prefix: device} mapping, or a callable name -> device.
        prefetch: read the next tensor on a background thread while merging this one.
        reference: index of the ingredient whose config / tokenizer / processor files are copied.
        extra_files: more files to write into the output (name -> text or bytes), e.g. a recipe.
        min_ingredients: fewer ingredients than this is an error (greedy soup may keep just 1).
        stream: "tensor", "ingredient" or "auto" (default): "ingredient" streams cache blocks on
            CPU when it can (coordinate-wise optimizer, safetensors), else see
            :func:`hf_ame.plan.choose_stream`.
        memory_budget: bytes "auto" may use for ingredient copies; default half the available memory.
        distributed: split the shards over the processes of ``accelerate launch`` / ``torchrun``
            (default: when WORLD_SIZE > 1); each rank writes its own shards, rank 0 the index.
        block_size: on CPU with a coordinate-wise optimizer, tensors larger than this many elements
            are merged one block at a time through all steps (the state stays in cache); results
            are bit-identical to ``None`` (whole tensors). Default 2**18 elements.
        tokenizer_from: the folder whose tokenizer files are copied (a mergekit ``tokenizer_source``;
            its vocabulary must be the ingredients'); default the ``reference`` ingredient's.
        rows: tensors whose rows are matched by token or label across ingredients (vocabularies
            of different sizes, label sets in other orders; :mod:`hf_ame.rows`): the output takes
            its row keys, config fields and tokenizer.
    """
    t0 = time.perf_counter()
    _validate_args(stream, block_size, max_shard_size)
    o = _open_and_check(ingredients, output_dir, config, base, dtype, overwrite, min_ingredients, reference, rows)
    opts = _PlanOptions(device_map, max_shard_size, stream, memory_budget, block_size, prefetch, reference, extra_files)
    return _run_merge(o, output_dir, opts, t0, overwrite=overwrite, progress=progress, distributed=distributed,
                      tokenizer_from=tokenizer_from)


def _run_merge(o: _Opened, output_dir: Union[str, Path], opts: _PlanOptions, t0: float, *, overwrite: bool,
               progress: bool, distributed: Optional[bool], tokenizer_from: Union[str, Path, None]) -> MergeReport:
    """:func:`merge_checkpoints` once its inputs are opened and checked: plan, run into the staged
    output, finish it; closes every input; times counted from ``t0``."""
    sources = o.ckpts + ([o.base] if o.base is not None else [])
    read_before = sum(c.bytes_read for c in sources)
    try:
        ranks = Ranks(distributed)
        plan = _plan(o, output_dir, opts, ranks)
        plan_seconds = time.perf_counter() - t0
        files: List[str] = []

        def finalize(tmp: Path) -> None:
            files.extend(_finish(tmp, o.ckpts, o.ckpts[opts.reference].files_path, o.rows, plan, opts.extra_files,
                                 tokenizer_from))

        report = run_plan(plan, o.ckpts, o.base, ranks, lambda: staged_output(output_dir, overwrite, o.inputs),
                          finalize, progress=progress)
    finally:
        read = sum(c.bytes_read for c in sources) - read_before
        for c in sources:
            c.close()
    report.bytes_read = read
    report.files = sorted(set(plan.shards.files) | set(report.files) | set(files))
    report.plan_seconds = plan_seconds
    report.seconds = time.perf_counter() - t0
    return report


def _finish(tmp: Path, ckpts: Sequence[Checkpoint], files_from: Path, rows: Optional[RowAlignment], plan: MergePlan,
            extra_files: Optional[Mapping[str, Union[str, bytes]]], tokenizer_from: Union[str, Path, None] = None,
            config_changes: Optional[Mapping[str, Any]] = None) -> List[str]:
    """Config, tokenizer and extra files of a merge: ``files_from``'s, with the rows' config fields and
    tokenizer (if any) and ``config_changes`` on top."""
    r = rows or RowAlignment()
    quantized = any(isinstance(c, FP8Checkpoint) for c in ckpts)  # written dequantized: no quantization_config
    return finish_output(tmp, files_from, getattr(torch, plan.dtype), extra_files,
                         {**r.config_changes, **(config_changes or {})},
                         tokenizer_from=r.tokenizer_dir or tokenizer_from, tokenizer=r.tokenizer,
                         config_drop=("quantization_config",) if quantized else (), chat_template=r.chat_template,
                         code=any(c.trust_remote_code for c in ckpts))


def stack_checkpoints(
    models: Sequence[Union[Checkpoint, str, Path]],
    slices: Sequence[LayerSlice],
    output_dir: Union[str, Path],
    *,
    dtype: Union[str, torch.dtype, None] = None,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    extra_files: Optional[Mapping[str, Union[str, bytes]]] = None,
    dry_run: bool = False,
) -> Union[MergeReport, MergePlan]:
    """Stack decoder layers (mergekit's ``passthrough``): the output's layers are ``slices`` (layer
    ranges of ``models``, by index) one after another, its other tensors those of the first slice's
    model (embeddings) and the last's (final norm, head); tensors are copied and renamed while
    streaming; config.json gets the new ``num_hidden_layers`` and its per-layer lists rebuilt.
    ``dry_run``: return the :class:`~hf_ame.plan.MergePlan` and stop, reading no weight."""
    t0 = time.perf_counter()
    parse_size(max_shard_size)
    out_dtype = parse_dtype(dtype, "dtype")
    ckpts = open_checkpoints(models)
    check_output_dir(output_dir, overwrite, [c.path for c in ckpts])
    archs = {tuple(c.architectures or ()) for c in ckpts}
    if len(archs) > 1:
        raise IncompatibleCheckpointsError(f"layer stacking needs one architecture, got {sorted(archs)}")
    layers = [c.config.get("num_hidden_layers") for c in ckpts]
    if not all(isinstance(n, int) for n in layers):
        raise IncompatibleCheckpointsError("layer stacking needs num_hidden_layers in every model's config.json")
    entries = stack_names(slices, [list(c.tensors) for c in ckpts], layers, [c.name for c in ckpts])
    first = ckpts[slices[0].model]
    plan = build_stack_plan(ckpts, entries, Path(output_dir), out_dtype=out_dtype, model_dtype=model_dtype(first),
                            max_shard_size=max_shard_size)
    if dry_run:
        return plan
    changes = stacked_config([c.config for c in ckpts], slices)
    changes = {k: v for k, v in changes.items() if first.config.get(k) != v}
    files: List[str] = []

    def finalize(tmp: Path) -> None:
        files.extend(finish_output(tmp, first.files_path, getattr(torch, plan.dtype), extra_files, changes,
                                   code=first.trust_remote_code))

    try:
        report = run_plan(plan, ckpts, None, Ranks(False),
                          lambda: staged_output(output_dir, overwrite, [c.path for c in ckpts]), finalize,
                          progress=progress)
        report.bytes_read = sum(c.bytes_read for c in ckpts)
    finally:
        for c in ckpts:
            c.close()
    report.files = sorted(set(plan.shards.files) | set(report.files) | set(files))
    report.seconds = time.perf_counter() - t0
    return report


@dataclass
class MergePart:
    """One merge of a combined output (a slice of mergekit's ``slices``): its ingredients, base (or
    None) and config; ``rename`` maps its tensor names to the output's."""

    ingredients: Sequence[Checkpoint]
    base: Optional[Checkpoint]
    config: AMEConfig
    rename: Callable[[str], str]


def _rows_held(rows: Optional[RowAlignment], part: MergePart) -> Optional[RowAlignment]:
    """``rows`` for the row-matched tensors this part's ingredients hold (an embedding only in the first slice)."""
    if rows is None:
        return None
    held = {n: a for n, a in rows.tensors.items() if n in part.ingredients[0].tensors}
    # mergekit's rule: the slice's base
    base = part.base.name if (rows.fill and part.base is not None) else rows.fill_base
    return replace(rows, tensors=held, fill_base=base) if held else None


def merge_parts(
    parts: Sequence[MergePart],
    output_dir: Union[str, Path],
    *,
    config_changes: Optional[Mapping[str, Any]] = None,
    dtype: Union[str, torch.dtype, None] = None,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    extra_files: Optional[Mapping[str, Union[str, bytes]]] = None,
    rows: Optional[RowAlignment] = None,
    dry_run: bool = False,
) -> Union[MergeReport, MergePlan]:
    """Merge each part with its own config into one output: every part is checked and planned
    from headers first, the plans are combined (:func:`hf_ame.plan.combine_plans`: one set of
    shards) and every tensor is written once, straight into the staged output. The output takes
    the first part's first ingredient's config (with ``config_changes``) and tokenizer files;
    ``rows`` (keyed by model name, as :func:`merge_checkpoints` takes them) matches the rows of the
    tensors each part holds, and gives its config fields and tokenizer.
    ``dry_run``: return the combined plan, reading no weight."""
    t0 = time.perf_counter()
    parse_size(max_shard_size)
    opened = [_open_and_check(p.ingredients, output_dir, p.config, p.base, dtype, overwrite, 1, 0, _rows_held(rows, p))
              for p in parts]
    sources = list({id(c): c for o in opened for c in o.ckpts + ([o.base] if o.base is not None else [])}.values())
    read_before = sum(c.bytes_read for c in sources)
    try:
        opts = _PlanOptions(None, max_shard_size, "auto", None, DEFAULT_BLOCK_SIZE, True, 0, extra_files)
        plans = [_plan(o, output_dir, opts, None) for o in opened]
        plan = combine_plans(plans, [p.rename for p in parts], Path(output_dir), max_shard_size)
        if dry_run:
            return plan
        files: List[str] = []

        def finalize(tmp: Path) -> None:
            files.extend(_finish(tmp, sources, opened[0].ckpts[0].files_path, rows, plan, extra_files,
                                 config_changes=config_changes))

        inputs = list(dict.fromkeys(p for o in opened for p in o.inputs))
        report = run_parts([(pl, o.ckpts, o.base, p.rename) for pl, o, p in zip(plans, opened, parts)], plan,
                           lambda: staged_output(output_dir, overwrite, inputs), finalize, progress=progress)
        report.bytes_read = sum(c.bytes_read for c in sources) - read_before
    finally:
        for c in sources:
            c.close()
    report.files = sorted(set(plan.shards.files) | set(report.files) | set(files))
    report.seconds = time.perf_counter() - t0
    return report


def save_state(
    state: Mapping[str, torch.Tensor],
    reference: Checkpoint,
    output_dir: Union[str, Path],
    *,
    dtype: Union[str, torch.dtype, None] = None,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
    extra_files: Optional[Mapping[str, Union[str, bytes]]] = None,
) -> List[str]:
    """Write an in-memory merge (floating tensors by file name) as a checkpoint laid out like
    ``reference``: its non-floating tensors, config and tokenizer/processor files are copied."""
    out_dtype = parse_dtype(dtype, "dtype")
    infos = list(reference.tensors.values())
    missing = [i.name for i in infos if i.is_floating and i.name not in state]
    if missing:
        raise ValueError(f"state lacks tensor {missing[0]!r} of {reference.name!r}")

    def target(info: TensorInfo) -> torch.dtype:
        return out_dtype if (out_dtype is not None and info.is_floating) else info.dtype

    plan = plan_shards([(i.name, target(i), i.shape) for i in infos], max_shard_size)
    with staged_output(output_dir, overwrite) as tmp:
        writer = ShardedWriter(tmp, plan, metadata={"merged_with": "hf_ame"})
        try:
            for info in infos:
                t = state[info.name] if info.is_floating else reference.get_tensor(info.name)
                writer.write(info.name, t.detach().to(device="cpu", dtype=target(info)))
            files = writer.finish()
        except BaseException:
            writer.abort()
            raise
        files += finish_output(tmp, reference.files_path, out_dtype or model_dtype(reference), extra_files,
                               code=reference.trust_remote_code)
    return sorted(files)
