"""The peft LoRA adapter being built (:mod:`hf_ame.lora_out`): a delta factored by truncated SVD,
each module's ``lora_A`` / ``lora_B`` (or ``lora_embedding_A`` / ``_B``) tensors under peft's key
names, modules saved whole, and the adapter folder written (``adapter_config.json`` +
``adapter_model.safetensors``)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Mapping, Optional, Tuple

import torch

from .errors import IncompatibleCheckpointsError

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX", "AdapterBuilder", "lora_keys", "svd_factors"]

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------- factoring
def svd_factors(delta: torch.Tensor, rank: int, distribute: bool) -> Tuple[torch.Tensor, torch.Tensor, float, float]:
    """Truncated SVD of a 2-D float32 delta: (A [r, in], B [out, r], ||delta - B A||_F, optimal error).
    ``distribute``: sqrt(S) on both sides (mergekit), else S on B (peft's svd)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.shape[0])
    if distribute:
        root = s[:r].sqrt()
        a, b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
    else:
        a, b = vh[:r].clone(), u[:, :r] * s[None, :r]
    optimal = float(s[r:].double().square().sum().sqrt())
    return a.contiguous(), b.contiguous(), float(torch.linalg.matrix_norm(delta - b @ a)), optimal


def lora_keys(module: str, embedding: bool) -> Tuple[str, str]:
    """peft's keys of ``module``'s A and B factors (``lora_embedding_A/B`` for an embedding)."""
    if embedding:
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


class AdapterBuilder:
    """An adapter being built: its tensors, each module's rank, modules saved whole."""

    def __init__(self, dtype: Optional[torch.dtype]):
        self.dtype, self.tensors, self.ranks, self.saved, self.errors = dtype, {}, {}, [], {}
        self.embeddings: List[str] = []
        self.lora_bias = False

    def add(self, module: str, a: torch.Tensor, b: torch.Tensor, embedding: bool = False) -> None:
        ka, kb = lora_keys(module, embedding)
        self.tensors[ka], self.tensors[kb] = self._cast(a), self._cast(b)
        self.ranks[module] = a.shape[0]
        if embedding:
            self.embeddings.append(module)

    def save_whole(self, module: str, params: Mapping[str, torch.Tensor]) -> None:
        for p, t in params.items():
            self.tensors[f"{PEFT_PREFIX}{module}.{p}"] = t.to(self.dtype) if self.dtype is not None else t
        self.saved.append(module)

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype or torch.float32).contiguous()

    def write(self, folder: Path, base_name: str, task_type: Optional[str], fan_in_fan_out: bool = False) -> int:
        """adapter_config.json (a peft LoraConfig: r = the largest rank, lora_alpha = r so the scaling
        is 1; modules of other ranks in rank_pattern / alpha_pattern) and adapter_model.safetensors."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        r = max(self.ranks.values(), default=1)
        pattern = {re.escape(m): k for m, k in self.ranks.items() if k != r}  # full names, matched as regexes
        cfg = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(self.ranks) or None, rank_pattern=pattern,
                         alpha_pattern=dict(pattern), modules_to_save=self.saved or None, lora_dropout=0.0,
                         fan_in_fan_out=fan_in_fan_out, bias="none", task_type=task_type, inference_mode=True,
                         base_model_name_or_path=base_name, lora_bias=self.lora_bias)
        if not self.ranks and not self.saved:
            raise IncompatibleCheckpointsError("the model equals its base in every tensor: there is no LoRA to write")
        cfg.save_pretrained(str(folder))
        save_file(self.tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
