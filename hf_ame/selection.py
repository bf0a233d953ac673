"""Which ingredients a merge keeps and which config it writes: scoring, search, greedy modes.

:class:`~hf_ame.merger.AMEMerger` loads the ingredients and orchestrates; this module holds what
happens between "the ingredients are open" and "the output is written": the ingredients scored
(:func:`score_ingredients`), ranked and kept (:func:`choose`), then one :class:`PreparedMerge`
either previewed (:func:`plan_prepared`, ``AMEMerger.plan``) or run (:func:`merge_prepared`,
``AMEMerger.merge``): a plain merge, a validation search (streamed or held in memory) or a greedy
mode. Both take the config (:func:`merged_config`), the base (:meth:`PreparedMerge.base_for`) and the
output settings from the same PreparedMerge, so a preview cannot drift from its run. Loading a model
stays the caller's (``PreparedMerge.load``).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from .algorithm import plan_steps, resolve_pivot
from .checkpoints import Checkpoint
from .checks import model_dtype
from .config import AMEConfig
from .engine import MergeReport, merge_checkpoints, plan_merge, save_state
from .errors import ConfigError, IngredientError
from .held import HELD_LIMIT, HeldIngredients, held_bytes
from .hub import Ingredient
from .ordering import GREEDY_MODES, GreedyLog, ModelSlot, greedy_ame, greedy_soup, rank
from .plan import MergePlan
from .recipe import Recipe
from .result import MergeResult
from .rows import RowAlignment
from .scoring import (DatasetRef, Metric, ScoreCache, checkpoint_fingerprint, dataset_fingerprint, release_memory,
                      resolve_dataset, resolve_metric, score_model)
from .scratch import scratch_dir
from .search import Search, check_space

__all__ = ["MergeRequest", "Scorer", "Choice", "PreparedMerge", "Outcome", "metric_name", "check_selection",
           "make_scorer", "open_score_cache", "score_ingredients", "choose", "merged_config", "pivot_is_base",
           "uses_base", "plan_prepared", "plan_notes", "merge_prepared", "record_outcome", "score_merged"]


def metric_name(order_by: Any) -> str:
    """How the recipe and the card name an ``order_by``: its name, or the callable's."""
    return order_by if isinstance(order_by, str) else getattr(order_by, "name", getattr(order_by, "__name__", "custom"))


