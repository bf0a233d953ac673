"""The streaming executor: merge N checkpoint folders tensor by tensor into a new folder.

Plan first (headers only: compatibility, pivot, output dtypes, shard layout, output folder), then
execute, tensor by tensor, each merged tensor appended to its shard at once; a background thread
reads ahead. How the ingredients of one tensor are held (see :func:`choose_stream`):

- on CPU with a coordinate-wise optimizer and safetensors inputs ("ingredient" mode, the default
  there): one block of ~2**18 coordinates of every ingredient is read (``os.preadv``) and taken
  through every step of every epoch: each input byte is read once, memory is a few MiB of slices
  + one block's optimizer state + the output tensor, whatever N and the model size;
- "tensor" mode: the N memory-mapped copies of a tensor, merged in cache blocks on CPU, whole on
  a GPU;
- "ingredient" mode otherwise (GPU, .bin inputs, optimizers that need whole tensors): one
  ingredient's copy of a tensor at a time, the next one prefetched.
Never a whole model.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from .algorithm import (DEFAULT_BLOCK_SIZE, NonFiniteError, block_bounds, can_block, is_exact_soup, merge_in_blocks,
                        merge_tensor, plan_steps, resolve_pivot)
from .checkpoints import Checkpoint, TensorInfo
from .checks import IncompatibleCheckpointsError, NonFiniteWeightsError, check_compatible, storage_dtype
from .config import COMPUTE_DTYPES, AMEConfig, ConfigError, parse_dtype
from .output import check_output_dir, copy_aux_files, staged_output, update_config, write_files
from .transfer import DeviceUploader, Upload
from .writer import ShardedWriter, parse_size, plan_shards

__all__ = ["MergeReport", "merge_checkpoints", "open_checkpoints", "DeviceMap", "save_state"]

DeviceMap = Union[None, str, torch.device, Mapping[str, Union[str, int, torch.device]], Callable[[str], Union[str, torch.device]]]


@dataclass
class MergeReport:
    """What a merge did. Times are seconds of wall clock; sizes are bytes."""

    output_dir: Path
    ingredients: List[str]
    config: AMEConfig
    dtype: str
    tensors: int = 0
    parameters: int = 0
    merged_tensors: int = 0
    copied_tensors: int = 0
    steps: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    files: List[str] = field(default_factory=list)
    seconds: float = 0.0
    plan_seconds: float = 0.0
    wait_read_seconds: float = 0.0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0
    devices: List[str] = field(default_factory=list)
    stream: str = "tensor"
    rank: int = 0
    world_size: int = 1
    exact_soup: bool = False
    counters_maxed: List[str] = field(default_factory=list)  # BatchNorm num_batches_tracked: the maximum

    def summary(self) -> str:
        how = ("the exact uniform soup (one pass)" if self.exact_soup else
               f"{self.steps} {self.config.optimizer} steps per tensor, lr={self.config.lr}")
        return (f"merged {len(self.ingredients)} ingredients -> {self.output_dir}: {self.tensors} tensors "
                f"({self.parameters / 1e6:.2f}M parameters, {self.merged_tensors} merged, {self.copied_tensors} copied), "
                f"{how}, "
                f"read {self.bytes_read / 2**20:.1f} MiB, wrote {self.bytes_written / 2**20:.1f} MiB in {self.seconds:.2f}s"
                + (f" [this is rank {self.rank} of {self.world_size}: its share of the tensors]" if self.world_size > 1 else ""))


def merge_integer(name: str, ckpts: Sequence[Checkpoint], xs: Sequence[torch.Tensor], reference: int,
                  report: "MergeReport") -> torch.Tensor:
    """An integer tensor: copied when every ingredient agrees. BatchNorm's ``num_batches_tracked``
    (a step counter: fine-tunes of different lengths disagree) takes the maximum, recorded in
    ``report.counters_maxed``; any other difference is refused."""
    if all(torch.equal(xs[0], x) for x in xs[1:]):
        return xs[reference]
    if name.endswith("num_batches_tracked"):
        report.counters_maxed.append(name)
        return torch.stack(list(xs)).amax(0)
    other = next(j for j in range(1, len(xs)) if not torch.equal(xs[0], xs[j]))
    raise IncompatibleCheckpointsError(
        f"non-floating tensor {name!r} ({xs[0].dtype}) differs between {ckpts[0].name!r} and "
        f"{ckpts[other].name!r}; integer buffers cannot be averaged")


def model_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype a checkpoint says it is (``config.json``'s ``dtype`` / ``torch_dtype``, as
    transformers reads it), else the floating dtype most of its parameters are stored in. Not the
    first tensor's: bf16 models keep a few float32 tensors (routers, T5's ``wo``), listed first."""
    name = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
    if isinstance(name, str) and name.replace("torch.", "") in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[name.replace("torch.", "")]
    stored = storage_dtype(ckpt.tensors)
    return COMPUTE_DTYPES[stored] if stored in COMPUTE_DTYPES else torch.float32


