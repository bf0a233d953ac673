"""What a merge did: :class:`MergeReport` (times in seconds of wall clock, sizes in bytes)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from .config import AMEConfig

__all__ = ["MergeReport"]


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
    # merged tensors equal to their pivot (base or pivot ingredient) bit for bit while an ingredient differs
    unchanged: List[str] = field(default_factory=list)
    # tensors whose first step over blocks was not kept (hf_ame.first_step: the robust preset capped a
    # model there, or did not converge in one step): merged whole, their copies read again
    merged_whole: List[str] = field(default_factory=list)

    def summary(self) -> str:
        how = ("the exact uniform soup (one pass)" if self.exact_soup else
               (f"method {self.config.method}, " if self.config.method else "")
               + f"{self.steps} {self.config.optimizer} step{'s' if self.steps != 1 else ''} per tensor, "
               f"lr={self.config.lr}")
        rank = (f" [this is rank {self.rank} of {self.world_size}: its share of the tensors]"
                if self.world_size > 1 else "")
        return (f"merged {len(self.ingredients)} ingredients -> {self.output_dir}: {self.tensors} tensors "
                f"({self.parameters / 1e6:.2f}M parameters, {self.merged_tensors} merged, "
                f"{self.copied_tensors} copied), {how}, "
                f"read {self.bytes_read / 2**20:.1f} MiB, wrote {self.bytes_written / 2**20:.1f} MiB "
                f"in {self.seconds:.2f}s "
                f"(waiting for reads {self.wait_read_seconds:.2f}s, merging {self.compute_seconds:.2f}s, "
                f"writing {self.write_seconds:.2f}s)" + rank)
