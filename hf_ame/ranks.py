"""This process's place in a multi-process merge (``torchrun`` / ``accelerate launch``): each rank
merges its share of the shards into one folder (:mod:`hf_ame.executor`)."""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as torch_dist

__all__ = ["Ranks"]


class Ranks:
    """This process's place in a multi-process merge (torch.distributed, as set up by
    ``accelerate launch`` or ``torchrun``); world size 1 otherwise."""

    def __init__(self, enabled: Optional[bool]):
        self.world, self.rank, self.pg = 1, 0, False
        want = enabled if enabled is not None else int(os.environ.get("WORLD_SIZE", "1")) > 1
        if not want:
            return
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend="gloo")
        self.world, self.rank, self.pg = torch_dist.get_world_size(), torch_dist.get_rank(), True

    def local_device(self) -> Optional[torch.device]:
        """One GPU per rank, as ``accelerate launch --multi_gpu`` sets up (None: no GPU or one process)."""
        if self.world > 1 and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)) % torch.cuda.device_count())
        return None

    def broadcast(self, obj: Any) -> Any:
        if not self.pg:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_ok(self, ok: bool) -> bool:
        if not self.pg:
            return ok
        flag = torch.tensor([1 if ok else 0])
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MIN)
        return bool(flag.item())

    def barrier(self) -> None:
        if self.pg:
            torch_dist.barrier()
