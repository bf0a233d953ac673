"""A validation search over AME settings that never loses to the soup (``merge(search=...)``).

Trial 0 is always the exact uniform soup; then each point of the space. The space maps
:class:`~hf_ame.config.AMEConfig` fields to a list of values (a grid: every combination, in order)
or, with ``n_trials``, to what Optuna samples (a list: one of these values; ``{"low", "high",
"log"}``: a number in that range), with Optuna's TPE sampler seeded by the config's ``seed``.
Every trial's merge is scored on the evaluation split; the best is kept (the soup on a tie), so
the kept merge never scores below the soup there. Pure bookkeeping: merging and scoring are the
caller's (:class:`~hf_ame.merger.AMEMerger`).
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from .config import AMEConfig
from .errors import ConfigError
from .limits import MAX_EPOCHS, MAX_TRIALS, SEED_RANGE, check_config_limits, check_count

__all__ = ["Search", "Trial", "check_space"]

# each scored trial is logged (INFO, the trial's dict as ``record.hf_ame_trial``): ``hf-ame ui`` lists them live
_log = logging.getLogger(__name__)


@dataclass
class Trial:
    """One point of a search: its number (0: the soup), the config merged, its score."""

    number: int
    config: AMEConfig
    score: Optional[float] = None
    params: Dict[str, Any] = field(default_factory=dict)  # the searched fields' values ({} for the soup)

    def to_dict(self) -> Dict[str, Any]:
        return {"trial": self.number, "params": dict(self.params) if self.number else "uniform soup",
                "score": self.score}


def check_space(space: Any, n_trials: Optional[int]) -> Dict[str, Any]:
    """The space, checked: AMEConfig field names; lists (non-empty), or ranges with ``n_trials``."""
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(f"search: expected a mapping of AMEConfig fields to values, got {space!r}")
    fields = set(AMEConfig.__dataclass_fields__)
    for key, values in space.items():
        if key not in fields:
            raise ConfigError(f"search.{key}: not an AMEConfig field (fields: {', '.join(sorted(fields))})")
        if isinstance(values, Mapping):
            if n_trials is None:
                raise ConfigError(f"search.{key}: a range needs n_trials (Optuna samples it); a grid takes lists")
            if not {"low", "high"} <= set(values) or not set(values) <= {"low", "high", "log"}:
                raise ConfigError(f"search.{key}: a range is {{low, high, log}}, got {dict(values)!r}")
        elif not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"search.{key}: expected a non-empty list of values, got {values!r}")
        _check_bounded(key, values)
    if n_trials is not None:
        check_count(n_trials, "n_trials", 1, MAX_TRIALS)
    elif math.prod(len(v) for v in space.values()) > MAX_TRIALS:  # every trial is a full merge
        points = math.prod(len(v) for v in space.values())
        raise ConfigError(f"search: the grid has {points:,} points, more than the {MAX_TRIALS:,} trials allowed; "
                          "search fewer values or use n_trials")
    return dict(space)


_BOUNDED = {"epochs": (1, MAX_EPOCHS), "seed": SEED_RANGE}


def _check_bounded(key: str, values: Any) -> None:
    """Counts a search may try (epochs, seed) within the limits every merge has, checked before trial 0."""
    if key not in _BOUNDED:
        return
    for v in ([values["low"], values["high"]] if isinstance(values, Mapping) else values):
        check_count(v, f"search.{key}", *_BOUNDED[key])


class Search:
    """Trials in order (:meth:`__iter__` yields each :class:`Trial` to merge and score, then
    :meth:`tell` its score); :attr:`best` is the kept one."""

    def __init__(self, config: AMEConfig, space: Mapping[str, Any], n_trials: Optional[int] = None, *,
                 greater_is_better: bool = True):
        self.config, self.space, self.n_trials = config, check_space(space, n_trials), n_trials
        self.greater_is_better = greater_is_better
        self.trials: List[Trial] = []
        self._study: Any = None
        self._pending: Any = None
        self.merged = "streamed"  # or "in memory": how the caller merged the trials

    def _grid(self) -> Iterator[Dict[str, Any]]:
        keys = list(self.space)
        for values in itertools.product(*(self.space[k] for k in keys)):
            yield dict(zip(keys, values))

    def _optuna(self) -> Iterator[Dict[str, Any]]:
        try:
            import optuna
        except ImportError:
            raise ConfigError("search with n_trials samples with Optuna: pip install optuna (or hf_ame[search]); "
                              "a grid (lists, no n_trials) needs nothing") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._study = optuna.create_study(direction="maximize" if self.greater_is_better else "minimize",
                                          sampler=optuna.samplers.TPESampler(seed=int(self.config.seed)))
        for _ in range(self.n_trials or 0):
            trial = self._pending = self._study.ask()
            params = {}
            for key, spec in self.space.items():
                if isinstance(spec, Mapping):
                    low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
                    params[key] = (trial.suggest_int(key, low, high, log=log)
                                   if isinstance(low, int) and isinstance(high, int)
                                   else trial.suggest_float(key, float(low), float(high), log=log))
                else:
                    params[key] = trial.suggest_categorical(key, list(spec))
            yield params

    def __iter__(self) -> Iterator[Trial]:
        first = Trial(0, AMEConfig.soup())
        self.trials.append(first)
        yield first
        for params in (self._optuna() if self.n_trials is not None else self._grid()):
            try:
                cfg = self.config.replace(**params).validate()
                check_config_limits(cfg)
            except ConfigError as exc:
                raise ConfigError(f"search: {params!r}: {exc}") from None
            t = Trial(len(self.trials), cfg, params=params)
            self.trials.append(t)
            yield t

    def tell(self, score: float) -> None:
        """The score of the trial just yielded."""
        self.trials[-1].score = float(score)
        trial = self.trials[-1].to_dict()
        _log.info("search trial %d %s: score %.6g", trial["trial"], trial["params"], float(score),
                  extra={"hf_ame_trial": trial})
        if self._study is not None and self.trials[-1].number > 0:
            self._study.tell(self._pending, float(score))

    def better(self, a: float, b: float) -> bool:
        return a > b if self.greater_is_better else a < b

    @property
    def best(self) -> Trial:
        """The best scored trial; the earliest on a tie (so the soup, trial 0, wins ties)."""
        scored = [t for t in self.trials if t.score is not None]
        best = scored[0]
        for t in scored[1:]:
            if self.better(t.score, best.score):  # type: ignore[arg-type]
                best = t
        return best

    def record(self) -> Dict[str, Any]:
        """What the recipe and card keep: the space, n_trials, every trial and the chosen one."""
        return {"space": {k: (dict(v) if isinstance(v, Mapping) else list(v)) for k, v in self.space.items()},
                "n_trials": self.n_trials, "chosen": self.best.number, "trials": [t.to_dict() for t in self.trials],
                "merged": self.merged}


def split_space(spec: Mapping[str, Any]) -> Tuple[Dict[str, Any], Optional[int]]:
    """A search file's contents: ``{space: {...}, n_trials: N}`` or the space alone."""
    if "space" in spec:
        return dict(spec["space"]), spec.get("n_trials")
    return dict(spec), None
