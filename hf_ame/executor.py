"""The executor: run a :class:`~hf_ame.plan.MergePlan` tensor by tensor into a folder.

It does what the plan says and decides nothing: a reader per tensor (blocks read with
``os.preadv``, the N copies in memory, or one ingredient's copy at a time, each prefetched on a
background thread), the pure merge (:mod:`hf_ame.algorithm`), and the writer, which appends each
merged tensor to its shard at once. Never a whole model in memory. Across processes
(``torchrun`` / ``accelerate launch``) each rank runs its share of the shards into one folder.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from .algorithm import (NonFiniteError, is_exact_soup, load_optimizer_support, needs_optimizer, non_finite_inputs,
                        plan_steps)
from .blocks import all_finite, block_bounds, merge_blocks_on, merge_fused_many, merge_in_blocks, merge_tensor
from .checkpoints import Checkpoint
from .copies import FilledCopies, GatheredRows, LazyCopies
from .emitter import Emitter
from .errors import IncompatibleCheckpointsError, NonFiniteWeightsError
from .first_step import merge_first_step
from .heap import block_heap
from .kernels import fused_supported
from .plan import MergePlan, TensorPlan
from .ranks import Ranks
from .report import MergeReport
from .rows import RowGroup, fill_sources, row_groups, subset_config, subset_pivot
from .threads import merge_threads
from .transfer import DeviceUploader, Upload
from .writer import ShardedWriter

__all__ = ["MergeReport", "run_plan", "run_parts", "write_parts", "merge_integer",
           "unchanged_note"]


def merge_integer(name: str, ckpts: Sequence[Checkpoint], xs: Sequence[torch.Tensor], reference: int,
                  report: MergeReport) -> torch.Tensor:
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


class _Runner:
    """Runs one plan's tensors (this rank's) with the open checkpoints; fills the report."""

    def __init__(self, plan: MergePlan, ckpts: Sequence[Checkpoint], base: Optional[Checkpoint], report: MergeReport):
        self.plan, self.ckpts, self.base, self.report = plan, list(ckpts), base, report
        # the base as the pivot of every tensor; else only as a source of rows ("gather" tensors)
        self.pivot_base = base if (base is not None and plan.pivot.is_base) else None
        self.srcs = self.ckpts + ([base] if self.pivot_base is not None else [])
        self.uploader = DeviceUploader()
        streams_rows = any(t.reader in ("rows", "blocks") for t in plan.tensors)
        self.row_pool = (cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_ame-row")
                         if (plan.prefetch and streams_rows) else None)
        self.devices: set = set()
        self.pool: Optional[cf.ThreadPoolExecutor] = None  # merge workers (hf_ame.threads), set by write_parts
        self.counting = threading.Lock()  # the report's counters, updated by workers merging side by side
        # where merge workers write a tensor's blocks (set by write_all): tensor -> sink(start, block)
        self.sink: Optional[Callable[[TensorPlan], Callable[[int, torch.Tensor], None]]] = None

    def read(self, tp: TensorPlan) -> Union[List[torch.Tensor], Upload]:
        """What is read ahead for a tensor: its copies for the "tensors" reader (uploaded now, on
        the prefetch thread, when merged on a GPU); nothing for streamed readers."""
        if tp.reader != "tensors":
            return []
        if tp.transform == "copy":  # one source tensor, maybe another name (a stacked layer)
            return [self.ckpts[k].get_tensor(n) for k, n in zip(tp.source_models, tp.source_names)]
        xs = [c.get_tensor(tp.name) for c in (self.srcs if tp.transform != "integer" else self.ckpts)]
        dev = torch.device(tp.device)
        if tp.transform != "integer" and dev.type == "cuda":
            return self.uploader.upload(xs, dev)
        return xs

    def read_block(self, name: str, bounds: Sequence[tuple], k: int) -> List[torch.Tensor]:
        """Block k (of ``bounds``) of every source's copy of tensor ``name``, flat."""
        return [c.read_flat(name, *bounds[k]) for c in self.srcs]

    def blocks(self, tp: TensorPlan, bounds: Sequence[tuple]) -> Iterator[List[torch.Tensor]]:
        """Block k of every source; block k + 1 is read on the row pool's thread while k is merged."""
        read_block = functools.partial(self.read_block, tp.name, bounds)
        pool = self.row_pool
        pending = pool.submit(read_block, 0) if pool is not None else None
        for k in range(len(bounds)):
            xs = pending.result() if pending is not None else read_block(k)
            if pending is not None and k + 1 < len(bounds):
                pending = pool.submit(read_block, k + 1)
            yield xs
            del xs  # merged: only the block being read stays alive

    def merge_blocks(self, tp: TensorPlan) -> Optional[torch.Tensor]:
        """Every step of every epoch on one block of all copies, then the next block: each input
        byte read once whatever E or the shuffle; memory: two blocks' slices + one block's state, or with
        merge workers one block's slices and state per worker, each writing its merged block to the
        output (``sink``: nothing returned, no output tensor held)."""
        bounds = block_bounds(tp.numel, tp.block)
        p = self.plan
        # the plan's choice: readers with state (a dequantized or converted tensor kept, a file position) are
        # read one block at a time; positional readers by the workers, which write their merged blocks
        if self.pool is not None and tp.written_by_workers:  # block k read by the worker that merges it
            return merge_blocks_on(self.pool, functools.partial(self.read_block, tp.name, bounds), bounds, tp.shape,
                                   len(self.ckpts), p.config, p.steps, p.pivot, out_dtype=getattr(torch, tp.dtype),
                                   exact_soup=p.exact_soup,
                                   sink=self.sink(tp) if self.sink is not None else None)  # None: assembled
        return merge_in_blocks(self.blocks(tp, bounds), bounds, tp.shape, len(self.ckpts), p.config, p.steps,
                               p.pivot, out_dtype=getattr(torch, tp.dtype), exact_soup=p.exact_soup)

    def first_step_kept(self, tp: TensorPlan) -> bool:
        """A method's first step in one pass over blocks (:mod:`hf_ame.first_step`), each block written
        by the worker that merged it; False: not kept, the tensor is to be merged whole (and the
        report names it). Side by side, the worker merging the tensor runs its blocks itself."""
        bounds, p = block_bounds(tp.numel, tp.block), self.plan  # (the pivot is the soup: the sources are the N)
        if merge_first_step(functools.partial(self.read_block, tp.name, bounds), bounds, len(self.ckpts), p.config,
                            p.steps, self.sink(tp), out_dtype=getattr(torch, tp.dtype), key=tp.name,
                            position=tp.position,
                            pool=None if tp.side_by_side else self.pool):
            return True
        with self.counting:
            self.report.merged_whole.append(tp.name)
        return False

    def merge_group(self, tp: TensorPlan, g: RowGroup, out_dtype: torch.dtype,
                    base_whole: Optional[torch.Tensor]) -> torch.Tensor:
        """One group of rows, merged over the ingredients that hold them (and the base, if it does;
        ``base_whole``: the base's copy of the tensor, read once for all groups)."""
        p, dev = self.plan, torch.device(tp.device)
        copies = GatheredRows([self.ckpts[j] for j in g.members], tp.name, g.rows, dev)
        base_x = None
        if g.base_rows is not None and base_whole is not None:
            base_x = base_whole.index_select(0, g.base_rows).to(dev)
        if not g.members:  # rows only the base has (heads="base")
            return base_x.to(out_dtype)
        if len(g.members) == 1 and base_x is None:  # rows only one ingredient has: its own (mergekit's donor rule)
            if not bool(torch.isfinite(copies[0]).all()):
                raise NonFiniteError([g.members[0]])
            return copies[0].to(out_dtype)
        cfg = subset_config(p.config, g.members)
        exact = is_exact_soup(cfg, len(g.members))
        steps = [] if exact else plan_steps(len(g.members), cfg)
        pivot = subset_pivot(p.pivot, g.members, base_x is not None)
        try:
            return merge_tensor(copies, cfg, steps, pivot, base=base_x, device=dev, out_dtype=out_dtype,
                                exact_soup=exact, block_size=None, key=tp.name, position=tp.position, pool=self.pool)
        except NonFiniteError as exc:
            raise NonFiniteError([g.members[c] for c in exc.culprits]) from None

    def default_rows(self, tp: TensorPlan, srcs: Sequence[Checkpoint]) -> Dict[int, torch.Tensor]:
        """mergekit's default rows (:func:`hf_ame.rows.fill_sources`), each holder's copy read once."""
        rows = self.plan.rows
        names = [c.name for c in srcs]
        plan = fill_sources(rows.map_for(tp.name), names, rows.fill_base, rows.fill_tokens, rows.forced)
        wanted = {n for picks in plan.values() for n, _ in picks}
        if wanted - set(names):  # a token's source outside this merge (another slice's model)
            raise IncompatibleCheckpointsError(f"tensor {tp.name!r}: tokens name {sorted(wanted - set(names))[0]!r} "
                                               f"as a row source, but it is not merged here ({', '.join(names)})")
        sums: Dict[int, torch.Tensor] = {}
        for c in srcs:
            picks = [(r, row) for r, pairs in plan.items() for n, row in pairs if n == c.name]
            x = c.get_tensor(tp.name) if picks else None
            for r, row in picks:
                sums[r] = sums.get(r, 0) + x[row].float()
        width = tuple(tp.shape[1:])
        return {r: (sums[r] / len(p) if p else torch.zeros(width)) for r, p in plan.items()}

    def merge_filled(self, tp: TensorPlan) -> torch.Tensor:
        """A row-matched tensor merged whole, as mergekit merges it: every copy laid out in the output's
        rows, the rows a model lacks filled with mergekit's default rows."""
        p, dev = self.plan, torch.device(tp.device)
        srcs = self.ckpts + ([self.pivot_base] if self.pivot_base is not None else [])
        m, defaults = p.rows.map_for(tp.name), self.default_rows(tp, srcs)
        copies = FilledCopies(self.ckpts, tp.name, m, defaults, dev, p.sequence, self.row_pool, p.rows.forced)
        base_x = (FilledCopies([self.pivot_base], tp.name, m, defaults, dev, forced=p.rows.forced)[0]
                  if self.pivot_base is not None else None)
        try:
            return merge_tensor(copies, p.config, p.steps, p.pivot, base=base_x, device=dev,
                                out_dtype=getattr(torch, tp.dtype), exact_soup=p.exact_soup, block_size=None,
                                key=tp.name, position=tp.position, pool=self.pool)
        finally:
            copies.close()

    def merge_gathered(self, tp: TensorPlan) -> torch.Tensor:
        """A tensor whose rows are matched by key (:mod:`hf_ame.rows`): group by group; rows that no
        ingredient holds (new padding) take the mean of the merged rows."""
        p, dev = self.plan, torch.device(tp.device)
        if p.rows.fill == "mergekit" and p.rows.tensors.get(tp.name) == "vocab":
            return self.merge_filled(tp)
        base = self.base.name if self.base is not None else None
        groups = row_groups(p.rows.map_for(tp.name), [c.name for c in self.ckpts], base)
        out = torch.empty(tp.shape, dtype=getattr(torch, tp.dtype), device=dev)
        filled = [g.out for g in groups if g.members or g.base_rows is not None]
        base_whole = self.base.get_tensor(tp.name) if any(g.base_rows is not None for g in groups) else None
        for g in groups:
            if g.members or g.base_rows is not None:
                out[g.out.to(dev)] = self.merge_group(tp, g, out.dtype, base_whole)
        for g in groups:
            if not g.members and g.base_rows is None:
                out[g.out.to(dev)] = out[torch.cat(filled).to(dev)].float().mean(0).to(out.dtype)
        return out

    def merge_floating(self, tp: TensorPlan, xs: List[torch.Tensor]) -> Optional[torch.Tensor]:
        p, dev, n = self.plan, torch.device(tp.device), len(self.ckpts)
        self.devices.add(str(dev))
        if tp.reader == "gather":
            return self.merge_gathered(tp)
        if tp.reader == "blocks" and not tp.first_step:
            return self.merge_blocks(tp)
        if tp.reader == "blocks" and self.first_step_kept(tp):
            return None
        streamed = tp.reader != "tensors"  # "rows", or a first step over blocks not kept: one copy at a time
        if streamed:
            ing: Sequence[torch.Tensor] = LazyCopies(self.ckpts, tp.name, dev, p.sequence, self.row_pool)
            base_x = self.pivot_base.get_tensor(tp.name, device=dev) if self.pivot_base is not None else None
        else:
            ing = xs[:n] if dev.type == "cpu" else [x.to(dev, non_blocking=True) for x in xs[:n]]
            base_x = xs[n] if self.pivot_base is not None else None
        try:
            # a streamed row is read whole per ingredient, so it is never split into blocks
            out = merge_tensor(ing, p.config, p.steps, p.pivot, base=base_x, device=dev,
                               out_dtype=getattr(torch, tp.dtype), exact_soup=p.exact_soup,
                               block_size=None if streamed else p.block_size,
                               key=tp.name, position=tp.position, pool=self.pool)
            self.check_moved(tp.name, out, ing, base_x)
            return out
        finally:
            if isinstance(ing, LazyCopies):
                ing.close()

    def check_moved(self, name: str, out: torch.Tensor, ing: Sequence[torch.Tensor],
                    base_x: Optional[torch.Tensor]) -> None:
        """Record ``name`` in ``report.unchanged`` when the merge returned its pivot (the base, or the pivot
        ingredient when its copy is in memory) bit for bit although an ingredient differs from it: the
        signature of a lost task vector (a half-precision step under the weights' ulp, a zero weight)."""
        kind, idx = self.plan.pivot
        pivot = base_x if kind == "base" else (ing[idx] if kind == "index" and isinstance(ing, list) else None)
        if pivot is None or not torch.equal(out, pivot.to(device=out.device, dtype=out.dtype)):
            return
        if any(not torch.equal(ing[j].to(pivot.device), pivot) for j in range(len(ing)) if kind != "index" or j != idx):
            self.report.unchanged.append(name)

    def merge_together(self, members: Sequence[Tuple[TensorPlan, List[torch.Tensor]]]) -> List[Optional[torch.Tensor]]:
        """A group of small tensors (:mod:`hf_ame.groups`): one kernel launch per soup and per step for
        all of them; one by one if their copies turn out not to suit the kernels (a reader that
        converts them, say)."""
        p, n = self.plan, len(self.ckpts)
        groups = [xs[:n] for _, xs in members]
        bases = [xs[n] if self.pivot_base is not None else None for _, xs in members]
        dev = torch.device(members[0][0].device)
        first = members[0][1][0]  # every copy of every member in its dtype, on its device
        if not all(fused_supported(p.config, dev, [first, *xs]) for _, xs in members):
            return [self.merge(tp, xs) for tp, xs in members]
        self.devices.add(str(dev))
        outs = merge_fused_many(groups, p.config, p.steps, p.pivot, bases=bases,
                                out_dtype=getattr(torch, members[0][0].dtype), exact_soup=p.exact_soup)
        for (tp, _), out, g, b in zip(members, outs, groups, bases):
            if not all_finite(out):
                raise self.non_finite(tp.name, non_finite_inputs(g))
            self.check_moved(tp.name, out, g, b)
        with self.counting:
            self.report.merged_tensors += len(members)
        return list(outs)

    def non_finite(self, name: str, culprits: Sequence[int]) -> NonFiniteWeightsError:
        """The error for a tensor whose merge holds NaN or Inf: its ingredients at fault, by name."""
        p = self.plan
        return NonFiniteWeightsError(name, [self.ckpts[j].name for j in culprits],
                                     None if p.exact_soup else p.config.optimizer)

    def merge(self, tp: TensorPlan, xs: List[torch.Tensor]) -> Optional[torch.Tensor]:
        if tp.transform == "copy":
            self.report.copied_tensors += 1
            out = xs[0].to(getattr(torch, tp.dtype))
            if tp.scale is not None and tp.scale != 1:  # mergekit's passthrough scale: on the tensor as loaded
                out = (out.to(torch.promote_types(out.dtype, torch.float32)) * tp.scale).to(out.dtype)
            return out
        if tp.transform == "integer":
            self.report.copied_tensors += 1
            return merge_integer(tp.name, self.ckpts, xs, self.plan.reference, self.report)
        try:
            out = self.merge_floating(tp, xs)
        except NonFiniteError as exc:  # the culprits, by name, or the merge itself overflowed
            raise self.non_finite(tp.name, exc.culprits) from None
        with self.counting:
            self.report.merged_tensors += 1
        return out

    def run(self, folder: Path, progress: bool) -> None:
        """Merge and write this rank's tensors into ``folder``; the index is rank 0's to write."""
        plan = self.plan
        write_parts(folder, plan, [(self, None)], progress,
                    "hf_ame merge" + (f" [rank {plan.rank}/{plan.world_size}]" if plan.world_size > 1 else ""))

    def merge_and_emit(self, members: Sequence[Tuple[TensorPlan, List[torch.Tensor]]], emit: Emitter) -> None:
        """Merge on this thread (one tensor, or a group of small ones together) and hand over in order."""
        tc = time.perf_counter()
        results = self.merge_together(members) if members[0][0].group >= 0 else [self.merge(*members[0])]
        self.report.compute_seconds += time.perf_counter() - tc
        for (tp, _), result in zip(members, results):
            emit(tp, result)

    def write_all(self, writer: ShardedWriter, bar: tqdm, rename: Optional[Callable[[str], str]] = None) -> None:
        """Merge this rank's tensors in order and hand each to ``writer``, under ``rename(name)`` when
        given (a part of a combined output). With prefetch, tensor k + 1 is read ahead while k merges,
        and k is written on its own thread while k + 1 merges (one tensor waits to be written). Tensors
        the plan marks ``side_by_side`` are merged on the merge workers, up to one per worker at once,
        and written in plan order; a group of small tensors (``group``) is merged together once its
        last tensor is read, and written then."""
        mine, report = self.plan.mine(), self.report
        ahead = self.plan.prefetch and bool(mine)
        pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_ame-prefetch") if ahead else None
        out = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_ame-write") if ahead else None
        emit = Emitter(writer, out, bar, rename, report)
        self.sink = lambda tp: functools.partial(writer.write_part, emit.name(tp))
        inflight: Deque[Tuple[TensorPlan, cf.Future]] = collections.deque()
        together: Dict[int, List[Tuple[TensorPlan, List[torch.Tensor]]]] = {}  # groups' tensors read so far
        last = {tp.group: k for k, tp in enumerate(mine) if tp.group >= 0}  # merged once their last is read
        width = getattr(self.pool, "width", 1)
        try:
            pending = pool.submit(self.read, mine[0]) if pool else None
            for k, tp in enumerate(mine):
                ts = time.perf_counter()
                xs = pending.result() if pending is not None else self.read(tp)
                if isinstance(xs, Upload):
                    xs = self.uploader.wait(xs)
                if pool is not None and k + 1 < len(mine):
                    pending = pool.submit(self.read, mine[k + 1])
                report.wait_read_seconds += time.perf_counter() - ts
                if tp.side_by_side and self.pool is not None:
                    inflight.append((tp, self.pool.submit(self.merge, tp, xs)))
                    while len(inflight) > width:  # every worker busy and one waiting (its copies read)
                        emit.finished(*inflight.popleft())
                else:
                    while inflight:
                        emit.finished(*inflight.popleft())
                    together.setdefault(tp.group, []).append((tp, xs))
                    if tp.group < 0 or last[tp.group] == k:
                        self.merge_and_emit(together.pop(tp.group), emit)
                del xs
            while inflight:
                emit.finished(*inflight.popleft())
            emit.close()
        finally:
            for _, f in inflight:
                f.cancel()
            cf.wait([f for _, f in inflight])
            for p in (pool, out):
                if p is not None:
                    p.shutdown(wait=True, cancel_futures=True)
        order = {tp.name: k for k, tp in enumerate(mine)}  # workers finish out of order: name them in plan order
        for names in (report.unchanged, report.merged_whole):
            names.sort(key=lambda name: order.get(name, len(order)))

    def close(self) -> None:
        if self.row_pool is not None:
            self.row_pool.shutdown(wait=True, cancel_futures=True)


