"""The merge plan: every decision of a merge, made from configs and safetensors headers alone.

A :class:`MergePlan` says, before any weight is read, for every output tensor: where its copies
are (ingredient, file, byte offset, dtype), what is done to them (the exact soup, AME steps, or the
integer rule), how they are read (blocks, whole tensors, or one ingredient's copy at a time), on
which device, into which shard and by which rank, and how many bytes that reads and writes; then
the totals. The executor (:mod:`hf_ame.executor`) runs a plan as it is; ``hf-ame merge --dry-run``
and ``AMEMerger.plan`` print one. A plan is data: printable, comparable, testable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .algorithm import AMEStep, PivotSpec, is_exact_soup, is_plain_sgd, plan_steps
from .blocks import can_block
from .checkpoints import Checkpoint, TensorInfo
from .config import AMEConfig
from .devices import available_memory, fits_on_gpus
from .first_step import first_step_applies
from .groups import group_small
from .heap import keeps_blocks
from .kernels import fused_supported
from .methods import decoder_layers, get_method, layer_position
from .optimizers import build_optimizer
from .rows import RowAlignment
from .writer import ShardPlan, plan_shards

__all__ = ["MergePlan", "TensorPlan", "Source", "build_plan", "combine_plans", "choose_stream",
           "STREAM_MODES", "TRANSFORMS", "READERS", "assign_shards", "block_elements", "read_sequence"]

STREAM_MODES = ("auto", "tensor", "ingredient")
# what is done to a tensor's copies
TRANSFORMS = {"soup": "the exact uniform average, one pass", "ame": "AME optimizer steps",
              "integer": "copied when every ingredient agrees (BatchNorm counters: the maximum)",
              "<method>": "AME steps whose pseudogradients a merge method builds (ties, slerp, ...)",
              "copy": "one source tensor copied, renamed by layer (layer stacking, mergekit's passthrough)"}
# how its copies are read
READERS = {"blocks": "one cache block of every copy at a time (os.preadv), all steps per block",
           "gather": "rows matched by key (tokens, labels): each group of rows held by the same ingredients, "
                     "gathered one ingredient at a time and merged over those ingredients",
           "tensors": "the N copies of the tensor in memory (memory-mapped on CPU)",
           "rows": "one ingredient's copy at a time, the next one prefetched"}


@dataclass(frozen=True)
class Source:
    """One stored copy of a tensor: the model, its file, where its bytes start (-1: a .bin), dtype, size."""

    model: str
    file: str
    offset: int
    dtype: str
    nbytes: int


@dataclass
class TensorPlan:
    """One output tensor: its sources (the ingredients in merge order, then the base) and what
    happens to them. Sizes are bytes; ``peak_bytes`` estimates the merge's own buffers for it."""

    name: str
    shape: Tuple[int, ...]
    dtype: str
    transform: str
    reader: str
    device: str
    shard: int
    rank: int
    sources: List[Source]
    read_bytes: int
    write_bytes: int
    peak_bytes: int
    block: int = 0  # elements per streamed block (the "blocks" reader)
    position: float = 0.0  # the tensor's layer, 0 to 1 (a method's per-layer parameter gradients)
    source_names: List[str] = field(default_factory=list)  # "copy": the source tensor (renamed layers)
    source_models: List[int] = field(default_factory=list)  # "copy": its checkpoint (index)
    scale: Optional[float] = None  # "copy": multiplied by this (mergekit's passthrough ``scale``)
    side_by_side: bool = False  # merged whole on a merge worker beside other such tensors (hf_ame.threads)
    written_by_workers: bool = False  # "blocks": each merge worker writes its merged block (no output tensor)
    # "blocks": a method's first step in one pass (hf_ame.first_step); merged whole as "rows" when not kept
    first_step: bool = False
    group: int = -1  # small tensors merged together by the fused kernels, one launch per step (hf_ame.groups)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class MergePlan:
    """The whole merge (see the module docstring). ``tensors`` are in the reference's file order;
    ``rank`` is the process this plan was made for (its tensors: :meth:`mine`)."""

    output_dir: Path
    ingredients: List[str]
    base: Optional[str]
    config: AMEConfig
    pivot: PivotSpec
    steps: List[AMEStep]
    exact_soup: bool
    stream: str
    block_size: Optional[int]
    prefetch: bool
    dtype: str
    shards: ShardPlan
    tensors: List[TensorPlan]
    sequence: List[int]
    shard_ranks: List[int]
    reference: int = 0
    rank: int = 0
    world_size: int = 1
    extra_files: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # what the plan cannot know yet (e.g. scores)
    rows: Optional[RowAlignment] = None  # rows matched by token / label ("gather" tensors)
    workers: int = 1  # merge workers: blocks of a tensor, or whole tensors, merged side by side

    def mine(self) -> List[TensorPlan]:
        """The tensors this process merges and writes."""
        return [t for t in self.tensors if t.rank == self.rank]

    @property
    def bytes_to_read(self) -> int:
        """Bytes of tensor data this process will read from the ingredients (and base)."""
        return sum(t.read_bytes for t in self.mine())

    @property
    def bytes_to_write(self) -> int:
        """Bytes of tensor data this process will write (shard headers and index aside)."""
        return sum(t.write_bytes for t in self.mine())

    @property
    def peak_memory(self) -> int:
        """Estimated peak bytes of the merge's own buffers (the largest tensor's inputs, state and
        output, plus what prefetching holds and the previous output while it is written), meant as an
        upper bound: the RSS growth measured in tests/test_plan.py stays below it. The Python and
        torch baseline comes on top."""
        mine = self.mine()
        if not mine:
            return 0
        ahead = max(t.read_bytes for t in mine if t.reader == "tensors") if (
            self.prefetch and any(t.reader == "tensors" for t in mine)) else 0
        # the previous output tensor, written on its own thread (blocks written by the workers: none)
        behind = max((t.write_bytes for t in mine if not t.written_by_workers), default=0) if self.prefetch else 0
        # tensors merged side by side: one per worker and one waiting for a worker
        side = sorted((t.peak_bytes for t in mine if t.side_by_side), reverse=True)[:self.workers + 1]
        grouped: Dict[int, List[int]] = {}  # a group's tensors: merged together, copies held until then
        for t in mine:
            if t.group >= 0:
                grouped.setdefault(t.group, [0, 0])[0] += t.peak_bytes
                grouped[t.group][1] += t.read_bytes
        held = max((r for _, r in grouped.values()), default=0)  # while the tensors between its members merge
        together = max((b for b, _ in grouped.values()), default=0)
        return max(max(t.peak_bytes for t in mine) + held, sum(side), together) + ahead + behind

    @property
    def devices(self) -> List[str]:
        return sorted({t.device for t in self.mine()})

    def counts(self, what: str = "transform") -> Dict[str, int]:
        """How many tensors take each ``what`` ("transform" or "reader"), e.g. {"ame": 18, "integer": 2}."""
        out: Dict[str, int] = {}
        for t in self.mine():
            k = getattr(t, what)
            out[k] = out.get(k, 0) + 1
        return out

    def summary(self) -> str:
        """A few lines for a person: what, how, bytes, memory, shards, devices."""
        n = len(self.ingredients)
        how = ("layer stacking (passthrough): tensors copied, renamed by layer" if self.counts().get("copy") else
               "the exact uniform soup (one pass)" if self.exact_soup else
               f"{len(self.steps)} {self.config.optimizer} steps per tensor (lr={self.config.lr}, "
               f"epochs={self.config.epochs}, batch_size={self.config.batch_size}, pivot={self.config.pivot})")
        mine = self.mine()
        counts = "; ".join(", ".join(f"{v} {k}" for k, v in sorted(self.counts(w).items()))
                           for w in ("transform", "reader"))
        lines = [
            f"plan: merge {n} ingredients" + (f" + base {self.base}" if self.base else "") + f" -> {self.output_dir}",
            f"  how: {how}; stream={self.stream}" + (f", block_size={self.block_size}" if self.block_size else ""),
            f"  tensors: {len(mine)} ({sum(t.numel for t in mine) / 1e6:.2f}M parameters; {counts})",
            f"  read: {_mib(self.bytes_to_read)}  write: {_mib(self.bytes_to_write)}  "
            f"peak memory (merge buffers, estimate): {_mib(self.peak_memory)}",
            f"  output: {len(self.shards.files)} shard(s) ({', '.join(self.shards.files[:3])}"
            + (", ..." if len(self.shards.files) > 3 else "") + f"), dtype {self.dtype}",
            f"  devices: {', '.join(self.devices) or '-'}"
            + (f"; rank {self.rank} of {self.world_size}" if self.world_size > 1 else ""),
        ] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def table(self, limit: Optional[int] = 20) -> str:
        """One line per tensor (the first ``limit``; None: all): name, shape, dtype, transform,
        reader, device, shard, bytes read and written."""
        rows = self.mine()
        shown = rows if limit is None else rows[:limit]
        width = max([len(t.name) for t in shown] + [6])
        out = [f"{'tensor':<{width}}  {'shape':<14} {'dtype':<8} {'transform':<9} {'reader':<7} {'device':<7} "
               f"{'shard':>5} {'read':>10} {'write':>10}"]
        for t in shown:
            out.append(f"{t.name:<{width}}  {str(list(t.shape)):<14} {t.dtype:<8} {t.transform:<9} {t.reader:<7} "
                       f"{t.device:<7} {t.shard:>5} {_mib(t.read_bytes):>10} {_mib(t.write_bytes):>10}")
        if len(shown) < len(rows):
            out.append(f"... {len(rows) - len(shown)} more tensors")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.summary() + "\n" + self.table()

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready description (``hf-ame merge --dry-run --json``)."""
        return {
            "output_dir": str(self.output_dir), "ingredients": self.ingredients, "base": self.base,
            "config": self.config.to_dict(), "steps": len(self.steps), "exact_soup": self.exact_soup,
            "stream": self.stream, "block_size": self.block_size, "dtype": self.dtype,
            "files": list(self.shards.files), "rank": self.rank, "world_size": self.world_size,
            "bytes_to_read": self.bytes_to_read, "bytes_to_write": self.bytes_to_write,
            "peak_memory": self.peak_memory, "devices": self.devices, "notes": self.notes, "workers": self.workers,
            "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "transform": t.transform,
                         "reader": t.reader, "device": t.device, "shard": t.shard, "rank": t.rank, "block": t.block,
                         "read_bytes": t.read_bytes, "write_bytes": t.write_bytes, "side_by_side": t.side_by_side,
                         "first_step": t.first_step, "group": t.group,
                         "sources": [vars(s) for s in t.sources]} for t in self.tensors],
        }


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 or n == 0 else f"{n / 1024:.1f} KiB"


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def choose_stream(stream: str, n: int, largest_tensor_bytes: int, memory_budget: Optional[int]) -> str:
    """The budget rule of "auto" for merges that cannot stream blocks (GPU, .bin inputs, optimizers
    not declared elementwise; on CPU with block streaming, :func:`build_plan` picks "ingredient"
    before asking this). "tensor" keeps the N copies of one tensor (and the next, prefetched) in
    memory: E epochs cost no extra I/O. "ingredient" keeps one ingredient's copy at a time: memory
    independent of N, each input read once per epoch. "auto" picks "ingredient" when 2 x N copies
    of the largest tensor exceed ``memory_budget`` (default: half of the memory available now)."""
    if stream not in STREAM_MODES:
        raise ValueError(f"stream: expected one of {', '.join(STREAM_MODES)}, got {stream!r}")
    if stream != "auto":
        return stream
    budget = memory_budget if memory_budget is not None else available_memory() // 2
    return "ingredient" if 2 * n * largest_tensor_bytes > budget else "tensor"


def read_sequence(n: int, pivot: PivotSpec, steps: Sequence[AMEStep], exact_soup: bool, passes: int = 1) -> List[int]:
    """The order a tensor's ingredients are indexed in by one merge: the pivot pass, then the steps,
    each step's batch ``passes`` times (a method with a sign election reads it twice); the "rows"
    reader prefetches along it."""
    if exact_soup:
        return list(range(n))
    seq = list(range(n)) if pivot.is_soup else ([pivot.index] if pivot.kind == "index" else [])
    return seq + [j for st in steps for _ in range(passes) for j in st.batch]


def assign_shards(sizes: Sequence[int], world: int) -> List[int]:
    """Shard -> rank, largest shards first to the least loaded rank (balanced bytes)."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def block_elements(block_size: int, n_sources: int, element_size: int) -> int:
    """Elements per streamed block: ``block_size``, shrunk so the N sources' slices of one block
    stay about 16 x ``block_size`` bytes (at least 64)."""
    return max(64, min(block_size, 16 * block_size // (n_sources * element_size)))


def state_slots(config: AMEConfig, exact_soup: bool) -> int:
    """How many float tensors of a parameter's size the optimizer keeps (Adam: 2), found by one
    step on a 4-element parameter, so any registered optimizer is counted as it really runs."""
    if exact_soup or is_plain_sgd(config):  # w - lr g: no state (and no optimizer built: see AMEStepper)
        return 0
    p = torch.zeros(4, requires_grad=True)
    try:
        opt = build_optimizer(config.optimizer, [p], lr=float(config.lr), kwargs=config.optimizer_arguments())
        p.grad = torch.ones(4)
        opt.step()
    except Exception:  # noqa: BLE001 - an optimizer that needs more than this: assume Adam's two slots
        return 2
    return sum(1 for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.numel() == 4)


@dataclass
class _Context:
    """What every tensor's plan depends on (built once per merge by :func:`build_plan`)."""

    srcs: List[Checkpoint]
    n: int
    mode: str
    blocks_stream: bool
    block_size: Optional[int]
    exact_soup: bool
    sequence: List[int]
    slots: int
    where: Callable[[str], torch.device]
    out_dtype: Optional[torch.dtype]
    transform: str
    num_layers: Optional[int]
    rows: Optional[RowAlignment] = None
    base: Optional[Checkpoint] = None
    workers: int = field(default_factory=torch.get_num_threads)  # blocks merged side by side (hf_ame.threads)
    cpu_kernels: bool = False  # the fused kernels merge CPU tensors (Triton's interpreter): one thread only
    first_step: bool = False  # the method's first step over blocks (hf_ame.first_step), where copies read positionally
    kept: int = field(default_factory=lambda: 2 if keeps_blocks() else 1)  # block buffers held per live one (heap.py)


def _out_shape(info: TensorInfo, rows: Optional[RowAlignment]) -> Tuple[int, ...]:
    """The output shape of a tensor: a row-matched one has the output's rows."""
    m = rows.map_for(info.name) if rows is not None else None
    return (m.rows, *info.shape[1:]) if m is not None else tuple(info.shape)


def _plan_gather(info: TensorInfo, ctx: _Context, shard: int, rank: int) -> TensorPlan:
    """A tensor whose rows are matched by key: each copy is read whole, one at a time."""
    everyone = ctx.srcs[:ctx.n] + ([ctx.base] if ctx.base is not None else [])
    m = ctx.rows.map_for(info.name) if ctx.rows is not None else None
    srcs = [c for c in everyone
            if info.name in c.tensors and (c in ctx.srcs[:ctx.n] or (m is not None and c.name in m.sources))]
    sources = [Source(c.name, c.tensors[info.name].file, c.tensors[info.name].offset, _name(c.tensors[info.name].dtype),
                      c.tensors[info.name].nbytes) for c in srcs]
    shape = _out_shape(info, ctx.rows)
    dtype = ctx.out_dtype if ctx.out_dtype is not None else info.dtype
    numel = math.prod(shape)
    write = numel * _esize(dtype)
    # two copies' rows (one read ahead) and the float32 merge state of the largest group, then the output
    peak = 2 * max(s.nbytes for s in sources) + numel * 4 * (3 + ctx.slots) + write
    return TensorPlan(info.name, shape, _name(dtype), ctx.transform, "gather", str(ctx.where(info.name)), shard, rank,
                      sources, sum(s.nbytes for s in sources), write, peak, 0,
                      layer_position(info.name, ctx.num_layers))


def _plan_tensor(info: TensorInfo, ctx: _Context, shard: int, rank: int) -> TensorPlan:
    if ctx.rows is not None and info.name in ctx.rows.tensors:
        return _plan_gather(info, ctx, shard, rank)
    n, block = ctx.n, 0
    copies = ([c.tensors[info.name] for c in ctx.srcs] if info.is_floating
              else [c.tensors[info.name] for c in ctx.srcs[:n]])
    srcs = ctx.srcs if info.is_floating else ctx.srcs[:n]
    sources = [Source(c.name, i.file, i.offset, _name(i.dtype), i.nbytes) for c, i in zip(srcs, copies)]
    dev = ctx.where(info.name)
    dtype = ctx.out_dtype if (ctx.out_dtype is not None and info.is_floating) else info.dtype
    write = info.numel * _esize(dtype)
    work = info.numel * 4 * (2 + ctx.slots)  # float32 merge, pseudogradient and optimizer state
    direct = first = False
    blocked = ctx.block_size is not None and dev.type == "cpu" and info.numel > ctx.block_size
    positional = all(c.reads_concurrently(info.name) for c in ctx.srcs)  # plain safetensors: any thread reads
    if not info.is_floating:
        transform, reader = "integer", "tensors"
        read, peak = sum(s.nbytes for s in sources), sum(s.nbytes for s in sources) + write
    elif ctx.first_step and dev.type == "cpu" and positional and info.numel > 0:
        # one pass over blocks, each copy read once; merged whole ("rows" below) where it is not kept
        transform, reader, first = ctx.transform, "blocks", True
        block = block_elements(ctx.block_size, len(sources), _esize(info.dtype))
        read, held, w = sum(s.nbytes for s in sources), min(block, info.numel), max(1, ctx.workers)
        # per worker: one block's slices, its pivot, step and difference, the merged block
        in_blocks = ctx.kept * w * held * (sum(_esize(c.dtype) for c in copies) + 3 * 4 + _esize(dtype))
        peak = max(in_blocks, 2 * max(s.nbytes for s in sources[:n]) + work + write)
    elif ctx.mode == "ingredient" and ctx.blocks_stream and dev.type == "cpu":
        transform, reader = ctx.transform, "blocks"
        per = block = block_elements(ctx.block_size, len(sources), _esize(info.dtype))
        read = sum(s.nbytes for s in sources)
        held = min(per, info.numel)  # a small tensor is one short block
        # each worker holds one block's slices and state (one worker: the next block's slices read ahead)
        w = max(1, ctx.workers)
        # with workers each writes its merged block (no output tensor), else the output is assembled
        direct = w > 1 and positional
        peak = (ctx.kept * (max(2, w) * held * sum(_esize(c.dtype) for c in copies) + w * held * 4 * (2 + ctx.slots + n)
                            + (w * held * _esize(dtype) if direct else 0)) + (0 if direct else write))
    elif ctx.mode == "ingredient":
        transform, reader = ctx.transform, "rows"
        runs = [j for k, j in enumerate(ctx.sequence) if k == 0 or ctx.sequence[k - 1] != j]
        read = sum(sources[j].nbytes for j in runs) + (sources[n].nbytes if len(sources) > n else 0)
        peak = 2 * max(s.nbytes for s in sources[:n]) + (sources[n].nbytes if len(sources) > n else 0) + work + write
    else:
        transform, reader = ctx.transform, "tensors"
        read = sum(s.nbytes for s in sources)
        # blocked: one block's float32 state and slices; whole: the state and one float32 copy of an input
        peak = read + (ctx.block_size * 4 * (2 + ctx.slots + n) if blocked else work + info.numel * 4) + write
    return TensorPlan(info.name, tuple(info.shape), _name(dtype), transform, reader, str(dev), shard, rank,
                      sources, read, write, peak, block, layer_position(info.name, ctx.num_layers),
                      side_by_side=positional and _side_by_side(info, ctx, reader, dev, block if first else 0),
                      written_by_workers=reader == "blocks" and direct, first_step=first)


# glibc serves allocations above 32 MiB (its largest adaptive mmap threshold; a worker thread's arena
# grows in heaps of 64 MiB) with fresh mappings faulted in page by page: tensors whose float32 copy is
# larger merge on the caller's thread, one at a time (side by side they made more page faults, 1.49 M
# against 1.16 M for the robust preset over 4 x 309 MiB, and were no faster)
SIDE_BY_SIDE_MAX_BYTES = 32 << 20


def _side_by_side(info: TensorInfo, ctx: _Context, reader: str, dev: torch.device, first_block: int = 0) -> bool:
    """A floating tensor merged whole on the CPU (a method that ranks or normalises over it, or a
    copy streamed whole) goes to a merge worker beside others when its float32 copy is at most
    ``SIDE_BY_SIDE_MAX_BYTES`` (the caller checks that every copy is read positionally: readers with
    state stay on the caller's thread); so does a method's first step over blocks (``first_block``:
    its block) on a tensor of one block."""
    in_blocks = reader == "tensors" and ctx.blocks_stream and info.numel > ctx.block_size  # workers take the blocks
    one_block = bool(first_block) and info.numel <= first_block
    return (ctx.workers > 1 and dev.type == "cpu" and not ctx.cpu_kernels and info.is_floating
            and (reader in ("rows", "tensors") or one_block) and info.numel * 4 <= SIDE_BY_SIDE_MAX_BYTES
            and not in_blocks)


def build_plan(ckpts: Sequence[Checkpoint], config: AMEConfig, output_dir: Path, *, pivot: PivotSpec,
               base: Optional[Checkpoint] = None, out_dtype: Optional[torch.dtype] = None, model_dtype: torch.dtype,
               max_shard_size: Any = "5GB", where: Callable[[str], torch.device], stream: str = "auto",
               memory_budget: Optional[int] = None, block_size: Optional[int] = None, prefetch: bool = True,
               reference: int = 0, rank: int = 0, world_size: int = 1,
               extra_files: Sequence[str] = (), rows: Optional[RowAlignment] = None) -> MergePlan:
    """Plan a merge of ``ckpts`` (already checked compatible) from their headers; reads no weight.

    ``where`` maps a file tensor name to its device; ``rows`` says which tensors' rows are matched
    by key (:mod:`hf_ame.rows`); the rest are :func:`~hf_ame.engine.merge_checkpoints`'s arguments,
    already validated."""
    ref = ckpts[reference]
    infos: List[TensorInfo] = list(ref.tensors.values())
    rows = rows if (rows is not None and rows.tensors) else None
    shards = plan_shards([(i.name, out_dtype if (out_dtype is not None and i.is_floating) else i.dtype,
                           _out_shape(i, rows)) for i in infos], max_shard_size)
    steps = plan_steps(len(ckpts), config)
    exact = is_exact_soup(config, len(ckpts))
    # the base is read for every tensor only as the pivot; otherwise only where rows come from it (heads="base")
    srcs = list(ckpts) + ([base] if base is not None and pivot.is_base else [])
    floating = [i for i in infos if i.is_floating]
    largest = max((i.nbytes for i in floating), default=0)
    mode = choose_stream(stream, len(ckpts), largest, memory_budget)
    on_cpu = all(where(i.name).type == "cpu" for i in floating)
    # blocks stream from the files (CPU tensors): coordinate-wise steps, byte offsets known
    blocks_stream = (block_size is not None and can_block(config, None, exact_soup=exact)
                     and all(c.format == "safetensors" for c in srcs))
    if stream == "auto" and on_cpu and blocks_stream:
        # blocks streamed with preadv: each input byte read once, a few MiB of memory whatever N,
        # no mapped copies in RSS, and as fast as the mapped "tensor" mode (benchmarks/speed.py)
        mode = "ingredient"
    elif stream == "auto" and exact and not on_cpu and not fits_on_gpus(2 * len(ckpts) * largest):
        mode = "ingredient"  # the soup reads each input once either way: keep one copy, not N, on the GPU
    elif stream == "auto" and config.method is not None:
        mode = "ingredient"  # a method holds one task vector at a time: never the N copies of a tensor
    elif stream == "auto" and any(c.format == "gguf" for c in srcs):
        mode = "ingredient"  # dequantized GGUF copies are float32 anonymous memory: one at a time, flat in N
    passes = get_method(config.method).passes if config.method is not None else 1
    sequence = read_sequence(len(ckpts), pivot, steps, exact, passes)
    transform = "soup" if exact else (config.method or "ame")
    ctx = _Context(srcs, len(ckpts), mode, blocks_stream, block_size, exact, sequence, state_slots(config, exact),
                   where, out_dtype, transform, decoder_layers(ref.config), rows, base,
                   cpu_kernels=config.method is None and fused_supported(config, torch.device("cpu")),
                   first_step=(mode == "ingredient" and block_size is not None
                               and first_step_applies(config, steps, pivot)))
    owner = assign_shards([sum(shards.entries[n].nbytes for n in shard) for shard in shards.order], world_size)
    fused = lambda dev: config.method is None and fused_supported(config, torch.device(dev))  # noqa: E731
    tensors = group_small([_plan_tensor(i, ctx, shards.entries[i.name].shard, owner[shards.entries[i.name].shard])
                           for i in infos], fused)
    plan = MergePlan(Path(output_dir), [c.name for c in ckpts], base.name if base is not None else None, config, pivot,
                     steps, exact, mode, block_size, prefetch, _name(out_dtype or model_dtype), shards, tensors,
                     sequence, owner, reference, rank, world_size, list(extra_files), rows=rows, workers=ctx.workers)
    plan.notes.extend(rows.notes if rows is not None else [])
    return plan


def combine_plans(plans: Sequence[MergePlan], renames: Sequence[Callable[[str], str]], output_dir: Path,
                  max_shard_size: Any = "5GB") -> MergePlan:
    """One output made of several merges (mergekit's slices merged by a method): every plan's
    tensors, renamed by its ``renames`` entry, in order, laid out in one set of shards, so that each
    is written once. The settings shown (config, steps, stream) are the first plan's; the
    ingredients are every plan's (in order of first use), the bases joined by ", "."""
    tensors = [replace(t, name=f(t.name), sources=list(t.sources)) for p, f in zip(plans, renames) for t in p.tensors]
    seen: set = set()
    for t in tensors:
        if t.name in seen:
            raise ValueError(f"tensor {t.name!r}: two merges write it (renamed into the same output name)")
        seen.add(t.name)
    shards = plan_shards([(t.name, getattr(torch, t.dtype), t.shape) for t in tensors], max_shard_size)
    for t in tensors:
        t.shard, t.rank = shards.entries[t.name].shard, 0
    names = list(dict.fromkeys(n for p in plans for n in p.ingredients))
    bases = list(dict.fromkeys(p.base for p in plans if p.base is not None))
    first = plans[0]
    return MergePlan(Path(output_dir), names, ", ".join(bases) or None, first.config, first.pivot, first.steps,
                     all(p.exact_soup for p in plans), first.stream, first.block_size, first.prefetch, first.dtype,
                     shards, tensors, first.sequence, [0] * len(shards.files), extra_files=list(first.extra_files),
                     notes=list(dict.fromkeys(n for p in plans for n in p.notes)), workers=first.workers)
