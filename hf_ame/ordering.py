"""Ranking, selection and the greedy modes (greedy soup, greedy AME).

Greedy modes evaluate between steps, so they hold the merge in memory: greedy soup keeps a running
sum (one model in float32) plus the model being evaluated; greedy AME keeps the merge, its
pseudogradient and optimizer state for every tensor (about 4 float32 copies of the model with
Adam) plus one snapshot of them to restore a rejected step, plus the evaluated model.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .algorithm import AMEStepper, initial_merge, plan_steps, resolve_pivot
from .checkpoints import Checkpoint
from .config import AMEConfig, ConfigError
from .errors import NonFiniteWeightsError
from .engine import save_state
from .copies import LazyCopies
from .methods import layer_positions
from .scratch import scratch_dir
from .architecture import file_to_model_renamer

__all__ = ["ORDERS", "GREEDY_MODES", "rank", "ModelSlot", "greedy_soup", "greedy_ame", "GreedyLog"]

ORDERS = ("best", "descending", "ascending", "given")
GREEDY_MODES = (None, "soup", "ame")


def rank(scores: Sequence[Optional[float]], *, greater_is_better: bool = True, order: str = "best",
         top_k: Optional[int] = None) -> Tuple[List[int], List[int]]:
    """(ordered indices, kept indices). ``best``: best first (descending when greater is better,
    ascending for losses); ``descending`` / ``ascending`` literally; ``given``: as listed.
    ``top_k`` keeps the first k of that order. Ties keep the given order."""
    if order not in ORDERS:
        raise ConfigError(f"order: expected one of {', '.join(ORDERS)}, got {order!r}")
    n = len(scores)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k: expected an integer >= 1, got {top_k!r}")
    idx = list(range(n))
    if order != "given":
        if any(s is None for s in scores):
            raise ConfigError(f"order: {order!r} needs scores; pass order_by= and eval_dataset=")
        descending = greater_is_better if order == "best" else order == "descending"
        idx.sort(key=lambda i: (-scores[i] if descending else scores[i], i))  # type: ignore[operator]
    kept = idx[: top_k] if top_k is not None else list(idx)
    return idx, kept


@dataclass
class GreedyLog:
    """One line per candidate (greedy soup) or step (greedy AME): what was tried, its score, kept or not."""

    entries: List[Dict[str, Any]] = field(default_factory=list)

    def add(self, **kw: Any) -> None:
        self.entries.append(kw)


class ModelSlot:
    """One in-memory model whose floating weights are replaced by states keyed by *file* tensor
    names, then scored. Names are mapped through transformers' renames; if they do not map one to
    one, states are written to a temporary folder and reloaded with ``from_pretrained`` instead."""

    def __init__(self, reference: Checkpoint, load: Callable[[Path], Any], score: Callable[[Any], float]):
        self.reference = reference
        self._load = load
        self._score = score
        self.model = load(reference.path)
        params = dict(self.model.state_dict(keep_vars=True))
        rename = file_to_model_renamer(self.model)
        names = [n for n, i in reference.tensors.items() if i.is_floating]
        mapped = {n: rename(n) for n in names}
        ok = all(m in params and tuple(params[m].shape) == reference.tensors[n].shape for n, m in mapped.items())
        self.targets = {n: params[m] for n, m in mapped.items()} if ok else None
        self._tmp: Optional[Path] = None

    @torch.no_grad()
    def score(self, state: Mapping[str, torch.Tensor]) -> float:
        if self.targets is not None:
            for n, t in self.targets.items():
                t.data.copy_(state[n].to(device=t.device, dtype=t.dtype))
        else:  # reload path: correct for any naming, slower
            if self._tmp is None:
                self._tmp = scratch_dir("greedy")
            out = self._tmp / "state"
            save_state(state, self.reference, out, overwrite=True)
            self.model = self._load(out)
        return self._score(self.model)

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self.model = None


def _better(new: float, old: float, greater_is_better: bool) -> bool:
    return new > old if greater_is_better else new < old


def greedy_soup(ckpts: Sequence[Checkpoint], first_score: float, slot: ModelSlot, *, greater_is_better: bool = True,
                log: Optional[GreedyLog] = None) -> Tuple[List[int], float]:
    """Greedy soup (Wortsman et al. 2022) over ``ckpts`` ranked best first: add each next ingredient
    only if the uniform average with it scores strictly better. Returns (accepted indices, score)."""
    log = log or GreedyLog()
    names = [n for n, i in ckpts[0].tensors.items() if i.is_floating]
    total = {n: ckpts[0].get_tensor(n).to(torch.float32) for n in names}
    accepted, best = [0], first_score
    log.add(candidate=ckpts[0].name, score=first_score, accepted=True)
    for j in range(1, len(ckpts)):
        k = len(accepted) + 1
        trial = {n: (total[n] + ckpts[j].get_tensor(n).to(torch.float32)) / k for n in names}
        s = slot.score(trial)
        ok = _better(s, best, greater_is_better)
        log.add(candidate=ckpts[j].name, score=s, accepted=ok)
        if ok:
            for n in names:
                total[n].add_(ckpts[j].get_tensor(n).to(torch.float32))
            accepted.append(j)
            best = s
        del trial
    return accepted, best


class _Lazy:
    """``lazy[k][j]``: tensor k of ingredient j, read when touched (greedy AME streams ingredients)."""

    def __init__(self, ckpts: Sequence[Checkpoint], names: Sequence[str]):
        self.ckpts, self.names = ckpts, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, k: int):
        return LazyCopies(self.ckpts, self.names[k], torch.device("cpu"))


def _check_finite(weights: Sequence[torch.Tensor], names: Sequence[str], lazy: "_Lazy", batch: Sequence[int],
                  ckpts: Sequence[Checkpoint], config: AMEConfig) -> None:
    """Stop greedy AME at the first NaN or Inf in the merge, naming the tensor and the ingredients
    of the step whose copy holds one (none: the step itself overflowed). One sum per tensor."""
    for k, w in enumerate(weights):
        if not bool(torch.isfinite(w.sum())):
            if bool(torch.isfinite(w).all()):
                continue  # the sum overflowed, not the values
            row = lazy[k]
            bad = [ckpts[j].name for j in batch if not bool(torch.isfinite(row[j]).all())]
            raise NonFiniteWeightsError(names[k], bad, config.optimizer)


def greedy_ame(ckpts: Sequence[Checkpoint], config: AMEConfig, slot: ModelSlot, *, base: Optional[Checkpoint] = None,
               greater_is_better: bool = True,
               log: Optional[GreedyLog] = None) -> Tuple[Dict[str, torch.Tensor], float]:
    """Greedy AME (spec): after each step keep it only if the held-out metric improved, else restore
    the previous weights AND optimizer state. Returns (merged state by file name, its score)."""
    log = log or GreedyLog()
    names = [n for n, i in ckpts[0].tensors.items() if i.is_floating]
    lazy = _Lazy(ckpts, names)
    pivot = resolve_pivot(config.pivot, len(ckpts), [c.name for c in ckpts])
    dtype = config.torch_state_dtype
    init = [initial_merge(lazy[k], pivot, base=base.get_tensor(n) if base is not None else None, dtype=dtype)
            for k, n in enumerate(names)]
    # layer positions: per-layer (gradient) method parameters act as in a streamed merge
    stepper = AMEStepper(init, config, names, layer_positions(names, ckpts[0].config), has_base=pivot.is_base)
    del init
    _check_finite(stepper.weights, names, lazy, range(len(ckpts)), ckpts, config)
    best = slot.score(dict(zip(names, stepper.weights)))
    log.add(step=0, score=best, accepted=True)
    for step in plan_steps(len(ckpts), config):
        snapshot = stepper.state_dict()
        stepper.step(step, lazy)
        _check_finite(stepper.weights, names, lazy, step.batch, ckpts, config)
        s = slot.score(dict(zip(names, stepper.weights)))
        ok = _better(s, best, greater_is_better)
        log.add(step=step.t, epoch=step.epoch, batch=[ckpts[j].name for j in step.batch], score=s, accepted=ok)
        if ok:
            best = s
        else:
            stepper.load_state_dict(snapshot)
        del snapshot
    state = dict(zip(names, stepper.release()))
    return state, best
