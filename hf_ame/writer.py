"""Sharded safetensors output, written tensor by tensor.

The shard plan (which tensor goes to which file, at which offset) is fixed from the headers
before the merge, so each shard's header is written first and every merged tensor is appended
as soon as it exists: output memory is one tensor, not one shard. Files are standard
safetensors (``safe_open`` / ``load_file`` / transformers read them).
"""
from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .checkpoints import DTYPE_TO_SAFETENSORS
from .output import write_error

__all__ = ["ShardPlan", "plan_shards", "ShardedWriter", "parse_size"]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def parse_size(size: Union[int, str]) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, ints pass through (bytes), as transformers does."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size: expected a positive size, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.I)
    if not m:
        raise ValueError(f"max_shard_size: expected a size like '5GB' or '500MiB', got {size!r}")
    num, unit = float(m.group(1)), (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    value = int(num * mult)
    if value <= 0:
        raise ValueError(f"max_shard_size: expected a positive size, got {size!r}")
    return value


@dataclass
class _Entry:
    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    nbytes: int
    shard: int = 0
    begin: int = 0


@dataclass
class ShardPlan:
    """Where each output tensor goes. ``files[i]`` is shard i's file name."""

    entries: Dict[str, _Entry]
    files: List[str]
    order: List[List[str]] = field(default_factory=list)  # tensor names per shard, in write order

    @property
    def total_size(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def weight_map(self) -> Dict[str, str]:
        return {n: self.files[e.shard] for n, e in self.entries.items()}


def plan_shards(tensors: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]],
                max_shard_size: Union[int, str]) -> ShardPlan:
    """Greedy split in the given order, like transformers' ``save_pretrained``: a shard is closed
    when the next tensor would push it past ``max_shard_size`` (a larger tensor gets its own)."""
    limit = parse_size(max_shard_size)
    entries: Dict[str, _Entry] = {}
    shards: List[List[str]] = [[]]
    used = 0
    for name, dtype, shape in tensors:
        n = 1
        for d in shape:
            n *= d
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        e = _Entry(name, dtype, tuple(shape), nbytes, shard=len(shards) - 1, begin=used)
        entries[name] = e
        shards[-1].append(name)
        used += nbytes
    if len(shards) == 1:
        files = [SAFE_WEIGHTS_NAME]
    else:
        k = len(shards)
        files = [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
    return ShardPlan(entries, files, shards)


class ShardedWriter:
    """Writes the tensors of a :class:`ShardPlan` into ``folder`` in any order.

    Each shard's header is written when the shard is opened; each tensor's bytes go to their
    planned offset, whole (:meth:`write`) or in parts from several threads (:meth:`write_part`,
    then :meth:`written`). A shard is closed as soon as all its tensors are in.
    """

    def __init__(self, folder: Union[str, Path], plan: ShardPlan, metadata: Optional[Dict[str, str]] = None,
                 shards: Optional[Sequence[int]] = None):
        self.folder = Path(folder)
        self.plan = plan
        self.metadata = {"format": "pt", **(metadata or {})}
        self._files: Dict[int, BinaryIO] = {}
        self._data_start: Dict[int, int] = {}
        # the shards this writer owns (a multi-process merge splits them over ranks)
        self.shards = list(range(len(plan.order))) if shards is None else list(shards)
        self._remaining = [set(names) if i in self.shards else set() for i, names in enumerate(plan.order)]
        self.bytes_written = 0
        self._lock = threading.Lock()  # files opened and closed, bytes counted: parts come from several threads

    def _open(self, shard: int) -> BinaryIO:
        f = self._files.get(shard)
        if f is not None:
            return f
        header: Dict[str, object] = {"__metadata__": self.metadata}
        for name in self.plan.order[shard]:
            e = self.plan.entries[name]
            header[name] = {"dtype": DTYPE_TO_SAFETENSORS[e.dtype], "shape": list(e.shape),
                            "data_offsets": [e.begin, e.begin + e.nbytes]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        f = open(self.folder / self.plan.files[shard], "wb")
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.flush()  # on disk before any part is written beside the buffer (write_part)
        self._files[shard] = f
        self._data_start[shard] = 8 + len(raw)
        return f

    def write(self, name: str, tensor: torch.Tensor) -> None:
        e = self.plan.entries[name]
        if tensor.dtype != e.dtype or tuple(tensor.shape) != e.shape:
            raise ValueError(f"tensor {name!r}: planned {e.dtype} {e.shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        t = tensor.detach().to("cpu").contiguous()
        try:
            with self._lock:
                f = self._open(e.shard)
            f.seek(self._data_start[e.shard] + e.begin)
            if t.numel():
                # A uint8 view of the same storage: no copy beyond the device transfer above.
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        except OSError as exc:  # a full disk: say which file
            raise write_error(exc, self.folder / self.plan.files[e.shard]) from None
        self.written(name)

    def write_part(self, name: str, start: int, part: torch.Tensor) -> None:
        """Elements [start, start + part.numel()) of tensor ``name`` (flat), written at their offset
        with ``os.pwrite``: blocks of one tensor may come from several threads at once; call
        :meth:`written` once every part is in."""
        e = self.plan.entries[name]
        esize = part.element_size()
        if part.dtype != e.dtype or (start + part.numel()) * esize > e.nbytes or start < 0:
            raise ValueError(f"tensor {name!r}: planned {e.dtype} {e.shape}, got {part.dtype} elements "
                             f"[{start}, {start + part.numel()})")
        view = memoryview(part.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        try:
            with self._lock:
                f = self._open(e.shard)
            pos = self._data_start[e.shard] + e.begin + start * esize
            while len(view):
                done = os.pwrite(f.fileno(), view, pos)
                view, pos = view[done:], pos + done
        except OSError as exc:
            raise write_error(exc, self.folder / self.plan.files[e.shard]) from None

    def written(self, name: str) -> None:
        """Tensor ``name`` is complete: counted, and its shard closed once all of its tensors are."""
        e = self.plan.entries[name]
        with self._lock:
            self.bytes_written += e.nbytes
            self._remaining[e.shard].discard(name)
            f = self._files.pop(e.shard) if not self._remaining[e.shard] else None
        if f is not None:
            try:
                f.close()
            except OSError as exc:
                raise write_error(exc, self.folder / self.plan.files[e.shard]) from None

    def finish(self, write_index: bool = True) -> List[str]:
        """Check every owned tensor was written, close files, write the index if sharded (and
        ``write_index``); returns the file names written."""
        left = [n for s in self._remaining for n in s]
        if left:
            raise RuntimeError(f"output is missing {len(left)} tensor(s), e.g. {left[0]!r}")
        for shard in list(self._files):
            try:
                self._files.pop(shard).close()
            except OSError as exc:
                raise write_error(exc, self.folder / self.plan.files[shard]) from None
        for shard, names in enumerate(self.plan.order):
            if not names and shard in self.shards:  # an empty model still gets a valid (empty) file
                self._open(shard)
                self._files.pop(shard).close()
        files = [self.plan.files[i] for i in self.shards]
        if len(self.plan.files) > 1 and write_index:
            index = {"metadata": {"total_size": self.plan.total_size}, "weight_map": self.plan.weight_map()}
            (self.folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            files.append(SAFE_WEIGHTS_INDEX_NAME)
        return files

    def abort(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except OSError:  # the write failed already (a full disk): that error is the one reported
                pass
        self._files.clear()
