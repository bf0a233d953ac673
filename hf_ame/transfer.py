"""Host -> GPU copies of ingredient tensors that overlap the merge of the previous tensor.

The engine's prefetch thread reads tensor k+1 of every ingredient while tensor k is merged. For
a CUDA target it also uploads them: each copy is staged in pinned host memory (torch's caching
host allocator, so buffers are reused) and sent with ``non_blocking=True`` on a side stream of
that device; the merge's stream waits on an event before it uses them. Without this the copies
would run from pageable memory on the merge's own stream, one after the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

__all__ = ["Upload", "DeviceUploader"]


@dataclass
class Upload:
    """Tensors on their way to ``device``; :meth:`DeviceUploader.wait` hands them over."""

    tensors: List[torch.Tensor]
    device: torch.device
    event: "torch.cuda.Event"


class DeviceUploader:
    """One side stream per CUDA device; ``upload`` from any thread, ``wait`` on the merging one."""

    def __init__(self) -> None:
        self._streams: Dict[torch.device, "torch.cuda.Stream"] = {}

    def upload(self, tensors: Sequence[torch.Tensor], device: torch.device) -> Upload:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            out = [t.pin_memory().to(device, non_blocking=True) if t.device.type == "cpu" else t.to(device)
                   for t in tensors]
            event = torch.cuda.Event()
            event.record(stream)
        return Upload(out, device, event)

    @staticmethod
    def wait(upload: Upload) -> List[torch.Tensor]:
        """The uploaded tensors, safe to use on the current stream of their device."""
        current = torch.cuda.current_stream(upload.device)
        current.wait_event(upload.event)
        for t in upload.tensors:
            t.record_stream(current)  # the allocator must not reuse them before the merge is done
        return upload.tensors
