"""The result of a merge: where it is, what went in, what was measured; save, card and push.

Built by :class:`~hf_ame.merger.AMEMerger` (and :mod:`hf_ame.lora_out` for adapter outputs); holds
no merge logic."""
from __future__ import annotations

import json
import os
import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from .card import CHART_FILE, render_card
from .checkpoints import Checkpoint
from .config import AMEConfig
from .executor import MergeReport
from .hub import Ingredient
from .output import check_output_dir, staged_output
from .placement import load_model
from .publish import push_folder
from .recipe import RECIPE_FILE, Recipe
from .version import __version__
from .writer import ShardedWriter, plan_shards

__all__ = ["MergeResult"]


class _UntilExit:
    """Lives as long as the interpreter: temporary outputs are tied to it, not to their result."""


_UNTIL_EXIT = _UntilExit()


@dataclass
class MergeResult:
    """A finished merge.

    Attributes:
        output_dir: the folder holding the merged checkpoint. When ``merge`` was given no
            ``output_dir``, a temporary folder owned by this result: removed when the result is
            garbage-collected or the interpreter exits; :meth:`save_pretrained` moves it to keep it.
        config: the AME config actually used.
        ingredients: every ingredient (id, revision, resolved sha, local path, order, score, kept).
        report: the engine's :class:`MergeReport` (tensor counts, bytes, timings in seconds).
        device_map: the {module prefix: device} map the merge ran on.
        timings: seconds spent per phase ("resolve", "download", "placement", "score", "merge", "score_merged").
        scores: with ``order_by``: {"merged": float, "best_ingredient": {"id", "score"}, "soup": float (with
            ``compare_soup``)}; each ingredient's own score is in ``ingredients``.
        metric: {"name", "greater_is_better", "shipped"} of the ranking metric, or None.
        greedy, greedy_log: the greedy mode and one entry per candidate / step (score, accepted).
    """

    output_dir: Path
    config: AMEConfig
    ingredients: List[Ingredient]
    report: MergeReport
    device_map: Dict[str, str]
    dtype: Optional[torch.dtype] = None
    timings: Dict[str, float] = field(default_factory=dict)
    trust_remote_code: bool = False
    scores: Dict[str, Any] = field(default_factory=dict)
    metric: Optional[Dict[str, Any]] = None
    greedy: Optional[str] = None
    greedy_log: Optional[List[Dict[str, Any]]] = None
    ordering: Optional[Dict[str, Any]] = None
    candidates: List[str] = field(default_factory=list)
    max_shard_size: Union[int, str] = "5GB"
    base_id: Optional[str] = None
    mergekit_config: Optional[str] = None  # the mergekit config this merge was read from (shown in the card)
    slices: Optional[List[Dict[str, Any]]] = None  # a layer stacking's slices (recorded in the recipe)
    alignment: List[str] = field(default_factory=list)  # notes: rows matched by token / label, config choices
    warnings: List[str] = field(default_factory=list)  # what the merge warned about: listed in the card
    choices: Dict[str, Any] = field(default_factory=dict)  # tokenizer_source, ... (recorded in the recipe)
    search: Optional[Dict[str, Any]] = None  # merge(search=...): the space, every trial and its score, the chosen one
    _model: Any = field(default=None, repr=False)
    _cleanup: Any = field(default=None, repr=False)  # weakref.finalize removing a temporary output

    def own_temporary(self, root: Path) -> None:
        """Mark ``root`` (holding ``output_dir``) as this result's temporary folder: it is removed when
        the interpreter exits (or by :meth:`cleanup`), unless saved first. Not when the result is
        garbage-collected: ``path = merger.merge().output_dir`` then ``from_pretrained(path)`` must work."""
        self._cleanup = weakref.finalize(_UNTIL_EXIT, shutil.rmtree, str(root), True)

    def cleanup(self) -> None:
        """Remove a temporary output now (``merge()`` without ``output_dir``); no-op otherwise."""
        if self._cleanup is not None:
            self._cleanup()

    @property
    def is_temporary(self) -> bool:
        """True while the merge lives in a temporary folder that :meth:`save_pretrained` moves."""
        return self._cleanup is not None and self._cleanup.alive

    @property
    def model(self):
        """The merged model (a transformers ``PreTrainedModel``), loaded on first access with
        ``from_pretrained(output_dir, device_map=...)``."""
        if self._model is None:
            self._model = load_model(self.output_dir, self.device_map, trust_remote_code=self.trust_remote_code)
        return self._model

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *, overwrite: bool = False,
                        max_shard_size: Union[int, str, None] = None) -> Path:
        """Write the merged checkpoint to ``save_directory`` (refused if it exists, unless
        ``overwrite``); with ``max_shard_size``, re-shard the weights on the way. A temporary merge
        (``merge()`` without ``output_dir``) is moved, not copied (a rename on one filesystem), and
        ``output_dir`` then points at ``save_directory``; a merge in your own folder is copied."""
        dest = Path(save_directory)
        if dest.resolve() == self.output_dir.resolve() and max_shard_size is None:
            return dest  # already there (re-sharding in place needs overwrite=True)
        check_output_dir(dest, overwrite)
        move = self.is_temporary
        with staged_output(dest, overwrite) as tmp:
            if max_shard_size is not None:
                _reshard(self.output_dir, tmp, max_shard_size)
            else:
                for p in self.output_dir.iterdir():
                    if p.is_file():
                        shutil.move(p, tmp / p.name) if move else shutil.copy2(p, tmp / p.name)
        if move:
            self._cleanup()  # the temporary folder, now empty of our files
            self.output_dir = dest
        return dest

    def card_metadata(self) -> Dict[str, Any]:
        """What a model card needs: ingredients, config, scores, timings."""
        return {
            "ingredients": [i.to_dict() for i in self.ingredients],
            "config": self.config.to_dict(),
            "dtype": self.report.dtype,
            "parameters": self.report.parameters,
            "seconds": self.report.seconds,
            "scores": self.scores,
            "metric": self.metric,
            "greedy": self.greedy,
        }

    def recipe(self, repo_id: Optional[str] = None):
        """The :class:`~hf_ame.recipe.Recipe` that reproduces this merge: the ingredients merged, in
        merge order, pinned to their resolved commit shas (local folders by absolute path)."""
        by_id = {i.id: i for i in self.ingredients}

        def pin(i: Ingredient) -> Dict[str, Any]:
            out = ({"id": str(Path(i.path).resolve()), "revision": None} if i.local else
                   {"id": i.id, "revision": i.sha or i.revision})
            out = {**out, "gguf_file": i.gguf_file} if i.gguf_file else out
            return {**out, "base": i.adapter_base} if i.adapter_base else out

        ordering = None
        o = self.ordering or {}
        replay = bool(self.greedy) and isinstance(o.get("dataset"), dict) and isinstance(o.get("metric"), str)
        # Greedy modes accept by score: their recipe lists the ranked candidates and re-runs the
        # greedy pass (deterministic) on the same dataset; other merges list what was merged.
        models = [pin(by_id[name]) for name in (self.candidates if replay else self.report.ingredients)]
        if replay:
            ordering = {k: v for k, v in o.items() if v is not None}
            ordering.update(order="given", top_k=None)
            ordering = {k: v for k, v in ordering.items() if v is not None}
        prov: Dict[str, Any] = {"hf_ame_version": __version__,
                                "ingredients": [{k: v for k, v in i.to_dict().items() if k != "path" and v is not None}
                                                for i in self.ingredients]}
        for key in ("metric", "greedy"):
            if getattr(self, key):
                prov[key] = getattr(self, key)
        if self.scores:
            prov["scores"] = self.scores
        if self.mergekit_config:
            prov["mergekit_config"] = self.mergekit_config
        if self.search:
            prov["search"] = self.search  # the merge section pins the chosen trial's config
        if o:
            prov["ordering"] = {k: (v if not hasattr(v, "_fingerprint") else f"in-memory dataset {v._fingerprint}")
                                for k, v in o.items() if v is not None}
        if self.greedy and ordering is None:
            prov["note"] = (f"greedy {self.greedy} accepted by scores on an in-memory dataset; this recipe lists "
                            "what was kept and does not re-run the greedy pass")
        return Recipe(models=models, merge=self.config, slices=self.slices,
                      base_model={"id": self.base_id, "revision": None} if getattr(self, "base_id", None) else None,
                      ordering=ordering, output={"dtype": self.report.dtype, "max_shard_size": self.max_shard_size,
                                                 **{k: v for k, v in self.choices.items() if v is not None}},
                      hub={"repo_id": repo_id} if repo_id else {}, provenance=prov)

    def write_card(self, repo_id: Optional[str] = None) -> List[str]:
        """Write README.md (model card), the scores chart and ame_recipe.yaml into ``output_dir``."""
        recipe_yaml = self.recipe(repo_id).to_yaml()
        model_config = (json.loads((self.output_dir / "config.json").read_text())
                        if (self.output_dir / "config.json").exists() else {})
        ds = (self.ordering or {}).get("dataset")
        reproduce = (f"hf-ame merge {repo_id} --out merged   # reads ame_recipe.yaml from the repo" if repo_id
                     else "hf-ame merge ame_recipe.yaml --out merged")
        card, svg = render_card(config=self.config.to_dict(), ingredients=[i.to_dict() for i in self.ingredients],
                                model_config=model_config, recipe_yaml=recipe_yaml, scores=self.scores,
                                metric=self.metric, dataset=ds if isinstance(ds, dict) else None, greedy=self.greedy,
                                greedy_log=self.greedy_log, dtype=self.report.dtype,
                                parameters=self.report.parameters, seconds=self.report.seconds,
                                repo_id=repo_id, reproduce=reproduce, mergekit_config=self.mergekit_config,
                                alignment=self.alignment, search=self.search, warnings=self.warnings)
        (self.output_dir / RECIPE_FILE).write_text(recipe_yaml)
        card.save(self.output_dir / "README.md")
        written = ["README.md", RECIPE_FILE]
        if svg:
            (self.output_dir / CHART_FILE).write_text(svg)
            written.append(CHART_FILE)
        return written

    def push_to_hub(self, repo_id: str, *, private: Optional[bool] = None, token: Union[bool, str, None] = None,
                    revision: Optional[str] = None, create_pr: bool = False, commit_message: Optional[str] = None,
                    endpoint: Optional[str] = None):
        """Publish the merge: card (with ``repo_id``), chart, recipe, weights, index, config and
        tokenizer/processor files in ONE commit (``create_repo(exist_ok=True)`` first). Returns
        huggingface_hub's ``CommitInfo``. A failed push raises :class:`~hf_ame.publish.PushError`
        and leaves ``output_dir`` intact."""
        self.write_card(repo_id)
        n = len(self.report.ingredients)
        msg = commit_message or f"AME merge of {n} models ({self.config.optimizer}) with hf_ame"
        return push_folder(self.output_dir, repo_id, private=private, token=token, revision=revision,
                           create_pr=create_pr, commit_message=msg, endpoint=endpoint)


def _reshard(src: Path, dst: Path, max_shard_size: Union[int, str]) -> None:
    ck = Checkpoint(src)
    plan = plan_shards([(i.name, i.dtype, i.shape) for i in ck.tensors.values()], max_shard_size)
    w = ShardedWriter(dst, plan, metadata={"merged_with": "hf_ame"})
    for name in ck.tensors:
        w.write(name, ck.get_tensor(name))
    w.finish()
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json":
            shutil.copy2(p, dst / p.name)
