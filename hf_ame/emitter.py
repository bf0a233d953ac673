"""Merged tensors handed to the writer in plan order, the previous one written on its own thread
while the next merges (:mod:`hf_ame.executor`)."""
from __future__ import annotations

import concurrent.futures as cf
import time
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .plan import TensorPlan
from .report import MergeReport
from .writer import ShardedWriter

__all__ = ["Emitter", "hand_over"]


def hand_over(writer: ShardedWriter, out: Optional[cf.ThreadPoolExecutor], written: Optional[cf.Future], name: str,
              tensor: torch.Tensor) -> Optional[cf.Future]:
    """Write ``tensor`` now, or on ``out``'s thread once the previous write (``written``) is done."""
    if out is None:
        writer.write(name, tensor)
        return None
    if written is not None:
        written.result()  # its error, if any, surfaces here; and at most one tensor waits
    return out.submit(writer.write, name, tensor)


class Emitter:
    """Hands merged tensors to the writer in plan order (the executor's ``write_all``): now, or on
    ``out``'s thread once the previous write is done; counts the time and the progress."""

    def __init__(self, writer: ShardedWriter, out: Optional[cf.ThreadPoolExecutor], bar: tqdm,
                 rename: Optional[Callable[[str], str]], report: MergeReport):
        self.writer, self.out, self.bar, self.rename, self.report = writer, out, bar, rename, report
        self.written: Optional[cf.Future] = None

    def name(self, tp: TensorPlan) -> str:
        """The tensor's name in the output."""
        return self.rename(tp.name) if self.rename is not None else tp.name

    def __call__(self, tp: TensorPlan, tensor: Optional[torch.Tensor]) -> None:
        """``tensor`` written (None: its blocks are in already, written by the merge workers)."""
        tw = time.perf_counter()
        if tensor is None:
            self.close()  # the previous tensor first: it may be the last but one of the same shard
            self.writer.written(self.name(tp))
        else:
            self.written = hand_over(self.writer, self.out, self.written, self.name(tp), tensor)
        self.report.write_seconds += time.perf_counter() - tw
        self.report.parameters += tp.numel
        self.bar.update(tp.write_bytes)

    def finished(self, tp: TensorPlan, merging: cf.Future) -> None:
        """A tensor merged on a worker: waited for (its error raised here, in plan order), then written."""
        tc = time.perf_counter()
        result = merging.result()
        self.report.compute_seconds += time.perf_counter() - tc
        self(tp, result)

    def close(self) -> None:
        """Wait for the last write."""
        if self.written is not None:
            tw = time.perf_counter()
            self.written.result()
            self.written = None
            self.report.write_seconds += time.perf_counter() - tw