@dataclass
class MergeRequest:
    """:meth:`AMEMerger.merge`'s arguments once the recipe's defaults are in (``cfg``: the config used).

    Mutable: the merger fills it in while validating it, and ``output="lora"`` re-runs a copy as a model."""

    order_by: Any = None
    eval_dataset: Any = None
    order: str = "best"
    top_k: Optional[int] = None
    greedy: Optional[str] = None
    greater_is_better: Optional[bool] = None
    metric_key: Optional[str] = None
    metric_kwargs: Optional[Mapping[str, Any]] = None
    input_column: Optional[str] = None
    label_column: Optional[str] = None
    score_batch_size: int = 32
    score_cache: Any = True
    compare_soup: bool = False
    max_shard_size: Union[int, str, None] = None
    stream: str = "auto"
    memory_budget: Optional[int] = None
    progress: bool = True
    write_card: bool = True
    search: Optional[Mapping[str, Any]] = None
    n_trials: Optional[int] = None
    allow_unchanged: bool = False
    output: Optional[str] = None  # "model" or "lora" (hf_ame.lora_out)
    rank: Optional[int] = None  # the LoRA rank of output="lora"
    cfg: Optional[AMEConfig] = None

    @classmethod
    def split(cls, kwargs: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """``merge(**kwargs)``'s keyword arguments as (the request's, the rest: AMEConfig overrides)."""
        return ({k: v for k, v in kwargs.items() if k in _REQUEST_ARGS},
                {k: v for k, v in kwargs.items() if k not in _REQUEST_ARGS})

    def score_kwargs(self) -> Dict[str, Any]:
        """:meth:`AMEMerger.score`'s arguments (besides the metric and the data) for ``order_by``."""
        return dict(greater_is_better=self.greater_is_better, metric_key=self.metric_key,
                    metric_kwargs=self.metric_kwargs, input_column=self.input_column, label_column=self.label_column,
                    batch_size=self.score_batch_size, cache=self.score_cache)

    def fill_defaults(self, recipe: Optional[Recipe]) -> None:
        """What was not given: the recipe's (shard size, ordering without ``order_by``, output format
        and rank), else the defaults."""
        if recipe is not None:
            self.max_shard_size = self.max_shard_size or recipe.output.get("max_shard_size")
            if self.order_by is None and recipe.ordering:
                self.from_recipe_ordering(recipe.ordering)
        self.max_shard_size = self.max_shard_size or "5GB"
        self.output = self.output or (recipe.output.get("format") if recipe is not None else None) or "model"
        self.rank = self.rank if self.rank is not None else (recipe.output.get("rank") if recipe is not None else None)

    def from_recipe_ordering(self, o: Mapping[str, Any]) -> None:
        """Take the ordering a recipe records (its ``ordering`` section)."""
        self.order_by = o["metric"]
        self.eval_dataset = self.eval_dataset if self.eval_dataset is not None else o["dataset"]
        self.order, self.top_k, self.greedy = o.get("order", "best"), o.get("top_k"), o.get("greedy")
        self.greater_is_better, self.metric_key = o.get("greater_is_better"), o.get("metric_key")
        self.metric_kwargs, self.compare_soup = o.get("metric_kwargs"), bool(o.get("compare_soup", self.compare_soup))
        self.score_batch_size = int(o.get("batch_size", self.score_batch_size))

    def ordering_record(self) -> Dict[str, Any]:
        """How the ingredients were chosen, as the recipe and card record it."""
        ds = self.eval_dataset
        ds = ds.to_dict() if isinstance(ds, DatasetRef) else (dict(ds) if isinstance(ds, Mapping) else ds)
        return {"metric": metric_name(self.order_by), "dataset": ds, "order": self.order, "top_k": self.top_k,
                "greedy": self.greedy, "greater_is_better": self.greater_is_better, "metric_key": self.metric_key,
                "metric_kwargs": dict(self.metric_kwargs) if self.metric_kwargs else None}


# merge()'s own keyword arguments (the rest are AMEConfig overrides)
_REQUEST_ARGS = tuple(f.name for f in dataclasses.fields(MergeRequest) if f.name != "cfg")


def check_selection(req: MergeRequest, rows: Optional[RowAlignment]) -> None:
    """The request's ordering, greedy and search arguments, checked before anything is read."""
    if req.greedy not in GREEDY_MODES:
        raise ConfigError(f"greedy: expected one of None, 'soup', 'ame', got {req.greedy!r}")
    if req.greedy is not None and rows is not None and rows.tensors:
        raise ConfigError(f"greedy: greedy modes hold candidates as same-shaped tensors; these ingredients' rows "
                          f"differ ({', '.join(sorted(set(rows.tensors.values())))}): merge without greedy")
    if (req.greedy is not None or req.top_k is not None or req.order not in ("best", "given")
            or req.search is not None) and req.order_by is None:
        raise ConfigError("order_by: greedy modes, top_k, ordering and search need a metric (order_by=) and "
                          "eval_dataset=")
    if req.search is not None:
        check_space(req.search, req.n_trials)
        if req.greedy is not None:
            raise ConfigError("search: a search keeps its best trial; it does not combine with greedy modes")


# ----------------------------------------------------------------------------------- scoring
@dataclass(frozen=True, kw_only=True)
class Scorer:
    """A resolved metric on a resolved dataset; call it on a model (and its folder) for a score."""

    metric: Metric
    dataset: Any
    input_column: Optional[str]  # as used: a dataset reference's columns fill in what was not given
    label_column: Optional[str]
    batch_size: int
    given_columns: Tuple[Optional[str], Optional[str]]  # as given: part of the score cache key

    def __call__(self, model: Any, path: Union[str, os.PathLike, None] = None) -> float:
        """The model's score (``path``: its folder or an ingredient's, for its tokenizer / processor)."""
        return score_model(model, self.dataset, self.metric, model_path=path, input_column=self.input_column,
                           label_column=self.label_column, batch_size=self.batch_size)


def make_scorer(metric: Any, eval_dataset: Any, *, greater_is_better: Optional[bool], metric_key: Optional[str],
                metric_kwargs: Optional[Mapping[str, Any]], input_column: Optional[str],
                label_column: Optional[str], batch_size: int) -> Scorer:
    """The metric and the dataset resolved (``evaluate`` names, callables, dataset references)."""
    if eval_dataset is None:
        raise IngredientError("eval_dataset: scoring needs a dataset (a datasets.Dataset or a dataset reference)")
    m = resolve_metric(metric, greater_is_better=greater_is_better, metric_key=metric_key,
                       metric_kwargs=metric_kwargs)
    ds, ref = resolve_dataset(eval_dataset)
    given = (input_column, label_column)
    if ref is not None:
        input_column = input_column or ref.input_column
        label_column = label_column or ref.label_column
    return Scorer(metric=m, dataset=ds, input_column=input_column, label_column=label_column, batch_size=batch_size,
                  given_columns=given)


def open_score_cache(cache: Union[bool, str, os.PathLike, ScoreCache]) -> ScoreCache:
    """``cache`` as a store: True (the default location), False (off), a path, or a ScoreCache."""
    if isinstance(cache, ScoreCache):
        return cache
    return ScoreCache(None if cache is True else (None if cache is False else cache), enabled=cache is not False)


def score_ingredients(ingredients: Sequence[Ingredient], scorer: Scorer, store: ScoreCache,
                      load: Callable[[Path], Any], *, progress: bool) -> List[float]:
    """Score every ingredient not in ``store`` (one model in memory at a time, freed after); sets
    ``ingredient.score`` and returns the scores in ingredient order."""
    dfp = dataset_fingerprint(scorer.dataset)
    extra = {"input": scorer.given_columns[0], "label": scorer.given_columns[1]}
    scores: List[float] = []
    for ing in tqdm(ingredients, desc="hf_ame score", unit="model", disable=not progress):
        key = store.key(checkpoint_fingerprint(ing.path, ing.sha), dfp, scorer.metric, extra)
        value = store.get(key)
        if value is None:
            t0 = time.perf_counter()
            model = load(ing.path)
            value = scorer(model, ing.path)
            del model
            release_memory()
            store.put(key, value, metric=scorer.metric.name, model=ing.id, seconds=time.perf_counter() - t0)
        ing.score = value
        scores.append(value)
    return scores


@dataclass(frozen=True, kw_only=True)
class Choice:
    """The ingredients ranked and kept: copies of every one (with ``order`` / ``kept``), the kept
    ones in merge order, and the scorer that ranked them (None without ``order_by``)."""

    ingredients: List[Ingredient]
    chosen: List[Ingredient]
    scorer: Optional[Scorer] = None


def choose(ingredients: Sequence[Ingredient], scorer: Optional[Scorer], *, order: str,
           top_k: Optional[int]) -> Choice:
    """Rank the (scored) ingredients and keep ``top_k``; unscored: the given order, every one."""
    ranked, kept = rank([i.score for i in ingredients],
                        greater_is_better=scorer.metric.greater_is_better if scorer else True,
                        order=order if scorer is not None else "given", top_k=top_k)
    ings = [Ingredient(**vars(i)) for i in ingredients]
    for pos, k in enumerate(ranked):
        ings[k].order = pos
        ings[k].kept = k in kept
    return Choice(ingredients=ings, chosen=[ings[k] for k in kept], scorer=scorer)


# ----------------------------------------------------------------------------- one merge
def pivot_is_base(cfg: AMEConfig, ckpts: Sequence[Checkpoint]) -> bool:
    """The config's pivot is the base model (not one of ``ckpts``)."""
    return resolve_pivot(cfg.pivot, len(ckpts), [c.name for c in ckpts]).is_base


def merged_config(req: MergeRequest) -> AMEConfig:
    """The config merged: the exact soup for greedy soup (of the ingredients it keeps), else ``req.cfg``."""
    return AMEConfig.soup() if req.greedy == "soup" else req.cfg


def uses_base(cfg: AMEConfig, ckpts: Sequence[Checkpoint], base_id: Optional[str],
              rows: Optional[RowAlignment]) -> bool:
    """The base is read: as the pivot, or as the source of some rows (heads="base")."""
    if base_id is None:
        return False
    maps = rows.maps.values() if rows is not None else ()
    return pivot_is_base(cfg, ckpts) or any(base_id in m.sources for m in maps)


@dataclass(frozen=True, kw_only=True)
class PreparedMerge:
    """One merge's open checkpoints and settings: what ``plan()`` previews is what ``merge()`` runs."""

    request: MergeRequest
    ckpts: List[Checkpoint]
    base: Optional[Checkpoint]  # the base's checkpoint when open
    base_id: Optional[str]  # the base_model given, open or not
    rows: Optional[RowAlignment]
    target: Path
    device: Callable[[str], torch.device]  # tensor name -> the device it is merged on
    dtype: Optional[torch.dtype]
    overwrite: bool
    progress: bool
    load: Callable[[Path], Any]  # a folder -> its model, placed by the merger's device map

    @property
    def config(self) -> AMEConfig:
        """See :func:`merged_config`."""
        return merged_config(self.request)

    def uses_base(self, cfg: AMEConfig) -> bool:
        """See :func:`uses_base`."""
        return uses_base(cfg, self.ckpts, self.base_id, self.rows)

    def base_for(self, cfg: AMEConfig) -> Optional[Checkpoint]:
        """The base checkpoint if ``cfg`` reads it, else None."""
        return self.base if self.uses_base(cfg) else None

    def write_kwargs(self) -> Dict[str, Any]:
        """The engine's output arguments, the same for every way of merging."""
        return dict(dtype=self.dtype, max_shard_size=self.request.max_shard_size, overwrite=self.overwrite,
                    progress=self.progress, device_map=self.device)


def plan_prepared(prep: PreparedMerge) -> MergePlan:
    """The plan of the merge, from headers alone; greedy modes: every candidate (an upper bound), the
    greedy soup's final merge streamed as asked, greedy AME's held in memory."""
    req, cfg = prep.request, prep.config
    return plan_merge(prep.ckpts, prep.target, cfg, base=prep.base_for(cfg), dtype=prep.dtype,
                      max_shard_size=req.max_shard_size, overwrite=prep.overwrite, device_map=prep.device,
                      stream=req.stream if req.greedy != "ame" else "auto", memory_budget=req.memory_budget,
                      min_ingredients=1 if req.greedy else 2, rows=prep.rows)


def plan_notes(req: MergeRequest) -> List[str]:
    """The plan's note when the ingredients kept depend on scores not yet computed."""
    if req.order_by is None:
        return []
    return [f"ingredients are scored by {metric_name(req.order_by)} first; "
            + ("the greedy pass then keeps some of them, in memory; " if req.greedy else "")
            + (f"top_k={req.top_k} keeps the best {req.top_k}; " if req.top_k else "")
            + "this plan covers every candidate in the given order"]


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What :func:`merge_prepared` wrote: the config used, the report, the search or greedy log."""

    config: AMEConfig
    report: MergeReport
    search: Optional[Search] = None
    greedy_log: Optional[GreedyLog] = None


def merge_prepared(prep: PreparedMerge, choice: Choice) -> Outcome:
    """Run the merge into ``prep.target``: plain, a validation search, or a greedy mode."""
    req = prep.request
    if req.search is not None:
        return _search(prep, choice.scorer)
    if req.greedy is None:
        cfg = prep.config
        report = merge_checkpoints(prep.ckpts, prep.target, cfg, base=prep.base_for(cfg), stream=req.stream,
                                   memory_budget=req.memory_budget, rows=prep.rows, **prep.write_kwargs())
        return Outcome(config=cfg, report=report)
    return _greedy(prep, choice)


# ---------------------------------------------------------------------------------- search
def _search(prep: PreparedMerge, scorer: Scorer) -> Outcome:
    req = prep.request
    search = Search(req.cfg, req.search, req.n_trials, greater_is_better=scorer.metric.greater_is_better)
    if _holds_in_memory(prep):
        cfg, report = _search_held(search, prep, scorer)
    else:
        cfg, report = _search_streamed(search, prep, lambda path: scorer(prep.load(path), path))
    return Outcome(config=cfg, report=report, search=search)


def _holds_in_memory(prep: PreparedMerge) -> bool:
    """Small models' trials run from ingredients held once in memory: every floating tensor of
    every ingredient within ``memory_budget`` (default 2 GiB), merged on the CPU, rows not
    re-matched, ``stream="auto"``. Otherwise each trial streams from the files."""
    req = prep.request
    if req.stream != "auto" or (prep.rows is not None and prep.rows.tensors):
        return False
    if not all(prep.device(n).type == "cpu" for n in prep.ckpts[0].tensors):
        return False
    return held_bytes(prep.ckpts, prep.base_for(req.cfg)) <= (req.memory_budget or HELD_LIMIT)


def _search_streamed(search: Search, prep: PreparedMerge,
                     score: Callable[[Path], float]) -> Tuple[AMEConfig, MergeReport]:
    """Each trial merged (streamed) into a folder of its own and scored; the best one's files
    are moved into the target, the others removed as soon as they lose."""
    req, root = prep.request, scratch_dir("search")
    best: Optional[Tuple[float, Path, MergeReport]] = None
    try:
        for trial in search:
            out = root / f"trial-{trial.number}"
            report = merge_checkpoints(prep.ckpts, out, trial.config, base=prep.base_for(trial.config),
                                       stream=req.stream, memory_budget=req.memory_budget, rows=prep.rows,
                                       **{**prep.write_kwargs(), "progress": False, "overwrite": False})
            value = score(out)
            release_memory()
            search.tell(value)
            if best is None or search.better(value, best[0]):
                if best is not None:
                    shutil.rmtree(best[1], ignore_errors=True)
                best = (value, out, report)
            else:
                shutil.rmtree(out, ignore_errors=True)
        for p in best[1].iterdir():  # type: ignore[index]
            shutil.move(str(p), str(prep.target / p.name))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = best[2]  # type: ignore[index]
    report.output_dir = prep.target
    return search.best.config, report


def _search_held(search: Search, prep: PreparedMerge, scorer: Scorer) -> Tuple[AMEConfig, MergeReport]:
    """Each trial merged in memory and scored through one in-memory model; only the best is written."""
    t0 = time.perf_counter()
    ckpts = prep.ckpts
    held = HeldIngredients.read(ckpts, prep.base_for(search.config))
    slot = ModelSlot(ckpts[0], prep.load, lambda model: scorer(model, ckpts[0].path))
    search.merged = "in memory"
    best: Optional[Tuple[float, Dict[str, torch.Tensor]]] = None
    try:
        for trial in search:
            state = held.merge(trial.config)
            value = slot.score(state)
            search.tell(value)
            if best is None or search.better(value, best[0]):
                best = (value, state)
            del state
    finally:
        slot.close()
    state = best[1]  # type: ignore[index]
    del held, best
    files = save_state(state, ckpts[0], prep.target, dtype=prep.dtype, max_shard_size=prep.request.max_shard_size,
                       overwrite=prep.overwrite)
    cfg = search.best.config
    return cfg, _held_report(prep, cfg, state, files, steps=len(plan_steps(len(ckpts), cfg)), t0=t0)


def _held_report(prep: PreparedMerge, cfg: AMEConfig, state: Mapping[str, torch.Tensor], files: List[str], *,
                 steps: int, t0: float) -> MergeReport:
    """The report of a merge held in memory and saved (search, greedy AME)."""
    ref = prep.ckpts[0]
    return MergeReport(prep.target, [c.name for c in prep.ckpts], cfg,
                       str(prep.dtype or model_dtype(ref)).replace("torch.", ""),
                       tensors=len(ref.tensors), parameters=sum(i.numel for i in ref.tensors.values()),
                       merged_tensors=len(state), copied_tensors=len(ref.tensors) - len(state),
                       steps=steps, files=files, seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------- greedy
def _greedy(prep: PreparedMerge, choice: Choice) -> Outcome:
    """Greedy soup (then the exact soup of what it kept, streamed) or greedy AME (held in memory,
    then written)."""
    ckpts, chosen, scorer = prep.ckpts, choice.chosen, choice.scorer
    slot = ModelSlot(ckpts[0], prep.load, lambda model: scorer(model, chosen[0].path))
    log = GreedyLog()
    t0 = time.perf_counter()
    greater_is_better = scorer.metric.greater_is_better
    try:
        if prep.request.greedy == "soup":
            accepted, _ = greedy_soup(ckpts, chosen[0].score, slot, greater_is_better=greater_is_better, log=log)
            for k, ing in enumerate(chosen):
                ing.kept = k in accepted
            cfg = prep.config  # the exact soup
            report = merge_checkpoints([ckpts[k] for k in accepted], prep.target, cfg, min_ingredients=1,
                                       stream=prep.request.stream, memory_budget=prep.request.memory_budget,
                                       rows=prep.rows, **prep.write_kwargs())
            return Outcome(config=cfg, report=report, greedy_log=log)
        cfg = prep.request.cfg
        state, _ = greedy_ame(ckpts, cfg, slot, base=prep.base if pivot_is_base(cfg, ckpts) else None,
                              greater_is_better=greater_is_better, log=log)
        files = save_state(state, ckpts[0], prep.target, dtype=prep.dtype,
                           max_shard_size=prep.request.max_shard_size, overwrite=prep.overwrite)
        report = _held_report(prep, cfg, state, files, steps=len(log.entries) - 1, t0=t0)
        return Outcome(config=cfg, report=report, greedy_log=log)
    finally:
        slot.close()


# ------------------------------------------------------------------------- the merged model
def record_outcome(result: MergeResult, prep: PreparedMerge, choice: Choice, outcome: Outcome) -> None:
    """What was tried and kept, as the card and recipe record it: the search's trials, the greedy
    log, the candidates."""
    result.search = outcome.search.record() if outcome.search is not None else None
    result.greedy = prep.request.greedy
    result.greedy_log = outcome.greedy_log.entries if outcome.greedy_log else None
    result.candidates = [i.id for i in choice.chosen]


def score_merged(result: MergeResult, prep: PreparedMerge, choice: Choice,
                 reopen: Callable[[Ingredient], Checkpoint]) -> None:
    """Score the merged model (and, with ``compare_soup``, the soup of the kept ingredients, its
    checkpoints opened again by ``reopen``) into ``result.scores`` / ``result.metric``; record the
    ordering (``result.ordering``)."""
    t2 = time.perf_counter()
    scorer, ings = choice.scorer, choice.ingredients
    metric = scorer.metric
    scores: Dict[str, Any] = {"merged": scorer(result.model, result.output_dir)}
    best = max(ings, key=lambda i: (i.score if metric.greater_is_better else -i.score, -ings.index(i)))
    scores["best_ingredient"] = {"id": best.id, "score": best.score}
    if prep.request.compare_soup:
        scores["soup"] = _soup_score(prep, choice, reopen)
    result.timings["score_merged"] = time.perf_counter() - t2
    result.metric = {"name": metric.name, "greater_is_better": metric.greater_is_better, "shipped": metric.shipped}
    result.scores = scores
    result.ordering = prep.request.ordering_record()


def _soup_score(prep: PreparedMerge, choice: Choice, reopen: Callable[[Ingredient], Checkpoint]) -> float:
    """The uniform soup of the kept ingredients, merged into a scratch folder and scored."""
    chosen = choice.chosen
    soup_root = scratch_dir("soup")
    try:
        merge_checkpoints([reopen(i) for i in chosen], soup_root / "soup", AMEConfig.soup(), dtype=prep.dtype,
                          progress=False, device_map=prep.device, min_ingredients=1, rows=prep.rows)
        soup_model = prep.load(soup_root / "soup")
        value = choice.scorer(soup_model, chosen[0].path)
        del soup_model
        release_memory()
        return value
    finally:
        shutil.rmtree(soup_root, ignore_errors=True)