def open_checkpoints(items: Sequence[Union[Checkpoint, str, Path]]) -> List[Checkpoint]:
    """Checkpoint objects for folders (or pass through ones already open)."""
    return [c if isinstance(c, Checkpoint) else Checkpoint(c) for c in items]


def _device_lookup(device_map: DeviceMap) -> Callable[[str], torch.device]:
    """Turn a device map into name -> device. A mapping is keyed by module prefixes, as
    Accelerate's device maps are ("" = whole model); the longest matching prefix wins."""
    if device_map is None:
        return lambda name: torch.device("cpu")
    if callable(device_map) and not isinstance(device_map, Mapping):
        return lambda name: torch.device(device_map(name))  # type: ignore[misc]
    if isinstance(device_map, (str, torch.device, int)):
        dev = _as_device(device_map)
        return lambda name: dev
    prefixes = sorted(((k, _as_device(v)) for k, v in device_map.items()), key=lambda kv: -len(kv[0]))
    counts: Dict[torch.device, int] = {}
    for _, dev in prefixes:
        counts[dev] = counts.get(dev, 0) + 1
    # A tensor whose name matches no module (a file name that differs from the in-memory name)
    # goes to the device holding most modules.
    fallback = max(counts, key=lambda d: counts[d]) if counts else torch.device("cpu")

    def lookup(name: str) -> torch.device:
        for prefix, dev in prefixes:
            if prefix == "" or name == prefix or name.startswith(prefix + "."):
                return dev
        return fallback

    return lookup


def _as_device(v: Union[str, int, torch.device]) -> torch.device:
    if isinstance(v, int) and not isinstance(v, bool):
        return torch.device("cuda", v)
    if v in ("disk", "meta"):
        return torch.device("cpu")  # offloaded modules are merged on the CPU
    return torch.device(v)


STREAM_MODES = ("auto", "tensor", "ingredient")