def run_plan(plan: MergePlan, ckpts: Sequence[Checkpoint], base: Optional[Checkpoint], ranks: Ranks,
             stage: Callable[[], Any], finalize: Callable[[Path], None], *, progress: bool = True) -> MergeReport:
    """Execute ``plan`` into the folder ``stage()`` yields (a context manager: a staged output),
    calling ``finalize(folder)`` once every rank's weights are in (config, tokenizer, extra files).
    With several ranks, rank 0 stages the folder and broadcasts its path; a failure on any rank
    fails all of them before the folder is moved into place."""
    report = MergeReport(plan.output_dir, list(plan.ingredients), plan.config, plan.dtype, tensors=len(plan.mine()),
                         steps=len(plan.steps), stream=plan.stream, rank=plan.rank, world_size=plan.world_size,
                         exact_soup=plan.exact_soup)
    runner = _Runner(plan, ckpts, base, report)
    try:
        if ranks.world == 1:
            with stage() as tmp:
                runner.run(tmp, progress)
                finalize(tmp)
        elif ranks.rank == 0:
            with stage() as tmp:
                ranks.broadcast(str(tmp))
                _run_ranked(runner, tmp, progress, ranks)
                finalize(tmp)
            ranks.barrier()  # the output is in place for everyone
        else:
            _run_ranked(runner, Path(ranks.broadcast(None)), progress, ranks)
            ranks.barrier()
    finally:
        runner.close()
    report.devices = sorted(runner.devices)
    warn_unchanged(report)
    return report


