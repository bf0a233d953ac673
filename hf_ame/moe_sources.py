"""Where a mixture of experts' slots read their tensors (:mod:`hf_ame.moe`): an expert's checkpoint
with mergekit's noise and residual scaling applied on read, and the tensors computed in memory (the
router vectors, zero biases) with headers that plan like any checkpoint's."""
from __future__ import annotations

import zlib
from typing import Dict, Tuple, Union

import torch

from .checkpoints import Checkpoint, TensorInfo
from .moe_config import Expert

__all__ = ["ExpertSource", "ComputedSource"]


class ExpertSource:
    """An expert's checkpoint as its slots read it: mergekit's ``noise_scale`` (Gaussian noise on
    every MLP tensor, drawn from a generator seeded by the seed, the expert and the tensor name) and
    ``residual_scale`` (``down_proj`` multiplied), on the tensor as stored, as mergekit applies them."""

    def __init__(self, ckpt: Checkpoint, expert: Expert, seed: int, label: str):
        self.ckpt, self.expert, self.seed, self.label = ckpt, expert, seed, label
        self.name, self.tensors, self.path, self.files_path = ckpt.name, ckpt.tensors, ckpt.path, ckpt.files_path

    @property
    def bytes_read(self) -> int:
        return self.ckpt.bytes_read

    def get_tensor(self, name: str, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        t = self.ckpt.get_tensor(name, device)
        e = self.expert
        if e.noise_scale is not None:
            gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{self.label}/{name}".encode()))
            t = t + torch.randn(t.shape, generator=gen, dtype=t.dtype) * e.noise_scale
        if e.residual_scale is not None and "down_proj" in name:
            t = t * e.residual_scale
        return t

    def close(self) -> None:
        self.ckpt.close()


class ComputedSource:
    """Tensors made here, not read: the router vectors (set once computed) and zero biases. Its
    headers exist from the plan on, so the copies plan them like any other source."""

    name = "(computed)"
    bytes_read = 0

    def __init__(self) -> None:
        self.tensors: Dict[str, TensorInfo] = {}
        self.values: Dict[str, torch.Tensor] = {}

    def declare(self, name: str, dtype: torch.dtype, shape: Tuple[int, ...]) -> None:
        self.tensors[name] = TensorInfo(name, dtype, tuple(shape), "(computed)")

    def get_tensor(self, name: str, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        if name not in self.values:
            raise RuntimeError(f"tensor {name!r} has not been computed yet")
        return self.values[name].to(device)

    def close(self) -> None:
        pass
