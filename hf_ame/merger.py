"""The user-facing API: ``AMEMerger.from_pretrained(...).merge(...) -> MergeResult``."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from .algorithm import plan_steps, resolve_pivot
from .checkpoints import Checkpoint
from .checks import model_dtype
from .config import AMEConfig, parse_dtype
from .engine import MergeReport, merge_checkpoints, plan_merge, save_state, stack_checkpoints
from .errors import ConfigError, IngredientError, UnchangedMergeError
from .executor import unchanged_note
from .held import HELD_LIMIT, HeldIngredients, held_bytes
from .hub import Ingredient
from .layouts import ConvertedCheckpoint
from .lora_out import check_rank, lora_output
from .limits import check_config_limits
from .methods import check_counts, get_method
from .ordering import GREEDY_MODES, GreedyLog, ModelSlot, greedy_ame, greedy_soup, rank
from .output import check_output_dir, staged_output
from .preflight import Preflight, check_and_download, open_ingredient, parse_models
from .placement import load_model, resolve_device_map, tensor_device_lookup
from .plan import MergePlan
from .recipe import load_recipe
from .result import MergeResult
from .rows import RowAlignment
from .scratch import scratch_dir
from .slice_merge import MergeSlice, SliceSource, merge_slices
from .stacking import LayerSlice
from .scoring import (DatasetRef, ScoreCache, checkpoint_fingerprint, dataset_fingerprint, release_memory, resolve_dataset,
                      resolve_metric, score_model)
from .search import Search, check_space

__all__ = ["AMEMerger", "MergeResult"]

ModelEntry = Union[str, os.PathLike, Mapping[str, Any]]


class AMEMerger:
    """Ingredients resolved, checked and placed; call :meth:`merge`.

    Build it with :meth:`from_pretrained`. ``ingredients`` keeps the given order (the order AME
    steps in unless the merge re-orders them).
    """

    def __init__(self, ingredients: List[Ingredient], device_map: Dict[str, str], *, dtype: Optional[torch.dtype] = None,
                 trust_remote_code: bool = False, timings: Optional[Dict[str, float]] = None,
                 base: Optional[Ingredient] = None, rows: Optional[RowAlignment] = None,
                 choices: Optional[Dict[str, Any]] = None):
        self.ingredients = ingredients
        self.rows = rows  # rows matched by token (tokenizer_source) / label, checked before any weight was read
        self.renames: Dict[str, Dict[str, str]] = {}  # model id -> {name in its files: name in the merge}
        self.layouts: Dict[str, Any] = {}  # model id -> its original layout (saved in the in-memory one)
        self.skeleton: Any = None  # the empty-weight model the layouts are converted with
        self.choices = dict(choices or {})
        self.device_map = device_map
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.timings = dict(timings or {})
        self.base = base
        self.recipe = None  # set by from_recipe

    @classmethod
    def from_recipe(cls, path_or_repo_id: Union[str, os.PathLike], *, revision: Optional[str] = None,
                    token: Union[bool, str, None] = None, endpoint: Optional[str] = None, strict: bool = False,
                    **kwargs: Any) -> "AMEMerger":
        """Read a recipe (a local YAML file, or ``ame_recipe.yaml`` of a Hub repo at ``revision``) and
        resolve its ingredients like :meth:`from_pretrained` (``kwargs`` override its ``load`` section).
        :meth:`merge` then defaults to the recipe's config, ordering and output settings. A mergekit
        config's keys that mergekit ignores are ignored with a warning (listed in the card); ``strict``
        (default False) refuses them."""
        # the caller's trust_remote_code, never the recipe's own, allows a recipe to run code
        recipe = load_recipe(path_or_repo_id, revision=revision, token=token, endpoint=endpoint,
                             trust_remote_code=bool(kwargs.get("trust_remote_code", False)), strict=strict)
        load = dict(recipe.load)
        load.update(kwargs)
        if recipe.output.get("dtype") is not None:
            load.setdefault("dtype", recipe.output["dtype"])
        if recipe.slices:  # layer stacking may take the layers of one model (a self-stacking)
            load.setdefault("min_models", 1)
        for key in ("tokenizer_source", "pad_to_multiple_of", "missing_tokens", "tokens", "heads", "config_source",
                    "chat_template"):
            if recipe.output.get(key) is not None:
                load.setdefault(key, recipe.output[key])
        load.setdefault("base_model", recipe.base_model)  # a base_model given here replaces the recipe's
        merger = cls.from_pretrained(recipe.models, token=token, endpoint=endpoint, **load)
        merger.recipe = recipe
        return merger

    @classmethod
    def from_pretrained(
        cls,
        models: Sequence[ModelEntry],
        *,
        revision: Optional[str] = None,
        token: Union[bool, str, None] = None,
        cache_dir: Union[str, os.PathLike, None] = None,
        local_files_only: bool = False,
        device_map: Union[None, str, int, torch.device, Mapping[str, Any]] = "auto",
        max_memory: Optional[Mapping[Union[int, str], Union[int, str]]] = None,
        dtype: Union[str, torch.dtype, None] = None,
        trust_remote_code: bool = False,
        base_model: Optional[ModelEntry] = None,
        endpoint: Optional[str] = None,
        min_models: Optional[int] = None,
        tokenizer_source: Union[str, int, None] = None,
        pad_to_multiple_of: Optional[int] = None,
        missing_tokens: Optional[str] = None,
        tokens: Optional[Mapping[str, Mapping[str, Any]]] = None,
        heads: Union[str, int, None] = None,
        config_source: Union[str, int, None] = None,
        chat_template: Optional[str] = None,
    ) -> "AMEMerger":
        """Resolve, check and fetch the ingredients (transformers' argument names and meanings).

        Args:
            models: Hub ids, folders, or ``{"id", "revision", "base"}`` mappings (``base``: a LoRA adapter's).
            revision: default revision for Hub entries (branch, tag or commit); default "main".
            token, cache_dir, local_files_only: as in ``huggingface_hub.snapshot_download``.
            device_map: "auto" (Accelerate over an empty-weight skeleton), "cpu", "cuda:0", or a
                {module: device} dict; each tensor is merged on the device its module maps to.
            max_memory: per-device budget for "auto", e.g. ``{0: "20GiB", "cpu": "60GiB"}``.
            dtype: output dtype of floating tensors (merge math is float32 regardless);
                default: the ingredients' own.
            base_model: a base checkpoint (Hub id or folder) for ``pivot="base"`` merges.
            endpoint: a Hub endpoint other than the default (``HF_ENDPOINT``).
            min_models: the fewest ingredients accepted; default 2, or 1 with a ``base_model``.
            tokenizer_source: vocabularies that differ (added tokens): the output's, ``"first"``,
                ``"base"``, ``"union"`` (the first tokenizer plus the others' added tokens) or an
                ingredient's id or index; embedding rows are matched by token and each merged from
                the models that have it. Default None: differing row counts are refused.
            pad_to_multiple_of, tokens: round the output's embedding rows up to a multiple of this;
                per-token row sources, mergekit's ``tokenizer.tokens`` ({token: {source, force}}).
            missing_tokens: a row some models lack: None (default) merged over its holders;
                ``"mergekit"`` as mergekit does (lacking models take a default row, tensors merge whole).
            heads: label sets that differ (``id2label``): ``"union"``, ``"base"``, ``"drop"`` (the
                body saved headless) or an ingredient (its head as it is). Default None: equal label
                sets only; the same labels in another order are always aligned by name.
            config_source: config fields that change the computation differ (``rope_theta``, ...):
                take ``"first"``'s, ``"base"``'s or an ingredient's. Default None: refused, listed.
            chat_template: ``"auto"`` (the one most models have), Jinja text, or a template bundled
                with mergekit (``"chatml"``, ...). Default None: the reference's tokenizer files.

        Compatibility (architecture, tensor names, shapes, dtypes, labels, config fields,
        vocabularies) is checked from config.json, tokenizer files and the safetensors headers
        alone, before any weight file is downloaded. Names that differ only by the architecture's
        ``base_model_prefix`` (a headless base beside headed fine-tunes) are aligned.
        """
        t0 = time.perf_counter()
        out_dtype = parse_dtype(dtype, "dtype")
        ings, base, least = parse_models(models, base_model, revision, min_models)
        everyone = ings + ([base] if base is not None else [])

        # 1. headers, tokenizers and configs checked before any weight is downloaded; 2. downloads
        choices = dict(tokenizer_source=tokenizer_source, pad_to_multiple_of=pad_to_multiple_of, heads=heads, tokens=tokens,
                       config_source=config_source, chat_template=chat_template, missing_tokens=missing_tokens)
        access = dict(trust_remote_code=trust_remote_code, cache_dir=cache_dir, token=token, endpoint=endpoint)
        check = Preflight(everyone, len(ings), least, choices, access)
        t1 = check_and_download(check, local_files_only=local_files_only)
        t2 = time.perf_counter()

        # 3. Placement from the reference ingredient's config (an adapter's: its base's), no weights materialised
        config_dir = open_ingredient(ings[0], Path(base.path) if base is not None else None).files_path
        dm = resolve_device_map(device_map, str(config_dir), max_memory=max_memory, dtype=out_dtype,
                                trust_remote_code=trust_remote_code)
        timings = {"resolve": t1 - t0, "download": t2 - t1, "placement": time.perf_counter() - t2}
        merger = cls(ings, dm, dtype=out_dtype, trust_remote_code=trust_remote_code, timings=timings, base=base,
                     rows=check.rows, choices=choices)
        merger.renames, merger.layouts, merger.skeleton = check.renames, check.layouts, check.skeleton
        return merger

    def __repr__(self) -> str:
        return f"AMEMerger({[i.id for i in self.ingredients]!r}, device_map={self.device_map!r})"


    # ------------------------------------------------------------------ scoring
    def _scorer(self, metric: Any, eval_dataset: Any, *, greater_is_better: Optional[bool], metric_key: Optional[str],
                metric_kwargs: Optional[Mapping[str, Any]], input_column: Optional[str], label_column: Optional[str],
                batch_size: int):
        if eval_dataset is None:
            raise IngredientError("eval_dataset: scoring needs a dataset (a datasets.Dataset or a dataset reference)")
        m = resolve_metric(metric, greater_is_better=greater_is_better, metric_key=metric_key, metric_kwargs=metric_kwargs)
        ds, ref = resolve_dataset(eval_dataset)
        if ref is not None:
            input_column = input_column or ref.input_column
            label_column = label_column or ref.label_column

        def run(model, path=None) -> float:
            return score_model(model, ds, m, model_path=path, input_column=input_column, label_column=label_column,
                               batch_size=batch_size)

        return m, ds, run

    def score(
        self,
        metric: Any,
        dataset: Any,
        *,
        greater_is_better: Optional[bool] = None,
        metric_key: Optional[str] = None,
        metric_kwargs: Optional[Mapping[str, Any]] = None,
        input_column: Optional[str] = None,
        label_column: Optional[str] = None,
        batch_size: int = 32,
        cache: Union[bool, str, os.PathLike, Any] = True,
        progress: bool = True,
    ) -> List[float]:
        """Score every ingredient (one model in memory at a time, placed by the device map, freed
        after); scores are cached on disk by (ingredient revision or file stamps, dataset
        fingerprint, metric). ``cache``: True (default location), False (off), a path, or a
        :class:`~hf_ame.scoring.ScoreCache`. Sets ``ingredient.score`` and returns the scores in
        ingredient order."""
        m, ds, run = self._scorer(metric, dataset, greater_is_better=greater_is_better, metric_key=metric_key,
                                  metric_kwargs=metric_kwargs, input_column=input_column, label_column=label_column,
                                  batch_size=batch_size)
        store = cache if isinstance(cache, ScoreCache) else ScoreCache(
            None if cache is True else (None if cache is False else cache), enabled=cache is not False)
        dfp = dataset_fingerprint(ds)
        extra = {"input": input_column, "label": label_column}
        scores: List[float] = []
        for ing in tqdm(self.ingredients, desc="hf_ame score", unit="model", disable=not progress):
            key = store.key(checkpoint_fingerprint(ing.path, ing.sha), dfp, m, extra)
            value = store.get(key)
            if value is None:
                t0 = time.perf_counter()
                model = load_model(ing.path, self.device_map, trust_remote_code=self.trust_remote_code)
                value = run(model, ing.path)
                del model
                release_memory()
                store.put(key, value, metric=m.name, model=ing.id, seconds=time.perf_counter() - t0)
            ing.score = value
            scores.append(value)
        self._last_scorer = (m, run)  # merge() reuses it for greedy steps and the merged model
        self.score_cache = store
        return scores

    # ------------------------------------------------------------------ merging
    def merge(
        self,
        config: Optional[AMEConfig] = None,
        *,
        order_by: Any = None,
        eval_dataset: Any = None,
        order: str = "best",
        top_k: Optional[int] = None,
        greedy: Optional[str] = None,
        greater_is_better: Optional[bool] = None,
        metric_key: Optional[str] = None,
        metric_kwargs: Optional[Mapping[str, Any]] = None,
        input_column: Optional[str] = None,
        label_column: Optional[str] = None,
        score_batch_size: int = 32,
        score_cache: Union[bool, str, os.PathLike, Any] = True,
        compare_soup: bool = False,
        output_dir: Union[str, os.PathLike, None] = None,
        overwrite: bool = False,
        max_shard_size: Union[int, str, None] = None,
        progress: bool = True,
        write_card: bool = True,
        stream: str = "auto",
        memory_budget: Optional[int] = None,
        search: Optional[Mapping[str, Any]] = None,
        n_trials: Optional[int] = None,
        allow_unchanged: bool = False,
        output: Optional[str] = None,
        rank: Optional[int] = None,
        **overrides: Any,
    ) -> MergeResult:
        """Run AME over the ingredients and return a :class:`MergeResult`.

        Args:
            config: an :class:`AMEConfig` (default ``AMEConfig()``); ``overrides`` replace its
                fields (``optimizer="adamw", lr=1e-3, epochs=5, ...``).
            order_by: rank ingredients by this metric on ``eval_dataset`` (a metric name, an
                ``evaluate.EvaluationModule`` or a callable ``(model, dataset) -> float``); the
                merged model is scored on the same data too.
            order: "best" (best first; default), "descending", "ascending" or "given".
            top_k: keep only the first k of that order.
            greedy: None, "soup" (greedy soup) or "ame" (greedy AME). Both hold the merge in memory.
            greater_is_better: the metric's direction; default: False for loss-like names, else True.
            compare_soup: also merge and score the uniform soup of the kept ingredients.
            output_dir: where to write; default a new temporary folder (see ``MergeResult.save_pretrained``).
            overwrite: replace an existing ``output_dir``.
            max_shard_size: output shard size (bytes or "5GB"; default the recipe's, else "5GB").
            progress: show progress bars.
            write_card: write README.md (model card), the scores chart and ame_recipe.yaml into the output.
            stream: "ingredient" (on CPU with a coordinate-wise optimizer: one block of ~2**18
                coordinates of every ingredient at a time, each input byte read once; otherwise one
                ingredient's copy of a tensor at a time: memory independent of N), "tensor" (the N
                copies of one tensor in memory) or "auto" (default: "ingredient" where blocks
                stream, else "ingredient" only when 2 x N copies of the largest tensor exceed
                ``memory_budget`` bytes, by default half the available memory).
            search: a validation search (:mod:`hf_ame.search`): {AMEConfig field: list of values}
                (a grid) or, with ``n_trials``, {field: list or {low, high, log}} sampled by Optuna;
                needs ``order_by`` and ``eval_dataset``. Trial 0 is the exact soup; every trial is
                merged (streamed, one folder at a time) and scored; the best is kept (the soup on
                a tie), so the result never scores below the soup on that split.
                ``result.search`` lists every trial.
            n_trials: the number of Optuna trials besides the soup (None: the grid).
            allow_unchanged: write the output even when every merged tensor equals one input while the
                others differ; default False: refused (``UnchangedMergeError``). Some: a warning, in the card.
            output: "model" (default) or "lora": a peft LoRA adapter folder over the base instead of
                a model (:mod:`hf_ame.lora_out`): adapters merged linearly are concatenated (exact),
                otherwise each module's merged delta is factored by truncated SVD at ``rank``.
            rank: the LoRA rank of ``output="lora"`` (None: adapters concatenated at their summed rank).

        With a recipe (:meth:`from_recipe`), ``config``, the ordering (when ``order_by`` is not
        given) and ``max_shard_size`` default to the recipe's.
        """
        req = self._request(config, overrides, dict(
            order_by=order_by, eval_dataset=eval_dataset, order=order, top_k=top_k, greedy=greedy,
            greater_is_better=greater_is_better, metric_key=metric_key, metric_kwargs=metric_kwargs,
            input_column=input_column, label_column=label_column, score_batch_size=score_batch_size,
            score_cache=score_cache, compare_soup=compare_soup, max_shard_size=max_shard_size, stream=stream,
            memory_budget=memory_budget, search=search, n_trials=n_trials, allow_unchanged=allow_unchanged,
            output=output, rank=rank))
        return self._write(req, output_dir, overwrite=overwrite, progress=progress, write_card=write_card)

    def _write(self, req: "_Request", output_dir: Union[str, os.PathLike, None], *, overwrite: bool, progress: bool,
               write_card: bool) -> MergeResult:
        """Weights, config, card, chart and recipe, all written in one staging folder moved into place
        in one rename at the end (the old folder, with overwrite, deleted only after that)."""
        inputs = [i.path for i in self.ingredients] + ([self.base.path] if self.base is not None else [])
        if self.recipe is not None and self.recipe.slices and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("slices: layer stacking and slice merges run in one process; run this recipe without "
                              "torchrun / accelerate launch (WORLD_SIZE > 1)")
        if output_dir is not None:
            check_output_dir(output_dir, overwrite, inputs)  # before any scoring or merging
        temp_root = None
        if output_dir is None:  # removed at exit or by result.cleanup(), unless saved (save_pretrained moves it)
            temp_root = scratch_dir("merge")
            output_dir = temp_root / "merged"
        with _staging(output_dir, overwrite, inputs, temp_root) as target:
            if req.output == "lora":  # a peft adapter folder over the base (hf_ame.lora_out)
                result = lora_output(self, Path(target), req, overwrite=overwrite, progress=progress,
                                     merge_into=AMEMerger._merge_into)
            elif self.recipe is not None and self.recipe.slices:  # mergekit's slices: stacked, or merged and stacked
                result = self._stack_into(Path(target), req, overwrite=overwrite, progress=progress)
            else:
                result = self._merge_into(Path(target), req, overwrite=overwrite, progress=progress)
            if temp_root is not None:
                result.own_temporary(temp_root)
            if write_card and result.report.rank == 0:
                # a Hub recipe's repo id is not carried into the output's recipe (a local file a bare --push trusts)
                result.write_card(self.recipe.hub.get("repo_id") if self.recipe is not None and not self.recipe.remote
                                  else None)
        result.output_dir = result.report.output_dir = Path(output_dir)
        if getattr(result, "lora", None) is not None:
            result.lora.output_dir = Path(output_dir)
        return result

    def plan(self, config: Optional[AMEConfig] = None, *, output_dir: Union[str, os.PathLike, None] = None,
             overwrite: bool = False, **merge_kwargs: Any) -> MergePlan:
        """What :meth:`merge` with the same arguments will do, from configs and headers alone: no
        weight is read, nothing is written. Returns a :class:`~hf_ame.plan.MergePlan` (``print`` it).
        With ``order_by`` / ``top_k`` / ``greedy`` the ingredients kept depend on scores not yet
        computed: the plan covers every candidate in the given order (an upper bound) and says so."""
        req = self._request(config, {k: v for k, v in merge_kwargs.items() if k not in _MERGE_ARGS},
                            {k: v for k, v in merge_kwargs.items() if k in _MERGE_ARGS})
        target = Path(output_dir) if output_dir is not None else Path(tempfile.gettempdir()) / "hf_ame-<temporary>" / "merged"
        if self.recipe is not None and self.recipe.slices:
            return self._slices_run(target, req, overwrite=overwrite if output_dir is not None else True,
                                    progress=False, dry_run=True)
        ckpts = [open_ingredient(i) for i in self.ingredients]  # a GGUF: its named file
        cfg = AMEConfig.soup() if req.greedy == "soup" else req.cfg
        base = self.open_checkpoint(self.base) if self._uses_base(cfg, ckpts) else None
        device = tensor_device_lookup(self.device_map, str(ckpts[0].files_path), self.trust_remote_code)
        plan = plan_merge(ckpts, target, cfg, base=base, dtype=self.dtype, max_shard_size=req.max_shard_size,
                          overwrite=overwrite if output_dir is not None else True, device_map=device,
                          stream=req.stream if req.greedy is None else "auto", memory_budget=req.memory_budget,
                          min_ingredients=1 if req.greedy else 2, rows=self.rows)
        if req.order_by is not None:
            plan.notes.append(f"ingredients are scored by {_metric_name(req.order_by)} first; "
                              + ("the greedy pass then keeps some of them, in memory; " if req.greedy else "")
                              + (f"top_k={req.top_k} keeps the best {req.top_k}; " if req.top_k else "")
                              + "this plan covers every candidate in the given order")
        if output_dir is None:
            plan.notes.append("no output_dir: merge() writes to a temporary folder, removed at exit or by result.cleanup()")
        return plan

    def _request(self, config: Optional[AMEConfig], overrides: Mapping[str, Any], kw: Dict[str, Any]) -> "_Request":
        """The merge's arguments with the recipe's defaults filled in, validated before any work."""
        req = _Request(**kw)
        r = self.recipe
        if r is not None:
            config = config or r.merge
            req.max_shard_size = req.max_shard_size or r.output.get("max_shard_size")
            if req.order_by is None and r.ordering:
                req.from_recipe_ordering(r.ordering)
        req.max_shard_size = req.max_shard_size or "5GB"
        req.output = req.output or (r.output.get("format") if r is not None else None) or "model"
        req.rank = req.rank if req.rank is not None else (r.output.get("rank") if r is not None else None)
        if req.output not in ("model", "lora"):
            raise ConfigError(f"output: expected 'model' or 'lora' (a peft LoRA adapter), got {req.output!r}")
        check_rank(req.rank)
        if req.output == "lora" and self.recipe is not None and self.recipe.slices:
            raise ConfigError("output='lora': not with a recipe's slices (merge them into a model first)")
        cfg = config.replace(**overrides) if config is not None else AMEConfig.from_options(**overrides)
        cfg.validate()
        check_config_limits(cfg, req.top_k or len(self.ingredients))  # before anything is read or planned
        if req.greedy not in GREEDY_MODES:
            raise ConfigError(f"greedy: expected one of None, 'soup', 'ame', got {req.greedy!r}")
        if req.greedy is not None and self.rows is not None and self.rows.tensors:
            raise ConfigError(f"greedy: greedy modes hold candidates as same-shaped tensors; these ingredients' rows "
                              f"differ ({', '.join(sorted(set(self.rows.tensors.values())))}): merge without greedy")
        if (req.greedy is not None or req.top_k is not None or req.order not in ("best", "given")
                or req.search is not None) and req.order_by is None:
            raise ConfigError("order_by: greedy modes, top_k, ordering and search need a metric (order_by=) and eval_dataset=")
        if req.search is not None:
            check_space(req.search, req.n_trials)
            if req.greedy is not None:
                raise ConfigError("search: a search keeps its best trial; it does not combine with greedy modes")
        if cfg.method is not None and get_method(cfg.method).needs_base and cfg.pivot == "soup" and self.base is not None:
            cfg = cfg.replace(pivot="base")  # task vectors are measured from the base model given
        if cfg.pivot == "base":  # "the base_model given to from_pretrained"
            if self.base is None:
                raise ConfigError("pivot: 'base' needs from_pretrained(..., base_model=...)"
                                  + (f" (method {cfg.method!r} measures task vectors from it)" if cfg.method else ""))
            cfg = cfg.replace(pivot=self.base.id)
        if cfg.method is not None and not self._merges_slices():  # slices: each is checked as it is planned
            base_pivot = resolve_pivot(cfg.pivot, len(self.ingredients), [i.id for i in self.ingredients]).is_base
            check_counts(cfg.method, cfg.method_arguments(), req.top_k or len(self.ingredients), base_pivot)
        req.cfg = cfg
        return req

    def _merges_slices(self) -> bool:
        return self.recipe is not None and bool(self.recipe.slices) and "sources" in self.recipe.slices[0]

    def _uses_base(self, cfg: AMEConfig, ckpts: List[Checkpoint]) -> bool:
        """The base is read: as the pivot, or as the source of some rows (heads="base")."""
        if self.base is None:
            return False
        rows = self.rows.maps.values() if self.rows is not None else ()
        return _pivot_is_base(cfg, ckpts) or any(self.base.id in m.sources for m in rows)

    def open_checkpoint(self, ing: Ingredient) -> Checkpoint:
        """The ingredient's checkpoint (or the base's), its tensors keyed as the merge names them (see
        ``renames``): as transformers would read it, layouts converted, custom code allowed only with
        consent. The caller closes it."""
        ckpt = open_ingredient(ing, Path(self.base.path) if (self.base is not None and ing is not self.base) else None)
        if ing.id in self.layouts:
            ckpt = ConvertedCheckpoint(ckpt, self.skeleton, self.layouts[ing.id])
        ckpt.trust_remote_code = self.trust_remote_code  # its .py files reach the output only with consent
        return ckpt.rekey(self.renames[ing.id]) if ing.id in self.renames else ckpt

    def _slices_run(self, target: Path, req: "_Request", *, overwrite: bool, progress: bool, dry_run: bool = False):
        """A recipe's slices: a layer stacking (tensors copied and renamed), or slices merged by the
        method (:mod:`hf_ame.slice_merge`) into one output. The plan (every slice's tensors, a note
        per slice) with ``dry_run``."""
        slices = self.recipe.slices
        if not self._merges_slices():
            return stack_checkpoints([self.open_checkpoint(i) for i in self.ingredients],
                                     [LayerSlice(s["model"], *s["layer_range"], s.get("scale")) for s in slices], target,
                                     dtype=self.dtype, max_shard_size=req.max_shard_size, overwrite=overwrite,
                                     progress=progress, dry_run=dry_run)
        merged = [MergeSlice([SliceSource(s["model"], *s["layer_range"]) for s in sl["sources"]], sl.get("base"),
                             dict(sl.get("method_kwargs") or {})) for sl in slices]
        return merge_slices(lambda i: self.open_checkpoint(self.ingredients[i]), len(self.ingredients), merged, target, req.cfg,
                            dtype=self.dtype, max_shard_size=req.max_shard_size, overwrite=overwrite,
                            progress=progress, rows=self.rows, dry_run=dry_run)

    def _stack_into(self, target: Path, req: "_Request", *, overwrite: bool, progress: bool) -> MergeResult:
        """A recipe's slices: stacked (no merge arithmetic) or merged slice by slice, then stacked."""
        t0 = time.perf_counter()
        report = self._slices_run(target, req, overwrite=overwrite, progress=progress)
        report.ingredients = [i.id for i in self.ingredients]  # every model the slices take layers from
        timings = dict(self.timings, merge=time.perf_counter() - t0)
        ings = [Ingredient(**vars(i)) for i in self.ingredients]
        result = MergeResult(target, req.cfg, ings, report, self.device_map, self.dtype, timings, self.trust_remote_code)
        result.candidates = [i.id for i in ings]
        result.max_shard_size = req.max_shard_size
        result.mergekit_config = (self.recipe.provenance or {}).get("mergekit_config")
        result.slices = self.recipe.slices
        result.alignment = list(self.rows.notes) if self.rows is not None else []  # vocabulary, config choices
        result.choices = dict(self.choices)  # tokenizer_source, missing_tokens, ...: the written recipe re-runs them
        result.warnings = self._ignored_keys() + ([unchanged_note(report)] if report.unchanged else [])
        return result

    def _choose(self, req: "_Request", timings: Dict[str, float], progress: bool):
        """Score (with ``order_by``), rank and keep: (every ingredient with its order/kept, the kept
        ones in merge order, the metric, the scoring function)."""
        metric = run = None
        if req.order_by is not None:
            t0 = time.perf_counter()
            self.score(req.order_by, req.eval_dataset, greater_is_better=req.greater_is_better,
                       metric_key=req.metric_key, metric_kwargs=req.metric_kwargs, input_column=req.input_column,
                       label_column=req.label_column, batch_size=req.score_batch_size, cache=req.score_cache,
                       progress=progress)
            metric, run = self._last_scorer
            timings["score"] = time.perf_counter() - t0
        ranked, kept = rank([i.score for i in self.ingredients], greater_is_better=metric.greater_is_better if metric else True,
                            order=req.order if req.order_by is not None else "given", top_k=req.top_k)
        ings = [Ingredient(**vars(i)) for i in self.ingredients]
        for pos, k in enumerate(ranked):
            ings[k].order = pos
            ings[k].kept = k in kept
        return ings, [ings[k] for k in kept], metric, run

    def _merge_into(self, target: Path, req: "_Request", *, overwrite: bool, progress: bool) -> MergeResult:
        timings = dict(self.timings)
        ings, chosen, metric, run = self._choose(req, timings, progress)
        ckpts = [self.open_checkpoint(i) for i in chosen]
        base = self.open_checkpoint(self.base) if self.base is not None else None
        device = tensor_device_lookup(self.device_map, str(ckpts[0].files_path), self.trust_remote_code)
        t1 = time.perf_counter()
        cfg, greedy_log = req.cfg, None
        kw = dict(dtype=self.dtype, max_shard_size=req.max_shard_size, overwrite=overwrite, progress=progress,
                  device_map=device)
        search = None
        if req.search is not None:
            search = Search(req.cfg, req.search, req.n_trials, greater_is_better=metric.greater_is_better)
            if self._held_search(req, ckpts, base, device):
                cfg, report = self._merge_search_held(search, ckpts, base, run, target, kw)
            else:
                cfg, report = self._merge_search(search, req, ckpts, base, lambda path: run(self._load(path), path),
                                                 target, kw)
        elif req.greedy is None:
            report = merge_checkpoints(ckpts, target, cfg, base=base if self._uses_base(cfg, ckpts) else None,
                                       stream=req.stream, memory_budget=req.memory_budget, rows=self.rows, **kw)
        else:
            cfg, report, greedy_log = self._merge_greedy(req, ckpts, chosen, base, run, metric, target, kw)
        timings["merge"] = time.perf_counter() - t1
        result = MergeResult(target, cfg, ings, report, self.device_map, self.dtype, timings, self.trust_remote_code)
        result.search = search.record() if search is not None else None
        result.greedy = req.greedy
        result.greedy_log = greedy_log.entries if greedy_log else None
        result.candidates = [i.id for i in chosen]
        result.max_shard_size = req.max_shard_size
        result.base_id = self.base.id if (self.base is not None and _pivot_is_base(cfg, ckpts)) else None
        result.mergekit_config = ((self.recipe.provenance or {}).get("mergekit_config")
                                  if self.recipe is not None else None)
        result.alignment = list(self.rows.notes) if self.rows is not None else []
        if report.counters_maxed:  # BatchNorm step counters of fine-tunes of different lengths
            result.alignment.append(f"num_batches_tracked differs between the models: the maximum was taken for "
                                    f"{len(report.counters_maxed)} tensor(s) ({', '.join(report.counters_maxed[:3])}"
                                    + (", ..." if len(report.counters_maxed) > 3 else "") + ")")
        result.choices = dict(self.choices)
        result.warnings.extend(self._ignored_keys() + self._unchanged_warnings(report, req, ckpts, base))
        if metric is not None:
            self._score_result(result, req, metric, run, chosen, device, ings)
            result.ordering = req.ordering_record()
        return result

    def _ignored_keys(self) -> List[str]:
        ignored = ((self.recipe.provenance or {}).get("mergekit_ignored") or []) if self.recipe is not None else []
        return [f"mergekit config: ignored {', '.join(ignored)} (mergekit 0.1.5 ignores them too)"] if ignored else []

    def _unchanged_warnings(self, report: MergeReport, req: "_Request", ckpts: List[Checkpoint],
                            base: Optional[Checkpoint]) -> List[str]:
        """The card's note on tensors returned equal to their pivot; every merged tensor so is refused
        unless ``allow_unchanged`` (the output is still staged: nothing lands)."""
        note = unchanged_note(report)
        if note is None:
            return []
        if len(report.unchanged) == report.merged_tensors and not req.allow_unchanged:
            kind, idx = resolve_pivot(req.cfg.pivot, len(ckpts), [c.name for c in ckpts])
            which = base.name if (kind == "base" and base is not None) else (ckpts[idx].name if kind == "index" else "?")
            raise UnchangedMergeError(f"every merged tensor ({report.merged_tensors}) equals {which!r} bit for bit "
                                      f"although the other models differ from it: the output would be that model, "
                                      f"not a merge; nothing was written (allow_unchanged=True / --allow-unchanged "
                                      f"writes it anyway)")
        return [note]

    def _load(self, path: Path) -> Any:
        return load_model(path, self.device_map, trust_remote_code=self.trust_remote_code)

    def _merge_search(self, search: Search, req: "_Request", ckpts: List[Checkpoint], base: Optional[Checkpoint],
                      score: Any, target: Path, kw: Dict[str, Any]) -> Tuple[AMEConfig, MergeReport]:
        """Each trial merged (streamed) into a folder of its own and scored; the best one's files
        are moved into ``target``, the others removed as soon as they lose."""
        root = scratch_dir("search")
        best: Optional[Tuple[float, Path, MergeReport]] = None
        try:
            for trial in search:
                out = root / f"trial-{trial.number}"
                report = merge_checkpoints(ckpts, out, trial.config, base=base if self._uses_base(trial.config, ckpts)
                                           else None, stream=req.stream, memory_budget=req.memory_budget, rows=self.rows,
                                           **{**kw, "progress": False, "overwrite": False})
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
                shutil.move(str(p), str(target / p.name))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        report = best[2]  # type: ignore[index]
        report.output_dir = target
        return search.best.config, report

    def _held_search(self, req: "_Request", ckpts: List[Checkpoint], base: Optional[Checkpoint], device: Any) -> bool:
        """Small models' trials run from ingredients held once in memory: every floating tensor of
        every ingredient within ``memory_budget`` (default 2 GiB), merged on the CPU, rows not
        re-matched, ``stream="auto"``. Otherwise each trial streams from the files."""
        if req.stream != "auto" or (self.rows is not None and self.rows.tensors):
            return False
        if not all(device(n).type == "cpu" for n in ckpts[0].tensors):
            return False
        used = base if self._uses_base(req.cfg, ckpts) else None
        return held_bytes(ckpts, used) <= (req.memory_budget or HELD_LIMIT)

    def _merge_search_held(self, search: Search, ckpts: List[Checkpoint], base: Optional[Checkpoint], run: Any,
                           target: Path, kw: Dict[str, Any]) -> Tuple[AMEConfig, MergeReport]:
        """Each trial merged in memory and scored through one in-memory model; only the best is written."""
        t0 = time.perf_counter()
        held = HeldIngredients.read(ckpts, base if self._uses_base(search.config, ckpts) else None)
        slot = ModelSlot(ckpts[0], self._load, lambda model: run(model, ckpts[0].path))
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
        files = save_state(state, ckpts[0], target, dtype=self.dtype, max_shard_size=kw["max_shard_size"],
                           overwrite=kw["overwrite"])
        cfg = search.best.config
        report = MergeReport(target, [c.name for c in ckpts], cfg,
                             str(self.dtype or model_dtype(ckpts[0])).replace("torch.", ""),
                             tensors=len(ckpts[0].tensors), parameters=sum(i.numel for i in ckpts[0].tensors.values()),
                             merged_tensors=len(state), copied_tensors=len(ckpts[0].tensors) - len(state),
                             steps=len(plan_steps(len(ckpts), cfg)), files=files, seconds=time.perf_counter() - t0)
        return cfg, report

    def _merge_greedy(self, req: "_Request", ckpts: List[Checkpoint], chosen: List[Ingredient], base: Optional[Checkpoint],
                      run: Any, metric: Any, target: Path, kw: Dict[str, Any]):
        """Greedy soup (then the exact soup of what it kept, streamed) or greedy AME (held in memory,
        then written): (the config used, the report, the greedy log)."""
        slot = ModelSlot(ckpts[0], lambda p: load_model(p, self.device_map, trust_remote_code=self.trust_remote_code),
                         lambda model: run(model, chosen[0].path))
        log = GreedyLog()
        t0 = time.perf_counter()
        try:
            if req.greedy == "soup":
                accepted, _ = greedy_soup(ckpts, chosen[0].score, slot, greater_is_better=metric.greater_is_better, log=log)
                for k, ing in enumerate(chosen):
                    ing.kept = k in accepted
                cfg = AMEConfig.soup()
                report = merge_checkpoints([ckpts[k] for k in accepted], target, cfg, min_ingredients=1, **kw)
                return cfg, report, log
            cfg = req.cfg
            state, _ = greedy_ame(ckpts, cfg, slot, base=base if _pivot_is_base(cfg, ckpts) else None,
                                  greater_is_better=metric.greater_is_better, log=log)
            files = save_state(state, ckpts[0], target, dtype=self.dtype, max_shard_size=req.max_shard_size,
                               overwrite=kw["overwrite"])
            report = MergeReport(target, [c.name for c in ckpts], cfg,
                                 str(self.dtype or model_dtype(ckpts[0])).replace("torch.", ""),
                                 tensors=len(ckpts[0].tensors), parameters=sum(i.numel for i in ckpts[0].tensors.values()),
                                 merged_tensors=len(state), copied_tensors=len(ckpts[0].tensors) - len(state),
                                 steps=len(log.entries) - 1, files=files, seconds=time.perf_counter() - t0)
            return cfg, report, log
        finally:
            slot.close()

    def _score_result(self, result: MergeResult, req: "_Request", metric: Any, run: Any, chosen: List[Ingredient],
                      device: Any, ings: List[Ingredient]) -> None:
        """Score the merged model (and, with ``compare_soup``, the soup of the kept ingredients)."""
        t2 = time.perf_counter()
        scores: Dict[str, Any] = {"merged": run(result.model, result.output_dir)}
        best = max(ings, key=lambda i: (i.score if metric.greater_is_better else -i.score, -ings.index(i)))
        scores["best_ingredient"] = {"id": best.id, "score": best.score}
        if req.compare_soup:
            soup_root = scratch_dir("soup")
            try:
                merge_checkpoints([self.open_checkpoint(i) for i in chosen], soup_root / "soup", AMEConfig.soup(),
                                  dtype=self.dtype, progress=False, device_map=device, min_ingredients=1, rows=self.rows)
                soup_model = load_model(soup_root / "soup", self.device_map, trust_remote_code=self.trust_remote_code)
                scores["soup"] = run(soup_model, chosen[0].path)
                del soup_model
                release_memory()
            finally:
                shutil.rmtree(soup_root, ignore_errors=True)
        result.timings["score_merged"] = time.perf_counter() - t2
        result.metric = {"name": metric.name, "greater_is_better": metric.greater_is_better, "shipped": metric.shipped}
        result.scores = scores


_MERGE_ARGS = ("order_by", "eval_dataset", "order", "top_k", "greedy", "greater_is_better", "metric_key", "metric_kwargs",
               "input_column", "label_column", "score_batch_size", "score_cache", "compare_soup", "max_shard_size",
               "stream", "memory_budget", "progress", "write_card", "search", "n_trials", "output", "rank")


def _metric_name(order_by: Any) -> str:
    return order_by if isinstance(order_by, str) else getattr(order_by, "name", getattr(order_by, "__name__", "custom"))


@dataclass
class _Request:
    """:meth:`AMEMerger.merge`'s arguments once the recipe's defaults are in (``cfg``: the config used)."""

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

    def from_recipe_ordering(self, o: Mapping[str, Any]) -> None:
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
        return {"metric": _metric_name(self.order_by), "dataset": ds, "order": self.order, "top_k": self.top_k,
                "greedy": self.greedy, "greater_is_better": self.greater_is_better, "metric_key": self.metric_key,
                "metric_kwargs": dict(self.metric_kwargs) if self.metric_kwargs else None}


@contextlib.contextmanager
def _staging(output_dir: Union[str, os.PathLike], overwrite: bool, inputs: Sequence[Any],
             temp_root: Optional[Path] = None) -> Iterator[Path]:
    """:func:`~hf_ame.output.staged_output` for a whole merge; under ``torchrun`` / ``accelerate
    launch`` (WORLD_SIZE > 1) the engine's rank 0 stages the weights and the card is added after.
    A failed merge into a temporary folder removes that folder."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            yield Path(output_dir)
        else:
            with staged_output(output_dir, overwrite, inputs) as target:
                yield target
    except BaseException:
        if temp_root is not None:
            shutil.rmtree(temp_root, ignore_errors=True)
        raise


def _pivot_is_base(cfg: AMEConfig, ckpts: List[Checkpoint]) -> bool:
    return resolve_pivot(cfg.pivot, len(ckpts), [c.name for c in ckpts]).is_base