def unchanged_note(report: MergeReport) -> Optional[str]:
    """One line naming the merged tensors that came out equal to their pivot (None if none did)."""
    names = report.unchanged
    if not names:
        return None
    return (f"{len(names)} of {report.merged_tensors} merged tensor(s) equal the pivot ({report.config.pivot}) "
            f"bit for bit although the ingredients differ from it: {', '.join(names[:5])}"
            + (", ..." if len(names) > 5 else ""))


def warn_unchanged(report: MergeReport) -> None:
    note = unchanged_note(report)
    if note is not None:
        warnings.warn(note, stacklevel=3)


def write_parts(folder: Path, plan: MergePlan, parts: Sequence[Tuple["_Runner", Optional[Callable[[str], str]]]],
                progress: bool, desc: str = "hf_ame merge") -> None:
    """One writer laid out by ``plan`` (this rank's shards), fed by each runner in turn (its tensors
    renamed by its function, if any); one progress bar over ``plan``'s bytes. The first runner's
    report gets the files and bytes written; the index is rank 0's to write."""
    writer = ShardedWriter(folder, plan.shards, metadata={"merged_with": "hf_ame"},
                           shards=[s for s, r in enumerate(plan.shard_ranks) if r == plan.rank])
    bar = tqdm(total=sum(t.write_bytes for t in plan.mine()), unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
               disable=not progress)
    try:
        if any(needs_optimizer(r.plan.config, r.plan.steps) for r, _ in parts):
            load_optimizer_support()  # before the workers start (see there)
        with merge_threads() as pool, block_heap():
            for runner, rename in parts:
                runner.pool = pool
                runner.write_all(writer, bar, rename)
        bar.close()
        report = parts[0][0].report
        report.files = writer.finish(write_index=plan.rank == 0)
        report.bytes_written = writer.bytes_written
    except BaseException:
        writer.abort()
        raise


