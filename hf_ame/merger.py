"""The user-facing API: ``AMEMerger.from_pretrained(...).merge(...) -> MergeResult``."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from .checkpoints import Checkpoint
from .checks import IncompatibleCheckpointsError, check_compatible
from .config import AMEConfig, parse_dtype
from .engine import MergeReport, merge_checkpoints
from .hub import Ingredient, IngredientError, RemoteHeader, download, inspect_remote, parse_ingredient
from .output import check_output_dir, staged_output
from .placement import model_class_for, resolve_device_map

__all__ = ["AMEMerger", "MergeResult"]

ModelEntry = Union[str, os.PathLike, Mapping[str, Any]]


@dataclass
class MergeResult:
    """A finished merge.

    Attributes:
        output_dir: the folder holding the merged checkpoint (a temporary folder when ``merge`` was
            given no ``output_dir``: call :meth:`save_pretrained` to keep it).
        config: the AME config actually used.
        ingredients: every ingredient (id, revision, resolved sha, local path, order, score, kept).
        report: the engine's :class:`MergeReport` (tensor counts, bytes, timings in seconds).
        device_map: the {module prefix: device} map the merge ran on.
        timings: seconds spent per phase ("resolve", "download", "merge").
    """

    output_dir: Path
    config: AMEConfig
    ingredients: List[Ingredient]
    report: MergeReport
    device_map: Dict[str, str]
    dtype: Optional[torch.dtype] = None
    timings: Dict[str, float] = field(default_factory=dict)
    trust_remote_code: bool = False
    _model: Any = field(default=None, repr=False)

    @property
    def model(self):
        """The merged model (a transformers ``PreTrainedModel``), loaded on first access with
        ``from_pretrained(output_dir, device_map=...)``."""
        if self._model is None:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(self.output_dir, trust_remote_code=self.trust_remote_code)
            cls = model_class_for(cfg, self.trust_remote_code)
            dm: Any = self.device_map
            if set(dm.values()) <= {"cpu", "disk"}:
                dm = None  # plain CPU load; nothing to dispatch
            kwargs: Dict[str, Any] = {"trust_remote_code": self.trust_remote_code} if self.trust_remote_code else {}
            self._model = cls.from_pretrained(self.output_dir, device_map=dm, **kwargs).eval()
        return self._model

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *, overwrite: bool = False,
                        max_shard_size: Union[int, str, None] = None) -> Path:
        """Copy the merged checkpoint to ``save_directory`` (refused if it exists, unless
        ``overwrite``); with ``max_shard_size``, re-shard the weights while copying."""
        dest = Path(save_directory)
        if dest.resolve() == self.output_dir.resolve():
            return dest
        check_output_dir(dest, overwrite)
        with staged_output(dest, overwrite) as tmp:
            if max_shard_size is None:
                for p in self.output_dir.iterdir():
                    if p.is_file():
                        shutil.copy2(p, tmp / p.name)
            else:
                _reshard(self.output_dir, tmp, max_shard_size)
        return dest

    def card_metadata(self) -> Dict[str, Any]:
        """What a model card needs: ingredients, config, scores, timings."""
        return {
            "ingredients": [i.to_dict() for i in self.ingredients],
            "config": self.config.to_dict(),
            "dtype": self.report.dtype,
            "parameters": self.report.parameters,
            "seconds": self.report.seconds,
        }


def _reshard(src: Path, dst: Path, max_shard_size: Union[int, str]) -> None:
    from .output import AUX_SKIP
    from .writer import ShardedWriter, plan_shards

    ck = Checkpoint(src)
    plan = plan_shards([(i.name, i.dtype, i.shape) for i in ck.tensors.values()], max_shard_size)
    w = ShardedWriter(dst, plan, metadata={"merged_with": "hf_ame"})
    for name in ck.tensors:
        w.write(name, ck.get_tensor(name))
    w.finish()
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json":
            shutil.copy2(p, dst / p.name)


class AMEMerger:
    """Ingredients resolved, checked and placed; call :meth:`merge`.

    Build it with :meth:`from_pretrained`. ``ingredients`` keeps the given order (the order AME
    steps in unless the merge re-orders them).
    """

    def __init__(self, ingredients: List[Ingredient], device_map: Dict[str, str], *, dtype: Optional[torch.dtype] = None,
                 trust_remote_code: bool = False, timings: Optional[Dict[str, float]] = None,
                 base: Optional[Ingredient] = None):
        self.ingredients = ingredients
        self.device_map = device_map
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.timings = dict(timings or {})
        self.base = base

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
    ) -> "AMEMerger":
        """Resolve, check and fetch the ingredients (transformers' argument names and meanings).

        Args:
            models: Hub repo ids, local folders, or ``{"id": ..., "revision": ...}`` mappings (>= 2).
            revision: default revision for Hub entries (branch, tag or commit); default "main".
            token, cache_dir, local_files_only: as in ``huggingface_hub.snapshot_download``.
            device_map: "auto" (Accelerate over an empty-weight skeleton), "cpu", "cuda:0", or a
                {module: device} dict; each tensor is merged on the device its module maps to.
            max_memory: per-device budget for "auto", e.g. ``{0: "20GiB", "cpu": "60GiB"}``.
            dtype: output dtype of floating tensors (merge math is float32 regardless);
                default: the ingredients' own.
            base_model: a base checkpoint (Hub id or folder) for ``pivot="base"`` merges.
            endpoint: a Hub endpoint other than the default (``HF_ENDPOINT``).

        Compatibility (architecture, tensor names, shapes, dtypes) is checked from config.json and
        the safetensors headers alone, before any weight file is downloaded.
        """
        t0 = time.perf_counter()
        if isinstance(models, (str, os.PathLike, Mapping)):
            raise IngredientError("models: expected a list of ingredients (repo ids or folders), got a single one")
        out_dtype = parse_dtype(dtype, "dtype")
        ings = [parse_ingredient(m, revision, f"models[{i}]") for i, m in enumerate(models)]
        base = parse_ingredient(base_model, revision, "base_model") if base_model is not None else None
        if len(ings) < 2:
            raise IncompatibleCheckpointsError(f"a merge needs at least 2 ingredients, got {len(ings)}")
        everyone = ings + ([base] if base is not None else [])

        # 1. Headers only: local folders read their safetensors headers; Hub repos answer with
        #    config.json and HTTP range reads of the headers. Cached-only mode resolves the snapshot.
        headers: List[Any] = []
        remote_files: Dict[int, List[str]] = {}
        for k, ing in enumerate(everyone):
            if ing.local:
                headers.append(Checkpoint(ing.path, name=ing.id))
            elif local_files_only:
                ing.path, ing.sha = download(ing, cache_dir=cache_dir, token=token, local_files_only=True, endpoint=endpoint)
                headers.append(Checkpoint(ing.path, name=ing.id))
            else:
                h: RemoteHeader = inspect_remote(ing, token=token, endpoint=endpoint)
                ing.sha = h.sha
                remote_files[k] = h.files
                headers.append(h if h.safetensors else None)
        checkable = [h for h in headers[: len(ings)] if h is not None]
        base_h = headers[len(ings)] if base is not None else None
        if len(checkable) == len(ings):
            check_compatible(checkable, base_h)
        t1 = time.perf_counter()

        # 2. Download what the merge needs (safetensors, configs, tokenizer/processor files).
        for k, ing in enumerate(everyone):
            if not ing.local and ing.path is None:
                ing.path, ing.sha = download(ing, files=remote_files.get(k, []), cache_dir=cache_dir, token=token,
                                             trust_remote_code=trust_remote_code, endpoint=endpoint)
        if len(checkable) != len(ings):  # .bin-only repos: check now, from the downloaded files
            check_compatible([Checkpoint(i.path, name=i.id) for i in ings],
                             Checkpoint(base.path, name=base.id) if base is not None else None)
        t2 = time.perf_counter()

        # 3. Placement from the reference ingredient's config (no weights materialised).
        dm = resolve_device_map(device_map, str(ings[0].path), max_memory=max_memory, dtype=out_dtype,
                                trust_remote_code=trust_remote_code)
        timings = {"resolve": t1 - t0, "download": t2 - t1, "placement": time.perf_counter() - t2}
        return cls(ings, dm, dtype=out_dtype, trust_remote_code=trust_remote_code, timings=timings, base=base)

    def merge(
        self,
        config: Optional[AMEConfig] = None,
        *,
        output_dir: Union[str, os.PathLike, None] = None,
        overwrite: bool = False,
        max_shard_size: Union[int, str] = "5GB",
        progress: bool = True,
        **overrides: Any,
    ) -> MergeResult:
        """Run AME over the ingredients and return a :class:`MergeResult`.

        Args:
            config: an :class:`AMEConfig` (default ``AMEConfig()``); ``overrides`` replace its
                fields (``optimizer="adamw", lr=1e-3, epochs=5, ...``).
            output_dir: where to write; default a new temporary folder (see ``MergeResult.save_pretrained``).
            overwrite: replace an existing ``output_dir``.
            max_shard_size: output shard size (bytes or "5GB").
            progress: show a tqdm bar over the bytes merged.
        """
        cfg = config or AMEConfig()
        if overrides:
            cfg = cfg.replace(**overrides)
        cfg.validate()
        if output_dir is None:
            output_dir = Path(tempfile.mkdtemp(prefix="hf_ame-")) / "merged"
        if cfg.pivot == "base":  # "the base_model given to from_pretrained"
            if self.base is None:
                raise IngredientError("pivot: 'base' needs from_pretrained(..., base_model=...)")
            cfg = cfg.replace(pivot=self.base.id)
        base = Checkpoint(self.base.path, name=self.base.id) if self.base is not None else None
        ckpts = [Checkpoint(i.path, name=i.id) for i in self.ingredients]
        for k, ing in enumerate(self.ingredients):
            ing.order = k
        t0 = time.perf_counter()
        report = merge_checkpoints(ckpts, output_dir, cfg, base=base if _pivot_is_base(cfg, ckpts) else None,
                                   dtype=self.dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                                   progress=progress, device_map=self.device_map)
        timings = dict(self.timings, merge=time.perf_counter() - t0)
        return MergeResult(Path(output_dir), cfg, [Ingredient(**vars(i)) for i in self.ingredients], report,
                           self.device_map, self.dtype, timings, self.trust_remote_code)


def _pivot_is_base(cfg: AMEConfig, ckpts: List[Checkpoint]) -> bool:
    from .algorithm import resolve_pivot

    return resolve_pivot(cfg.pivot, len(ckpts), [c.name for c in ckpts])[0] == "base"
