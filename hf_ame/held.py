"""Ingredients held in memory once, merged again and again (``merge(search=...)`` on small models).

A search scores many configs of the same ingredients. When every ingredient's floating tensors
together fit in ``limit`` bytes, they are read once into memory and each trial is merged there
(:func:`~hf_ame.algorithm.ame_merge_many`, the exact soup for trial 0) and scored through an
in-memory model, with no files written until the kept trial. Larger merges stream each trial from
the files instead. The merged tensors equal a streamed merge's, bit for bit (the same steps, keys,
layer positions and exact soup).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .algorithm import ame_merge_many, is_exact_soup, soup
from .checkpoints import Checkpoint
from .config import AMEConfig
from .methods import layer_positions

__all__ = ["HeldIngredients", "held_bytes", "HELD_LIMIT"]

HELD_LIMIT = 2 * 1024 ** 3  # bytes: "small" ingredients (all copies of every floating tensor) are held in memory


def held_bytes(ckpts: Sequence[Checkpoint], base: Optional[Checkpoint] = None) -> int:
    """Bytes of every floating tensor of every ingredient (and the base), from the headers."""
    return sum(i.nbytes for c in list(ckpts) + ([base] if base is not None else []) for i in c.tensors.values()
               if i.is_floating)


@dataclass
class HeldIngredients:
    """Every floating tensor of every ingredient in memory (stored dtypes), keyed by file name."""

    names: List[str]
    copies: List[List[torch.Tensor]]  # copies[k][j]: ingredient j's tensor names[k]
    bases: Optional[List[torch.Tensor]]
    positions: List[float]
    ingredient_names: List[str]

    @classmethod
    def read(cls, ckpts: Sequence[Checkpoint], base: Optional[Checkpoint] = None) -> "HeldIngredients":
        ref = ckpts[0]
        names = [n for n, i in ref.tensors.items() if i.is_floating]
        copies = [[c.get_tensor(n) for c in ckpts] for n in names]
        bases = [base.get_tensor(n) for n in names] if base is not None else None
        return cls(names, copies, bases, layer_positions(names, ref.config), [c.name for c in ckpts])

    def merge(self, config: AMEConfig) -> Dict[str, torch.Tensor]:
        """The merge with ``config``, by file tensor name, in the compute dtype."""
        n = len(self.ingredient_names)
        if is_exact_soup(config, n):
            return {name: soup(xs, config.torch_state_dtype).to(config.torch_compute_dtype)
                    for name, xs in zip(self.names, self.copies)}
        merged = ame_merge_many(self.copies, config, names=self.ingredient_names, bases=self.bases, keys=self.names,
                                positions=self.positions)
        return dict(zip(self.names, merged))