def available_memory() -> int:
    """Bytes of memory available now (Linux MemAvailable; a conservative guess elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _fits_on_gpus(nbytes: int) -> bool:
    """Whether ``nbytes`` fit in half the free memory of the least free visible GPU."""
    if not torch.cuda.is_available():
        return False
    free = min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    return nbytes <= free // 2


def choose_stream(stream: str, n: int, largest_tensor_bytes: int, memory_budget: Optional[int]) -> str:
    """The budget rule of "auto" for merges that cannot stream blocks (GPU, .bin inputs, optimizers
    not declared elementwise; on CPU with block streaming, :func:`merge_checkpoints` picks
    "ingredient" before asking this). "tensor" keeps the N copies of one tensor (and the next,
    prefetched) in memory: E epochs cost no extra I/O. "ingredient" keeps one ingredient's copy at
    a time: memory independent of N, each input read once per epoch. "auto" picks "ingredient"
    when 2 x N copies of the largest tensor exceed ``memory_budget`` (default: half of the memory
    available now)."""
    if stream not in STREAM_MODES:
        raise ValueError(f"stream: expected one of {', '.join(STREAM_MODES)}, got {stream!r}")
    if stream != "auto":
        return stream
    budget = memory_budget if memory_budget is not None else available_memory() // 2
    return "ingredient" if 2 * n * largest_tensor_bytes > budget else "tensor"


class _Row:
    """Ingredient j's copy of one tensor, read from disk when indexed (ingredient streaming).

    ``sequence`` is the order the merge will index the ingredients in (the soup pass, then the
    planned batches): while one copy is used, the next in that sequence is read on ``pool``'s
    thread, so at most two copies are in memory, whatever N."""

    def __init__(self, ckpts: Sequence[Checkpoint], name: str, device: torch.device,
                 sequence: Sequence[int] = (), pool: Optional[cf.ThreadPoolExecutor] = None):
        self.ckpts, self.name, self.device = ckpts, name, device
        self.sequence, self.pool, self.pos = list(sequence), pool, 0
        self._last: Optional[tuple] = None  # (j, tensor): the pivot read for w_0 is reused by step 1
        self._next: Optional[tuple] = None  # (position, j, future)

    def __len__(self) -> int:
        return len(self.ckpts)

    @property
    def element_sizes(self) -> List[int]:
        """Bytes per element of each copy, from the headers (copies may be stored in other dtypes)."""
        return [torch.empty((), dtype=c.tensors[self.name].dtype).element_size() for c in self.ckpts]

    def _read(self, j: int) -> torch.Tensor:
        return self.ckpts[j].get_tensor(self.name, device=self.device)

    def __getitem__(self, j: int) -> torch.Tensor:
        if self._last is not None and self._last[0] == j:
            t = self._last[1]
        elif self._next is not None and self._next[1] == j:
            t = self._next[2].result()
            self._next = None
        else:
            t = self._read(j)
        # advance along the expected sequence and prefetch what comes next
        while self.pos < len(self.sequence) and self.sequence[self.pos] != j:
            self.pos += 1
        self.pos += 1
        self._last = (j, t)
        if self.pool is not None and self._next is None:
            k = self.pos
            while k < len(self.sequence) and self.sequence[k] == j:
                k += 1
            if k < len(self.sequence):
                nj = self.sequence[k]
                self._next = (k, nj, self.pool.submit(self._read, nj))
        return t

    def close(self) -> None:
        if self._next is not None:
            self._next[2].cancel()
        self._next = self._last = None


class _Dist:
    """This process's place in a multi-process merge (torch.distributed, as set up by
    ``accelerate launch`` or ``torchrun``); world size 1 otherwise."""

    def __init__(self, enabled: Optional[bool]):
        self.world, self.rank, self.pg = 1, 0, False
        want = enabled if enabled is not None else int(os.environ.get("WORLD_SIZE", "1")) > 1
        if not want:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
        self.world, self.rank, self.pg = dist.get_world_size(), dist.get_rank(), True

    def broadcast(self, obj: Any) -> Any:
        if not self.pg:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_ok(self, ok: bool) -> bool:
        if not self.pg:
            return ok
        import torch.distributed as dist

        flag = torch.tensor([1 if ok else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def barrier(self) -> None:
        if self.pg:
            import torch.distributed as dist

            dist.barrier()


def _assign_shards(sizes: Sequence[int], world: int) -> List[int]:
    """Shard -> rank, largest shards first to the least loaded rank (balanced bytes)."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


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
            CPU when it can (coordinate-wise optimizer, safetensors), else see :func:`choose_stream`.
        memory_budget: bytes "auto" may use for ingredient copies; default half the available memory.
        distributed: split the shards over the processes of ``accelerate launch`` / ``torchrun``
            (default: when WORLD_SIZE > 1); each rank writes its own shards, rank 0 the index.
        block_size: on CPU with a coordinate-wise optimizer, tensors larger than this many elements
            are merged one block at a time through all steps (the state stays in cache); results
            are bit-identical to ``None`` (whole tensors). Default 2**18 elements.
    """
    t0 = time.perf_counter()
    config = (config or AMEConfig()).validate()
    out_dtype = parse_dtype(dtype, "dtype")
    parse_size(max_shard_size)
    if stream not in STREAM_MODES:
        raise ValueError(f"stream: expected one of {', '.join(STREAM_MODES)}, got {stream!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 64):
        raise ValueError(f"block_size: expected a number of elements >= 64 (or None for whole tensors), "
                         f"got {block_size!r}")
    ckpts = open_checkpoints(ingredients)
    inputs = [c.path for c in ckpts] + ([Path(base.path if isinstance(base, Checkpoint) else base)] if base else [])
    check_output_dir(output_dir, overwrite, inputs)  # before reading anything big
    read_before = sum(c.bytes_read for c in ckpts)
    names = [c.name for c in ckpts]
    pivot = resolve_pivot(config.pivot, len(ckpts), names)
    base_ckpt: Optional[Checkpoint] = None
    if pivot[0] == "base":
        if base is None:
            if not Path(str(config.pivot)).is_dir():
                raise ConfigError(
                    f"pivot: {config.pivot!r} is neither 'soup', 'first', an ingredient index or name "
                    f"({', '.join(names)}) nor a checkpoint folder"
                )
            base = config.pivot  # type: ignore[assignment]
        base_ckpt = base if isinstance(base, Checkpoint) else Checkpoint(base, name=str(base))
    check_compatible(ckpts, base_ckpt, min_ingredients=min_ingredients)
    if not 0 <= reference < len(ckpts):
        raise ValueError(f"reference: index {reference} out of range for {len(ckpts)} ingredients")
    ref = ckpts[reference]

    infos: List[TensorInfo] = list(ref.tensors.values())

    def target_dtype(info: TensorInfo) -> torch.dtype:
        return out_dtype if (out_dtype is not None and info.is_floating) else info.dtype

    plan = plan_shards([(i.name, target_dtype(i), i.shape) for i in infos], max_shard_size)
    steps = plan_steps(len(ckpts), config)
    exact_soup = is_exact_soup(config, len(ckpts))
    where = _device_lookup(device_map)
    floating = [i for i in infos if i.is_floating]
    final_dtype = out_dtype or model_dtype(ref)
    dist = _Dist(distributed)
    if dist.world > 1 and torch.cuda.is_available():  # one GPU per rank, as accelerate launch --multi_gpu sets up
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.rank)) % torch.cuda.device_count())
        where = lambda name: local  # noqa: E731
    largest = max((i.nbytes for i in floating), default=0)
    mode = choose_stream(stream, len(ckpts), largest, memory_budget)
    srcs = list(ckpts) + ([base_ckpt] if base_ckpt is not None else [])
    on_cpu = all(where(i.name).type == "cpu" for i in floating)
    # blocks can be streamed from the files (on the CPU tensors): coordinate-wise steps, byte offsets known
    blocks_stream = (block_size is not None and can_block(config, None, exact_soup=exact_soup)
                     and all(c.format == "safetensors" for c in srcs))
    if stream == "auto" and on_cpu and blocks_stream:
        # blocks streamed with preadv: each input byte read once, a few MiB of memory whatever N,
        # no mapped copies in RSS, and as fast as the mapped "tensor" mode (benchmarks/speed.py)
        mode = "ingredient"
    elif stream == "auto" and exact_soup and not on_cpu and not _fits_on_gpus(2 * len(ckpts) * largest):
        mode = "ingredient"  # the soup reads each input once either way: keep one copy, not N, on the GPU
    # the order a streamed tensor's ingredients are indexed in: the pivot pass, then the steps
    sequence: List[int] = []
    if not exact_soup and pivot[0] == "soup":
        sequence += list(range(len(ckpts)))
    elif not exact_soup and pivot[0] == "index":
        sequence.append(pivot[1])
    sequence += list(range(len(ckpts))) if exact_soup else [j for st in steps for j in st.batch]
    row_pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_ame-row") if (mode == "ingredient" and prefetch) else None
    owner = _assign_shards([sum(plan.entries[n].nbytes for n in shard) for shard in plan.order], dist.world)
    mine = [i for i in infos if owner[plan.entries[i.name].shard] == dist.rank]
    report = MergeReport(Path(output_dir), names, config, str(final_dtype).replace("torch.", ""),
                         tensors=len(mine), steps=len(steps), plan_seconds=time.perf_counter() - t0)
    report.stream = mode
    report.exact_soup = exact_soup
    report.rank, report.world_size = dist.rank, dist.world
    devices = set()
    uploader = DeviceUploader()

    def read(info: TensorInfo) -> Union[List[torch.Tensor], Upload]:
        if mode == "ingredient" and info.is_floating:
            return []  # read one ingredient at a time while merging
        xs = [c.get_tensor(info.name) for c in ckpts]
        if base_ckpt is not None and info.is_floating:
            xs.append(base_ckpt.get_tensor(info.name))
        dev = where(info.name)
        if info.is_floating and dev.type == "cuda":  # upload now, on the prefetch thread, overlapping the merge
            return uploader.upload(xs, dev)
        return xs

    def merge_streamed(info: TensorInfo) -> torch.Tensor:
        """Read one block of every ingredient (os.preadv, no mapping), run every step of every epoch on
        it, move on: each input byte is read once whatever E or the shuffle, and memory holds two
        blocks' slices (~4 MiB each by default, whatever N) + one block's optimizer state + the output."""
        esize = torch.empty((), dtype=info.dtype).element_size()
        per_block = max(64, min(block_size, 16 * block_size // (len(srcs) * esize)))
        bounds = block_bounds(info.numel, per_block)

        def read_block(k: int) -> List[torch.Tensor]:
            return [c.read_flat(info.name, *bounds[k]) for c in srcs]

        def blocks():  # block k + 1 is read on row_pool's thread while block k is merged
            pending = row_pool.submit(read_block, 0) if row_pool is not None else None
            for k in range(len(bounds)):
                xs = pending.result() if pending is not None else read_block(k)
                if pending is not None and k + 1 < len(bounds):
                    pending = row_pool.submit(read_block, k + 1)
                yield xs
                del xs  # merged: only the block being read stays alive

        return merge_in_blocks(blocks(), bounds, info.shape, len(ckpts), config, steps, pivot,
                               out_dtype=target_dtype(info), exact_soup=exact_soup)

    def merge_one(info: TensorInfo, xs: List[torch.Tensor]) -> torch.Tensor:
        dev = where(info.name)
        devices.add(str(dev))
        if mode == "ingredient" and blocks_stream and dev.type == "cpu":
            return merge_streamed(info)
        if mode == "ingredient":
            ing: Sequence[torch.Tensor] = _Row(ckpts, info.name, dev, sequence, row_pool)
            base_x = base_ckpt.get_tensor(info.name, device=dev) if base_ckpt is not None else None
        else:
            ing = xs[:len(ckpts)]
            base_x = xs[len(ckpts)] if base_ckpt is not None else None
            if dev.type != "cpu":
                ing = [x.to(dev, non_blocking=True) for x in ing]
        try:
            # spec case 1 (exact_soup) is exactly the mean, in one pass; a streamed row is read
            # whole per ingredient, so it is never split into blocks
            return merge_tensor(ing, config, steps, pivot, base=base_x, device=dev, out_dtype=target_dtype(info),
                                exact_soup=exact_soup, block_size=None if mode == "ingredient" else block_size)
        finally:
            if isinstance(ing, _Row):
                ing.close()

    def run(tmp: Path) -> None:
        writer = ShardedWriter(tmp, plan, metadata={"merged_with": "hf_ame"},
                               shards=[s for s in range(len(plan.files)) if owner[s] == dist.rank])
        pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_ame-prefetch") if (prefetch and mine) else None
        try:
            pending = pool.submit(read, mine[0]) if pool else None
            bar = tqdm(total=sum(i.nbytes for i in mine), unit="B", unit_scale=True, unit_divisor=1024,
                       desc="hf_ame merge" + (f" [rank {dist.rank}/{dist.world}]" if dist.world > 1 else ""),
                       disable=not progress)
            for k, info in enumerate(mine):
                ts = time.perf_counter()
                xs = pending.result() if pending is not None else read(info)
                if isinstance(xs, Upload):
                    xs = uploader.wait(xs)
                if pool is not None and k + 1 < len(mine):
                    pending = pool.submit(read, mine[k + 1])
                tc = time.perf_counter()
                report.wait_read_seconds += tc - ts
                if info.is_floating:
                    try:
                        result = merge_one(info, xs)
                    except NonFiniteError as exc:
                        raise NonFiniteWeightsError(info.name, [names[j] for j in exc.culprits],
                                                    config.optimizer) from None
                    report.merged_tensors += 1
                else:
                    result = merge_integer(info.name, ckpts, xs[:len(ckpts)], reference, report)
                    report.copied_tensors += 1
                tw = time.perf_counter()
                report.compute_seconds += tw - tc
                writer.write(info.name, result)
                report.write_seconds += time.perf_counter() - tw
                report.parameters += info.numel
                del xs, result
                bar.update(info.nbytes)
            bar.close()
            report.files = writer.finish(write_index=dist.rank == 0)
            report.bytes_written = writer.bytes_written
        except BaseException:
            writer.abort()
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def finalize(tmp: Path) -> None:
        aux = copy_aux_files(ref.files_path, tmp)
        update_config(tmp, final_dtype)
        write_files(tmp, extra_files or {})
        report.files = sorted(set(plan.files) | set(report.files) | set(aux) | set(extra_files or {}))

    try:
        if dist.world == 1:
            with staged_output(output_dir, overwrite, inputs) as tmp:
                run(tmp)
                finalize(tmp)
        else:  # rank 0 stages the folder; every rank writes its shards into it
            error: Optional[BaseException] = None
            if dist.rank == 0:
                with staged_output(output_dir, overwrite, inputs) as tmp:
                    dist.broadcast(str(tmp))
                    try:
                        run(tmp)
                    except BaseException as exc:  # noqa: BLE001 - reported to all ranks below
                        error = exc
                    if not dist.all_ok(error is None):
                        raise error or RuntimeError("another rank failed; see its error")
                    finalize(tmp)
            else:
                tmp = Path(dist.broadcast(None))
                try:
                    run(tmp)
                except BaseException as exc:  # noqa: BLE001
                    error = exc
                if not dist.all_ok(error is None):
                    raise error or RuntimeError("another rank failed; see its error")
            dist.barrier()  # the output is in place for everyone
    finally:
        if row_pool is not None:
            row_pool.shutdown(wait=True, cancel_futures=True)
        report.bytes_read = sum(c.bytes_read for c in ckpts) - read_before + (base_ckpt.bytes_read if base_ckpt else 0)
        for c in ckpts:
            c.close()
        if base_ckpt is not None:
            base_ckpt.close()
    report.devices = sorted(devices)
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
    floating = [i for i in infos if i.is_floating]
    final_dtype = out_dtype or model_dtype(reference)
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
        aux = copy_aux_files(reference.files_path, tmp)
        update_config(tmp, final_dtype)
        write_files(tmp, extra_files or {})
    return sorted(files + aux + list(extra_files or {}))