def run_parts(parts: Sequence[Tuple[MergePlan, Sequence[Checkpoint], Optional[Checkpoint], Callable[[str], str]]],
              plan: MergePlan, stage: Callable[[], Any], finalize: Callable[[Path], None], *,
              progress: bool = True) -> MergeReport:
    """Execute several plans (each with its checkpoints, base and renaming) into the one output
    ``plan`` lays out (:func:`hf_ame.plan.combine_plans`): one staged folder, one writer, each
    tensor written once; then ``finalize(folder)``. One process."""
    report = MergeReport(plan.output_dir, list(plan.ingredients), plan.config, plan.dtype, tensors=len(plan.tensors),
                         steps=len(plan.steps), stream=plan.stream, exact_soup=plan.exact_soup)
    runners = [_Runner(p, c, b, report) for p, c, b, _ in parts]
    try:
        with stage() as tmp:
            write_parts(tmp, plan, [(r, part[3]) for r, part in zip(runners, parts)], progress)
            finalize(tmp)
    finally:
        for r in runners:
            r.close()
    report.devices = sorted(set().union(*(r.devices for r in runners)))
    warn_unchanged(report)
    return report


def _run_ranked(runner: _Runner, folder: Path, progress: bool, ranks: Ranks) -> None:
    error: Optional[BaseException] = None
    try:
        runner.run(folder, progress)
    except BaseException as exc:  # noqa: BLE001 - reported to all ranks below
        error = exc
    if not ranks.all_ok(error is None):
        raise error or RuntimeError("another rank failed; see its error")
