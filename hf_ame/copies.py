"""The N copies of one tensor, read lazily: what a merge indexes instead of a list of tensors
when it must not hold every copy at once (the "rows" and "gather" readers of :mod:`hf_ame.plan`).
``copies[j]`` reads ingredient j's copy (or some of its rows) when asked, the next one in the
expected order prefetched on a background thread: at most two copies in memory, whatever N."""
from __future__ import annotations

import concurrent.futures as cf
from typing import List, Mapping, Optional, Sequence

import torch

from .checkpoints import Checkpoint
from .rows import RowMap

__all__ = ["LazyCopies", "GatheredRows", "FilledCopies"]


class LazyCopies:
    """Ingredient j's copy of one tensor, read from disk when indexed (the "rows" reader).

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


class GatheredRows(LazyCopies):
    """Some rows of one tensor from each of a few checkpoints (a :class:`~hf_ame.rows.RowGroup`),
    read when indexed, one checkpoint at a time (the last one kept for the next step)."""

    def __init__(self, ckpts: Sequence[Checkpoint], name: str, rows: Sequence[torch.Tensor], device: torch.device):
        super().__init__(ckpts, name, device)
        self.rows = list(rows)

    def _read(self, j: int) -> torch.Tensor:
        return self.ckpts[j].read_rows(self.name, self.rows[j]).to(self.device)


class FilledCopies(LazyCopies):
    """Each checkpoint's copy of a row-matched tensor laid out in the output's rows, the keyed rows it
    lacks filled with ``defaults`` (output row -> row) and new padding rows with its own mean row
    (mergekit's ``PermutedVocabulary``); read when indexed, the next in ``sequence`` prefetched."""

    def __init__(self, ckpts: Sequence[Checkpoint], name: str, row_map: RowMap, defaults: Mapping[int, torch.Tensor],
                 device: torch.device, sequence: Sequence[int] = (), pool: Optional[cf.ThreadPoolExecutor] = None,
                 forced: Sequence[int] = ()):
        super().__init__(ckpts, name, device, sequence, pool)
        self.row_map, self.defaults, self.forced = row_map, defaults, list(forced)
        self.keyed = torch.tensor([k is not None for k in row_map.keys])  # once, not per read

    def _read(self, j: int) -> torch.Tensor:
        x, m, keyed = self.ckpts[j].get_tensor(self.name), self.row_map, self.keyed
        idx = torch.tensor(m.sources[self.ckpts[j].name], dtype=torch.long)
        out = torch.zeros((m.rows, *x.shape[1:]), dtype=x.dtype)
        have = idx >= 0  # its own rows, padding matched by position included
        have[self.forced] = False  # every model takes the forced rows' defaults
        out[have] = x[idx[have]]
        for r, row in self.defaults.items():
            if not bool(have[r]):
                out[r] = row.to(x.dtype)
        pad = ~keyed & ~have  # new padding (pad_to_multiple_of): this model's mean row, as mergekit pads
        if bool(pad.any()):
            out[pad] = out[keyed].float().mean(0).to(x.dtype)
        return out.to(self.device)
