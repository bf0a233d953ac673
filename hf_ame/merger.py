"""The user-facing API: ``AMEMerger.from_pretrained(...).merge(...) -> MergeResult``: loading and
orchestration; scoring, search and the greedy modes are :mod:`hf_ame.selection`'s."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .algorithm import resolve_pivot
from .checkpoints import Checkpoint
from .config import AMEConfig, parse_dtype
from .engine import MergeReport, stack_checkpoints
from .errors import ConfigError, UnchangedMergeError
from .executor import unchanged_note
from .hub import Ingredient
from .layouts import ConvertedCheckpoint
from .lora_out import check_rank, lora_output
from .limits import check_config_limits
from .methods import check_counts, get_method
from .options import AlignOptions
from .output import check_output_dir, staged_output
from .preflight import Preflight, check_and_download, open_ingredient, parse_models
from .placement import load_model, resolve_device_map, tensor_device_lookup
from .plan import MergePlan
from .recipe import load_recipe
from .result import MergeResult
from .rows import RowAlignment
from .scratch import scratch_dir
from .selection import (Choice, MergeRequest, Outcome, PreparedMerge, check_selection, choose, make_scorer,
                        merge_prepared, merged_config, open_score_cache, pivot_is_base, plan_notes, plan_prepared,
                        record_outcome, score_ingredients, score_merged, uses_base)
from .slice_merge import MergeSlice, SliceSource, merge_slices
from .stacking import LayerSlice

__all__ = ["AMEMerger", "MergeResult"]

ModelEntry = Union[str, os.PathLike, Mapping[str, Any]]


class AMEMerger:
    """Ingredients resolved, checked and placed; call :meth:`merge`.

    Build it with :meth:`from_pretrained`. ``ingredients`` keeps the given order (the order AME
    steps in unless the merge re-orders them).
    """

    def __init__(self, ingredients: List[Ingredient], device_map: Dict[str, str], *,
                 dtype: Optional[torch.dtype] = None, trust_remote_code: bool = False,
                 timings: Optional[Dict[str, float]] = None, base: Optional[Ingredient] = None,
                 rows: Optional[RowAlignment] = None, choices: Optional[Dict[str, Any]] = None):
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
        for key in AlignOptions.names():
            if recipe.output.get(key) is not None:
                load.setdefault(key, recipe.output[key])
        load.setdefault("base_model", recipe.base_model)  # a base_model given here replaces the recipe's
        merger = cls.from_pretrained(recipe.models, token=token, endpoint=endpoint, **load)
        merger.recipe = recipe
        return merger

    @classmethod
    def from_pretrained(
        cls, models: Sequence[ModelEntry], *, revision: Optional[str] = None, token: Union[bool, str, None] = None,
        cache_dir: Union[str, os.PathLike, None] = None, local_files_only: bool = False,
        device_map: Union[None, str, int, torch.device, Mapping[str, Any]] = "auto",
        max_memory: Optional[Mapping[Union[int, str], Union[int, str]]] = None,
        dtype: Union[str, torch.dtype, None] = None, trust_remote_code: bool = False,
        base_model: Optional[ModelEntry] = None, endpoint: Optional[str] = None, min_models: Optional[int] = None,
        tokenizer_source: Union[str, int, None] = None, pad_to_multiple_of: Optional[int] = None,
        missing_tokens: Optional[str] = None, tokens: Optional[Mapping[str, Mapping[str, Any]]] = None,
        heads: Union[str, int, None] = None, config_source: Union[str, int, None] = None,
        chat_template: Optional[str] = None, layout: Optional[str] = None,
    ) -> "AMEMerger":
        """Resolve, check and fetch the ingredients (transformers' argument names and meanings).

        Args:
            models: Hub ids, folders, or ``{"id", "revision", "base"}`` mappings (``base``: a LoRA adapter's).
            revision: default revision for Hub entries (branch, tag or commit); default "main".
            token, cache_dir, local_files_only: as in ``huggingface_hub.snapshot_download``.
            device_map: "auto" (Accelerate over an empty-weight skeleton), "cpu", "cuda:0", or a
                {module: device} dict; each tensor is merged on the device its module maps to.
            max_memory: per-device budget for "auto", e.g. ``{0: "20GiB", "cpu": "60GiB"}``.
            dtype: output dtype of floating tensors (merge math is float32 regardless); default: the ingredients' own.
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
            layout: the tensors a merge sees, for architectures transformers converts on load (MoE
                experts): None or ``"original"`` (default) as stored by ``save_pretrained`` (one
                tensor per expert: a method trims each expert on its own); ``"in_memory"`` as
                transformers holds them (one fused tensor per layer's experts, trimmed together),
                written so too: mergekit's granularity, which mergekit configs get.

        Compatibility (architecture, tensor names, shapes, dtypes, labels, config fields,
        vocabularies) is checked from config.json, tokenizer files and the safetensors headers
        alone, before any weight file is downloaded. Names that differ only by the architecture's
        ``base_model_prefix`` (a headless base beside headed fine-tunes) are aligned.
        """
        t0 = time.perf_counter()
        out_dtype = parse_dtype(dtype, "dtype")
        ings, base, least = parse_models(models, base_model, revision, min_models)
        choices = AlignOptions(tokenizer_source=tokenizer_source, pad_to_multiple_of=pad_to_multiple_of, heads=heads,
                               tokens=tokens, config_source=config_source, chat_template=chat_template,
                               missing_tokens=missing_tokens, layout=layout).to_dict()
        access = dict(trust_remote_code=trust_remote_code, cache_dir=cache_dir, token=token, endpoint=endpoint)
        check, t1 = _preflight(ings, base, least, choices, access, local_files_only=local_files_only)
        return cls._placed(check, device_map, max_memory, out_dtype, times=(t0, t1))

    @classmethod
    def _placed(cls, check: Preflight, device_map: Any, max_memory: Any, dtype: Optional[torch.dtype], *,
                times: Tuple[float, float]) -> "AMEMerger":
        """3. The merger of the ingredients (and base) ``check`` passed, placed from the reference
        ingredient's config (an adapter's: its base's; no weights materialised), with what the check
        found: rows matched, tensor renames, layouts. ``times``: when resolving began, when the checks ended."""
        everyone, n, trust = check.everyone, check.n, check.access["trust_remote_code"]
        base = everyone[n] if len(everyone) > n else None
        t2 = time.perf_counter()
        config_dir = open_ingredient(everyone[0], Path(base.path) if base is not None else None).files_path
        dm = resolve_device_map(device_map, str(config_dir), max_memory=max_memory, dtype=dtype,
                                trust_remote_code=trust)
        timings = {"resolve": times[1] - times[0], "download": t2 - times[1], "placement": time.perf_counter() - t2}
        merger = cls(everyone[:n], dm, dtype=dtype, trust_remote_code=trust, timings=timings, base=base,
                     rows=check.rows, choices=check.choices)
        merger.renames, merger.layouts, merger.skeleton = check.renames, check.layouts, check.skeleton
        return merger

    def __repr__(self) -> str:
        return f"AMEMerger({[i.id for i in self.ingredients]!r}, device_map={self.device_map!r})"

    def _load(self, path: Path) -> Any:
        """A folder's model, placed by the device map (every model the merge scores)."""
        return load_model(path, self.device_map, trust_remote_code=self.trust_remote_code)

    # ------------------------------------------------------------------ scoring
    def score(
        self, metric: Any, dataset: Any, *, greater_is_better: Optional[bool] = None, metric_key: Optional[str] = None,
        metric_kwargs: Optional[Mapping[str, Any]] = None, input_column: Optional[str] = None,
        label_column: Optional[str] = None, batch_size: int = 32,
        cache: Union[bool, str, os.PathLike, Any] = True, progress: bool = True,
    ) -> List[float]:
        """Score every ingredient (one model in memory at a time, placed by the device map, freed
        after); scores are cached on disk by (ingredient revision or file stamps, dataset
        fingerprint, metric). ``cache``: True (default location), False (off), a path, or a
        :class:`~hf_ame.scoring.ScoreCache`. Sets ``ingredient.score`` and returns the scores in
        ingredient order."""
        scorer = make_scorer(metric, dataset, greater_is_better=greater_is_better, metric_key=metric_key,
                             metric_kwargs=metric_kwargs, input_column=input_column, label_column=label_column,
                             batch_size=batch_size)
        store = open_score_cache(cache)
        scores = score_ingredients(self.ingredients, scorer, store, self._load, progress=progress)
        self._last_scorer = scorer  # merge() reuses it for greedy steps and the merged model
        self.score_cache = store
        return scores

    # ------------------------------------------------------------------ merging
    def merge(
        self, config: Optional[AMEConfig] = None, *, order_by: Any = None, eval_dataset: Any = None,
        order: str = "best", top_k: Optional[int] = None, greedy: Optional[str] = None,
        greater_is_better: Optional[bool] = None, metric_key: Optional[str] = None,
        metric_kwargs: Optional[Mapping[str, Any]] = None, input_column: Optional[str] = None,
        label_column: Optional[str] = None, score_batch_size: int = 32,
        score_cache: Union[bool, str, os.PathLike, Any] = True, compare_soup: bool = False,
        output_dir: Union[str, os.PathLike, None] = None, overwrite: bool = False,
        max_shard_size: Union[int, str, None] = None, progress: bool = True, write_card: bool = True,
        stream: str = "auto", memory_budget: Optional[int] = None, search: Optional[Mapping[str, Any]] = None,
        n_trials: Optional[int] = None, allow_unchanged: bool = False, output: Optional[str] = None,
        rank: Optional[int] = None, **overrides: Any,
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
            stream: "ingredient" (on CPU with a coordinate-wise optimizer: one block of ~2**18 coordinates of every
                ingredient at a time, each input byte read once; otherwise one ingredient's copy of a tensor at a time:
                memory independent of N), "tensor" (the N copies of one tensor in memory) or "auto" (default:
                "ingredient" where blocks stream, else "ingredient" only when 2 x N copies of the largest tensor exceed
                ``memory_budget`` bytes, by default half the available memory).
            search: a validation search (:mod:`hf_ame.search`): {AMEConfig field: list of values} (a grid) or, with
                ``n_trials``, {field: list or {low, high, log}} sampled by Optuna; needs ``order_by`` and
                ``eval_dataset``. Trial 0 is the exact soup; every trial is merged (streamed, one folder at a time) and
                scored; the best is kept (the soup on a tie), so the result never scores below the soup on that split.
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

    def _write(self, req: MergeRequest, output_dir: Union[str, os.PathLike, None], *, overwrite: bool, progress: bool,
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
        args, overrides = MergeRequest.split(merge_kwargs)
        req = self._request(config, overrides, args)
        target, overwrite = ((Path(output_dir), overwrite) if output_dir is not None  # else: as merge(), a new folder
                             else (Path(tempfile.gettempdir()) / "hf_ame-<temporary>" / "merged", True))
        if self.recipe is not None and self.recipe.slices:
            return self._slices_run(target, req, overwrite=overwrite, progress=False, dry_run=True)
        ckpts = [self.open_checkpoint(i) for i in self.ingredients]  # as merge() opens them
        plan = plan_prepared(self._prepare(req, ckpts, target, overwrite=overwrite, progress=False, lazy_base=True))
        plan.notes.extend(plan_notes(req))
        if output_dir is None:
            plan.notes.append("no output_dir: merge() writes to a temporary folder, removed at exit or by "
                              "result.cleanup()")
        return plan

    def _prepare(self, req: MergeRequest, ckpts: List[Checkpoint], target: Path, *, overwrite: bool, progress: bool,
                 lazy_base: bool = False) -> PreparedMerge:
        """The one merge that :meth:`plan` previews and :meth:`merge` runs (:mod:`hf_ame.selection`): the
        base opened when given (``lazy_base``, the plan's: only when the merge reads it)."""
        base_id = self.base.id if self.base is not None else None
        read = uses_base(merged_config(req), ckpts, base_id, self.rows) if lazy_base else base_id is not None
        base = self.open_checkpoint(self.base) if read else None
        device = tensor_device_lookup(self.device_map, str(ckpts[0].files_path), self.trust_remote_code)
        return PreparedMerge(request=req, ckpts=ckpts, base=base, base_id=base_id, rows=self.rows,
                             target=target, device=device, dtype=self.dtype, overwrite=overwrite, progress=progress,
                             load=self._load)

    def _request(self, config: Optional[AMEConfig], overrides: Mapping[str, Any], kw: Dict[str, Any]) -> MergeRequest:
        """The merge's arguments with the recipe's defaults filled in, validated before any work."""
        req = MergeRequest(**kw)
        if self.recipe is not None:
            config = config or self.recipe.merge
        req.fill_defaults(self.recipe)
        if req.output not in ("model", "lora"):
            raise ConfigError(f"output: expected 'model' or 'lora' (a peft LoRA adapter), got {req.output!r}")
        check_rank(req.rank)
        if req.output == "lora" and self.recipe is not None and self.recipe.slices:
            raise ConfigError("output='lora': not with a recipe's slices (merge them into a model first)")
        cfg = config.replace(**overrides) if config is not None else AMEConfig.from_options(**overrides)
        cfg.validate()
        check_config_limits(cfg, req.top_k or len(self.ingredients))  # before anything is read or planned
        check_selection(req, self.rows)
        if (cfg.method is not None and get_method(cfg.method).needs_base and cfg.pivot == "soup"
                and self.base is not None):
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

    def open_checkpoint(self, ing: Ingredient) -> Checkpoint:
        """The ingredient's checkpoint (or the base's), its tensors keyed as the merge names them (see
        ``renames``): as transformers would read it, layouts converted, custom code allowed only with
        consent. The caller closes it."""
        ckpt = open_ingredient(ing, Path(self.base.path) if (self.base is not None and ing is not self.base) else None)
        if ing.id in self.layouts:
            ckpt = ConvertedCheckpoint(ckpt, self.skeleton, self.layouts[ing.id])
        ckpt.trust_remote_code = self.trust_remote_code  # its .py files reach the output only with consent
        return ckpt.rekey(self.renames[ing.id]) if ing.id in self.renames else ckpt

    def _slices_run(self, target: Path, req: MergeRequest, *, overwrite: bool, progress: bool, dry_run: bool = False):
        """A recipe's slices: a layer stacking (tensors copied and renamed), or slices merged by the
        method (:mod:`hf_ame.slice_merge`) into one output. The plan (every slice's tensors, a note
        per slice) with ``dry_run``."""
        slices = self.recipe.slices
        if not self._merges_slices():
            return stack_checkpoints([self.open_checkpoint(i) for i in self.ingredients],
                                     [LayerSlice(s["model"], *s["layer_range"], s.get("scale")) for s in slices],
                                     target, dtype=self.dtype, max_shard_size=req.max_shard_size, overwrite=overwrite,
                                     progress=progress, dry_run=dry_run)
        merged = [MergeSlice([SliceSource(s["model"], *s["layer_range"]) for s in sl["sources"]], sl.get("base"),
                             dict(sl.get("method_kwargs") or {})) for sl in slices]
        return merge_slices(lambda i: self.open_checkpoint(self.ingredients[i]), len(self.ingredients), merged, target,
                            req.cfg, dtype=self.dtype, max_shard_size=req.max_shard_size, overwrite=overwrite,
                            progress=progress, rows=self.rows, dry_run=dry_run)

    def _stack_into(self, target: Path, req: MergeRequest, *, overwrite: bool, progress: bool) -> MergeResult:
        """A recipe's slices: stacked (no merge arithmetic) or merged slice by slice, then stacked."""
        t0 = time.perf_counter()
        report = self._slices_run(target, req, overwrite=overwrite, progress=progress)
        report.ingredients = [i.id for i in self.ingredients]  # every model the slices take layers from
        timings = dict(self.timings, merge=time.perf_counter() - t0)
        ings = [Ingredient(**vars(i)) for i in self.ingredients]
        result = MergeResult(target, req.cfg, ings, report, self.device_map, self.dtype, timings,
                             self.trust_remote_code)
        result.candidates = [i.id for i in ings]
        result.max_shard_size = req.max_shard_size
        result.mergekit_config = (self.recipe.provenance or {}).get("mergekit_config")
        result.slices = self.recipe.slices
        result.alignment = list(self.rows.notes) if self.rows is not None else []  # vocabulary, config choices
        result.choices = dict(self.choices)  # tokenizer_source, missing_tokens, ...: the written recipe re-runs them
        result.warnings = self._ignored_keys() + ([unchanged_note(report)] if report.unchanged else [])
        return result

    def _choose(self, req: MergeRequest, timings: Dict[str, float], progress: bool) -> Choice:
        """Score (with ``order_by``), rank and keep (:func:`~hf_ame.selection.choose`)."""
        scorer = None
        if req.order_by is not None:
            t0 = time.perf_counter()
            self.score(req.order_by, req.eval_dataset, progress=progress, **req.score_kwargs())
            scorer = self._last_scorer
            timings["score"] = time.perf_counter() - t0
        return choose(self.ingredients, scorer, order=req.order, top_k=req.top_k)

    def _merge_into(self, target: Path, req: MergeRequest, *, overwrite: bool, progress: bool) -> MergeResult:
        """Choose the ingredients, merge them into ``target``, score the result (with ``order_by``)."""
        timings = dict(self.timings)
        choice = self._choose(req, timings, progress)
        ckpts = [self.open_checkpoint(i) for i in choice.chosen]
        prep = self._prepare(req, ckpts, target, overwrite=overwrite, progress=progress)
        t1 = time.perf_counter()
        outcome = merge_prepared(prep, choice)
        timings["merge"] = time.perf_counter() - t1
        result = self._result(req, prep, choice, outcome, timings)
        if choice.scorer is not None:
            score_merged(result, prep, choice, self.open_checkpoint)
        return result

    def _result(self, req: MergeRequest, prep: PreparedMerge, choice: Choice, outcome: Outcome,
                timings: Dict[str, float]) -> MergeResult:
        """The MergeResult of a merge run (refused here when every tensor came back unchanged)."""
        cfg, report = outcome.config, outcome.report
        result = MergeResult(prep.target, cfg, choice.ingredients, report, self.device_map, self.dtype, timings,
                             self.trust_remote_code)
        record_outcome(result, prep, choice, outcome)
        result.max_shard_size = req.max_shard_size
        result.base_id = self.base.id if (self.base is not None and pivot_is_base(cfg, prep.ckpts)) else None
        result.mergekit_config = ((self.recipe.provenance or {}).get("mergekit_config")
                                  if self.recipe is not None else None)
        result.alignment = list(self.rows.notes) if self.rows is not None else []
        if report.counters_maxed:  # BatchNorm step counters of fine-tunes of different lengths
            result.alignment.append(f"num_batches_tracked differs between the models: the maximum was taken for "
                                    f"{len(report.counters_maxed)} tensor(s) ({', '.join(report.counters_maxed[:3])}"
                                    + (", ..." if len(report.counters_maxed) > 3 else "") + ")")
        result.choices = dict(self.choices)
        result.warnings.extend(self._ignored_keys() + self._unchanged_warnings(report, req, prep.ckpts, prep.base))
        return result

    def _ignored_keys(self) -> List[str]:
        ignored = ((self.recipe.provenance or {}).get("mergekit_ignored") or []) if self.recipe is not None else []
        return [f"mergekit config: ignored {', '.join(ignored)} (mergekit 0.1.5 ignores them too)"] if ignored else []

    def _unchanged_warnings(self, report: MergeReport, req: MergeRequest, ckpts: List[Checkpoint],
                            base: Optional[Checkpoint]) -> List[str]:
        """The card's note on tensors returned equal to their pivot; every merged tensor so is refused
        unless ``allow_unchanged`` (the output is still staged: nothing lands)."""
        note = unchanged_note(report)
        if note is None:
            return []
        if len(report.unchanged) == report.merged_tensors and not req.allow_unchanged:
            kind, idx = resolve_pivot(req.cfg.pivot, len(ckpts), [c.name for c in ckpts])
            which = (base.name if (kind == "base" and base is not None)
                     else (ckpts[idx].name if kind == "index" else "?"))
            raise UnchangedMergeError(f"every merged tensor ({report.merged_tensors}) equals {which!r} bit for bit "
                                      f"although the other models differ from it: the output would be that model, "
                                      f"not a merge; nothing was written (allow_unchanged=True / --allow-unchanged "
                                      f"writes it anyway)")
        return [note]


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


def _preflight(ings: List[Ingredient], base: Optional[Ingredient], least: int, choices: Mapping[str, Any],
               access: Mapping[str, Any], *, local_files_only: bool) -> Tuple[Preflight, float]:
    """1. headers, tokenizers and configs checked before any weight is downloaded; 2. the downloads.
    Returns the check and the time it ended (``time.perf_counter``)."""
    check = Preflight(ings + ([base] if base is not None else []), len(ings), least, choices, access)
    return check, check_and_download(check, local_files_only=local_files_only)

