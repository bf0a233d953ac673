"""LoRA adapters out: a merge (or one fine-tune) written as a peft LoRA adapter over its base.

Three ways in, one format out (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``PeftModel.from_pretrained(base, folder)``):

- :func:`combine_adapters`: LoRA adapters over one base merged by a method linear in their task
  vectors (the uniform soup, ``linear``, ``task_arithmetic``): merged delta = sum_i c_i s_i B_i A_i.
  Exact by concatenation where the summed ranks fit ``rank`` (or ``rank=None``): A = cat(c_i s_i A_i),
  B = cat(B_i), as peft's ``add_weighted_adapter(combination_type="cat")``; otherwise the merged delta
  of each module is factored by truncated SVD at ``rank`` (B = U_r S_r, A = V_r^T), as peft's ``svd``.
- :func:`extract_lora`: any model minus its base, per module, mergekit-extract-lora's rules
  (mergekit 0.1.5, ``--embed-lora`` off by default): every ``nn.Linear`` whose weight changed becomes
  a rank-r LoRA of its task vector by truncated SVD (A = sqrt(S_r) V_r^T, B = U_r sqrt(S_r): mergekit's
  ``--distribute-scale``; an optimal rank-r approximation, Eckart-Young), a changed bias a
  ``lora_B.bias`` (``lora_bias``); the input and output embeddings and every other module with
  weights (norms) that changed are saved whole in ``modules_to_save`` (with ``embed_lora=True``
  embeddings are LoRA'd too: ``lora_embedding_A/B`` of the transposed delta). One difference from
  mergekit: modules equal to the base bit for bit are left out (mergekit saves every norm and
  decomposes every linear, changed or not); a tied output embedding follows its input embedding.
- :func:`lora_output`: ``merge(..., output="lora", rank=r)``: the first when it applies, else the
  merge is written (float32) to a scratch folder and :func:`extract_lora` runs against the base.

Streaming: one module's tensors (model and base) in memory at a time, plus the adapter being built.
"""
from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .adapters import AdapterCheckpoint
from .algorithm import is_exact_soup, resolve_pivot
from .architecture import empty_model, file_to_model_renamer
from .checkpoints import Checkpoint
from .config import parse_dtype
from .errors import ConfigError, IncompatibleCheckpointsError
from .executor import MergeReport
from .hub import Ingredient
from .lora_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, AdapterBuilder, lora_keys, svd_factors
from .output import staged_output
from .result import MergeResult
from .scratch import scratch_dir

__all__ = ["LoraReport", "extract_lora", "combine_adapters", "lora_output", "linear_coefficients", "check_rank"]

@dataclass
class LoraReport:
    """What a LoRA output holds. ``ranks``: module -> rank written; ``saved``: modules saved whole
    (``modules_to_save``); ``errors``: module -> (||delta - B A||_F, optimal rank-r error
    sqrt(sum of the discarded squared singular values)), for modules factored by SVD; ``how``:
    "cat" (exact), "svd" or "extract"; ``skipped``: modules equal to the base."""

    output_dir: Path
    how: str
    rank: int = 0
    ranks: Dict[str, int] = field(default_factory=dict)
    saved: List[str] = field(default_factory=list)
    skipped: int = 0
    errors: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    bytes_written: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"LoRA adapter -> {self.output_dir}: {len(self.ranks)} modules at rank <= {self.rank} ({self.how}), "
                f"{len(self.saved)} saved whole, {self.skipped} unchanged left out; "
                f"{self.bytes_written / 2**20:.1f} MiB in {self.seconds:.2f}s")


def check_rank(rank: Any, what: str = "rank") -> Optional[int]:
    """A LoRA rank: None or a whole number >= 1 (refused, naming ``what``, before anything is read)."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"{what}: expected a LoRA rank, a whole number >= 1, got {rank!r}")
    return rank


# ----------------------------------------------------------------------------- extraction
def _module_kinds(config: Mapping[str, Any], trust_remote_code: bool = False) -> Tuple[Dict[str, str], Any]:
    """{module name: kind} of the architecture (an empty-weight skeleton): "embedding" (an
    ``nn.Embedding``), "head" (the output embedding, a Linear), "linear", "other"; the key "__tied__"
    names the output embedding when it shares the input embedding's weight. And the renamer
    name-in-file -> name-in-memory (peft's module names are the model's)."""
    from transformers import CONFIG_MAPPING

    model = empty_model(CONFIG_MAPPING[config["model_type"]].from_dict(dict(config)), trust_remote_code)
    heads = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    kinds: Dict[str, Any] = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Embedding):
            kinds[name] = "embedding"
        elif id(m) in heads:
            kinds[name] = "head" if isinstance(m, torch.nn.Linear) else "other"
        else:
            kinds[name] = "linear" if isinstance(m, torch.nn.Linear) else "other"
    kinds["__tied__"] = _tied_output(model)
    return kinds, file_to_model_renamer(model)


def _tied_output(model: Any) -> Optional[str]:
    """The output embedding's module name when it shares the input embedding's weight, else None."""
    i, o = model.get_input_embeddings(), model.get_output_embeddings()
    if i is None or o is None or getattr(o, "weight", None) is not getattr(i, "weight", None):
        return None
    return next((n for n, m in model.named_modules() if m is o), None)


def _groups(names: Sequence[str], rename: Any) -> Dict[str, Dict[str, str]]:
    """{module name in memory: {parameter: tensor name in the files}}, in file order."""
    out: Dict[str, Dict[str, str]] = {}
    for n in names:
        module, _, param = rename(n).rpartition(".")
        out.setdefault(module, {})[param] = n
    return out


def _check_pair(model: Checkpoint, base: Checkpoint) -> None:
    """Every floating tensor of the model is in the base with the same shape (named if not)."""
    for name, info in model.tensors.items():
        other = base.tensors.get(name)
        if other is None:
            raise IncompatibleCheckpointsError(f"tensor {name!r} of {model.name!r} is not in the base {base.name!r}")
        if tuple(other.shape) != tuple(info.shape):
            raise IncompatibleCheckpointsError(f"tensor {name!r} has shape {tuple(info.shape)} in {model.name!r} but "
                                               f"{tuple(other.shape)} in the base {base.name!r}")


def extract_lora(model: Union[Checkpoint, str, Path], base: Union[Checkpoint, str, Path], output_dir: Union[str, Path],
                 rank: int, *, embed_lora: bool = False, dtype: Union[str, torch.dtype, None] = None,
                 overwrite: bool = False, base_name: Optional[str] = None, progress: bool = False) -> LoraReport:
    """Write ``model - base`` as a peft LoRA adapter of rank ``rank`` into ``output_dir`` (see the
    module docstring for which modules become what). ``embed_lora``: LoRA the embeddings too
    (default False: saved whole, as mergekit); ``dtype``: of the written tensors (default: float32
    factors, whole modules as stored); ``base_name``: the adapter's ``base_model_name_or_path``
    (default: the base's folder); ``overwrite``: replace ``output_dir``. The output is staged and
    moved into place at the end; everything is checked before it is created."""
    check_rank(rank)
    model = model if isinstance(model, Checkpoint) else Checkpoint(model)
    base = base if isinstance(base, Checkpoint) else Checkpoint(base, name=str(base))
    _check_pair(model, base)
    with staged_output(output_dir, overwrite, [model.path, base.path]) as tmp:
        return _extract_into(tmp, model, base, rank, embed_lora=embed_lora, dtype=dtype, base_name=base_name,
                             progress=progress, report_dir=Path(output_dir))


def _extract_into(folder: Path, model: Checkpoint, base: Checkpoint, rank: int, *, embed_lora: bool,
                  dtype: Union[str, torch.dtype, None], base_name: Optional[str], progress: bool,
                  report_dir: Path) -> LoraReport:
    """:func:`extract_lora`'s work, into an existing empty ``folder``."""
    t0 = time.perf_counter()
    check_rank(rank)
    _check_pair(model, base)
    kinds, rename = _module_kinds(base.config or model.config)
    adapter = AdapterBuilder(parse_dtype(dtype, "dtype"))
    report = LoraReport(report_dir, "extract", rank)
    try:
        groups = _groups([n for n, i in model.tensors.items() if i.is_floating], rename)
        for module, params in _progress(groups, progress):
            report.skipped += _extract_module(module, params, kinds, model, base, adapter, rank, embed_lora)
    finally:
        model.close()
        base.close()
    _tie_output(kinds, adapter)
    report.bytes_written = adapter.write(folder, base_name or str(Path(base.path).resolve()),
                                         _task_type(base.config or model.config))
    report.ranks, report.saved, report.errors = adapter.ranks, adapter.saved, adapter.errors
    report.seconds = time.perf_counter() - t0
    return report


def _progress(groups: Dict[str, Dict[str, str]], on: bool):
    from tqdm.auto import tqdm

    return tqdm(groups.items(), desc="hf_ame extract-lora", unit="module", disable=not on)


def _extract_module(module: str, params: Dict[str, str], kinds: Dict[str, str], model: Checkpoint, base: Checkpoint,
                    adapter: AdapterBuilder, rank: int, embed_lora: bool) -> int:
    """One module, as mergekit-extract-lora plans it: a Linear (the output embedding too with
    ``embed_lora``) -> LoRA of its weight's delta (+ ``lora_B.bias``); an Embedding with ``embed_lora``
    -> ``lora_embedding_A/B`` of the transposed delta; anything else -> saved whole. Returns 1 (left
    out) when every tensor equals the base's."""
    new = {p: model.get_tensor(n) for p, n in params.items()}
    old = {p: base.get_tensor(n) for p, n in params.items()}
    if all(_same(new[p], old[p]) for p in new):
        return 1
    kind = kinds.get(module, "other")
    shaped = "weight" in new and new["weight"].dim() == 2 and set(new) <= {"weight", "bias"}
    if shaped and (kind == "linear" or (kind == "head" and embed_lora)):
        a, b, err, best = svd_factors(new["weight"].float() - old["weight"].float(), rank, distribute=True)
        adapter.add(module, a, b)
        adapter.errors[module] = (err, best)
        if "bias" in new and not torch.equal(new["bias"], old["bias"]):
            adapter.tensors[f"{PEFT_PREFIX}{module}.lora_B.bias"] = new["bias"].float() - old["bias"].float()
            adapter.lora_bias = True
    elif shaped and kind == "embedding" and embed_lora and set(new) == {"weight"}:
        a, b, err, best = svd_factors((new["weight"].float() - old["weight"].float()).t(), rank, distribute=True)
        adapter.add(module, a, b, embedding=True)
        adapter.errors[module] = (err, best)
    else:
        adapter.save_whole(module, new)
    return 0


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal values; compared in the stored dtype when both share it (no float32 copies of an embedding)."""
    return torch.equal(x, y) if x.dtype == y.dtype else torch.equal(x.float(), y.float())


def _tie_output(kinds: Dict[str, str], adapter: AdapterBuilder) -> None:
    """A tied output embedding (not in the files) follows its input embedding: peft copies a module
    it saves whole, which would untie it, so the output module gets the same tensor (or LoRA)."""
    tied = kinds.get("__tied__")
    if tied is None:
        return
    inputs = [m for m in adapter.saved + list(adapter.ranks) if kinds.get(m) == "embedding"]
    if not inputs or tied in adapter.saved or tied in adapter.ranks:
        return
    src = inputs[0]
    if src in adapter.saved:
        adapter.save_whole(tied, {"weight": adapter.tensors[f"{PEFT_PREFIX}{src}.weight"].clone()})
    else:  # lora_embedding_A [r, vocab], B [dim, r]: the Linear head's delta is its transpose, (A^T)(B^T)
        ka, kb = lora_keys(src, True)
        adapter.add(tied, adapter.tensors[kb].t().contiguous(), adapter.tensors[ka].t().contiguous())


def _task_type(config: Mapping[str, Any]) -> Optional[str]:
    archs = config.get("architectures") or []
    return "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in archs) else None


# ----------------------------------------------------------------------------- adapters combined
def linear_coefficients(cfg: Any, n: int, names: Sequence[str] = ()) -> Optional[List[float]]:
    """c such that the merge is base + sum_i c_i (x_i - base) for any ingredients x_i, or None when the
    config is not linear in the task vectors: the exact soup (1/n each); the one-step ``linear`` /
    ``task_arithmetic`` (w = p + lambda sum_i w_i (x_i - p) / D, D = sum w with ``normalize`` else 1, p
    the pivot: the base, an ingredient, or the soup); plain per-model weights only (no gradients)."""
    if is_exact_soup(cfg, n):
        return [1.0 / n] * n
    if cfg.method not in ("linear", "task_arithmetic") or not _one_step(cfg, n):
        return None
    p = cfg.method_arguments()
    w, lam = p.get("weight", 1.0), p.get("lambda", 1.0)
    w = [w] * n if isinstance(w, (int, float)) and not isinstance(w, bool) else w
    if not (isinstance(w, list) and len(w) == n and all(isinstance(x, (int, float)) for x in w)) \
            or not isinstance(lam, (int, float)):
        return None
    d = sum(w) if p.get("normalize") else 1.0
    if abs(d) < 1e-8:
        return None
    kind, idx = resolve_pivot(cfg.pivot, n, list(names) or [str(k) for k in range(n)])
    pivot = [0.0] * n if kind == "base" else ([1.0 / n] * n if kind == "soup" else [float(k == idx) for k in range(n)])
    keep = 1.0 - lam * sum(w) / d
    return [pivot[i] * keep + lam * w[i] / d for i in range(n)]


def _one_step(cfg: Any, n: int) -> bool:
    """One plain SGD step of lr 1 on all ingredients from a fixed pivot: w = p - g exactly."""
    kw = cfg.optimizer_arguments()
    return (cfg.optimizer in ("sgd", "gd") and cfg.lr == 1.0 and cfg.lr_schedule == "constant" and cfg.epochs == 1
            and cfg.batch_size in (None, n) and not cfg.adaptive_pivot and not callable(cfg.amplification)
            and cfg.amplification == 1
            and not any(kw.get(k) for k in ("momentum", "weight_decay", "nesterov", "maximize")))


def combine_adapters(adapters: Sequence[Any], coefficients: Sequence[float], output_dir: Union[str, Path],
                     rank: Optional[int] = None, *, dtype: Union[str, torch.dtype, None] = None,
                     overwrite: bool = False, base_name: Optional[str] = None) -> LoraReport:
    """LoRA adapters (:class:`~hf_ame.adapters.AdapterCheckpoint` over one base) combined into one
    adapter of delta sum_i c_i s_i B_i A_i: by concatenation (exact) where the summed ranks are at most
    ``rank`` (always with ``rank=None``), else by truncated SVD at ``rank`` (peft's ``svd``)."""
    with staged_output(output_dir, overwrite, [a.path for a in adapters]) as tmp:
        return _combine_into(tmp, adapters, coefficients, rank, dtype=dtype, base_name=base_name,
                             report_dir=Path(output_dir))


def _combine_into(folder: Path, adapters: Sequence[Any], coefficients: Sequence[float], rank: Optional[int], *,
                  dtype: Union[str, torch.dtype, None], base_name: Optional[str], report_dir: Path) -> LoraReport:
    t0 = time.perf_counter()
    check_rank(rank)
    fan = {bool(a.lora.fan_in_fan_out) for a in adapters}
    if len(fan) != 1 or any(a.replaced for a in adapters):
        raise IncompatibleCheckpointsError("adapters combine into one LoRA only without modules_to_save and with one "
                                           "fan_in_fan_out setting")
    adapter = AdapterBuilder(parse_dtype(dtype, "dtype"))
    names = list(dict.fromkeys(n for a in adapters for n in a.deltas))
    kinds = set()
    for name in names:
        parts = [(c, *a.deltas[name]) for a, c in zip(adapters, coefficients) if name in a.deltas]
        embedding = parts[0][4] and not fan.copy().pop()
        kinds.add(_combine_module(name.rpartition(".")[0] if name.endswith(".weight") else name, parts, rank,
                                  embedding, adapter))
    first = adapters[0]
    report = LoraReport(report_dir, "+".join(sorted(kinds)) or "cat", rank or max(adapter.ranks.values(), default=0))
    report.bytes_written = adapter.write(folder, base_name or first.lora.base_model_name_or_path,
                                         first.lora.task_type, fan_in_fan_out=fan.pop())
    report.ranks, report.errors = adapter.ranks, adapter.errors
    report.seconds = time.perf_counter() - t0
    return report


def _combine_module(module: str, parts: List[tuple], rank: Optional[int], embedding: bool,
                    adapter: AdapterBuilder) -> str:
    """One module's adapters (c, A, B, scaling, transpose) combined: "cat" or "svd"."""
    total = sum(a.shape[0] for _, a, _, _, _ in parts)
    if rank is None or total <= rank:  # peft's cat: A_i scaled by weight x scaling, B_i as they are
        a = torch.cat([a.float() * (c * s) for c, a, _, s, _ in parts], dim=0)
        b = torch.cat([b.float() for _, _, b, _, _ in parts], dim=1)
        adapter.add(module, a, b, embedding=embedding)
        return "cat"
    delta = sum((c * s) * (b.float() @ a.float()) for c, a, b, s, _ in parts)
    a, b, err, best = svd_factors(delta, rank, distribute=False)  # peft's svd: B = U_r S_r, A = V_r^T
    adapter.add(module, a, b, embedding=embedding)
    adapter.errors[module] = (err, best)
    return "svd"


# ----------------------------------------------------------------------------- merge(..., output="lora")
def lora_output(merger: Any, target: Path, req: Any, *, overwrite: bool, progress: bool,
                merge_into: Callable[..., Any]) -> Any:
    """:meth:`AMEMerger.merge` with ``output="lora"``: the adapters combined (:func:`combine_adapters`)
    when every ingredient is a LoRA adapter over the base and the merge is linear in their task
    vectors; else the merge written in float32 to a scratch folder and extracted against the base
    (:func:`extract_lora`) into ``target`` (the staged output folder); ``merge_into(merger, folder,
    req, overwrite=, progress=)``: the model merge of an AMEMerger. Returns the MergeResult."""
    check_rank(req.rank)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("output='lora': runs in one process (not under torchrun / accelerate launch)")
    ckpts = [merger.open_checkpoint(i) for i in merger.ingredients]
    base = merger.open_checkpoint(merger.base) if merger.base is not None else _adapters_base(ckpts)
    coeffs = _cat_coefficients(merger, req, ckpts, base)
    if req.rank is None and coeffs is None:
        raise ConfigError("output='lora': give rank= (the LoRA rank of each module's merged delta); only adapters "
                          "merged linearly (soup, linear, task_arithmetic) combine exactly without one")
    t0 = time.perf_counter()
    try:
        if coeffs is not None:
            rep = _combine_into(target, ckpts, coeffs, req.rank, dtype=None, base_name=_base_name(merger, ckpts),
                                report_dir=target)
            result = _adapter_result(merger, req, target, ckpts, rep, time.perf_counter() - t0)
        else:
            result, rep = _merge_then_extract(merger, merge_into, req, target, base, progress)
    finally:
        for c in [*ckpts, base]:
            c.close()
    result.lora = rep
    result.choices.update(format="lora", rank=req.rank)
    if merger.base is not None:  # the recipe records the base: the adapter applies to it
        result.base_id = merger.base.id
    result.alignment.append(_note(rep, base.name))
    return result


def _adapters_base(ckpts: Sequence[Checkpoint]) -> Checkpoint:
    """The base every ingredient adapts (no base_model given); refused unless they share one."""
    bases = {str(Path(c.base.path).resolve()) for c in ckpts if isinstance(c, AdapterCheckpoint)}
    if len(bases) != 1 or not all(isinstance(c, AdapterCheckpoint) for c in ckpts):
        raise ConfigError("output='lora': the adapter is written over a base model: give base_model= (the base the "
                          "fine-tunes were trained from; CLI --base-model)")
    return next(c for c in ckpts).base


def _cat_coefficients(merger: Any, req: Any, ckpts: Sequence[Checkpoint], base: Checkpoint) -> Optional[List[float]]:
    """The task-vector coefficients when the adapters can be combined directly, else None."""
    if not all(isinstance(c, AdapterCheckpoint) and not c.replaced for c in ckpts) or len(ckpts) == 0:
        return None
    if req.order_by is not None or req.search is not None or req.greedy is not None:
        return None
    if (merger.rows is not None and merger.rows.tensors) or merger.renames or merger.layouts:
        return None
    root = str(Path(base.path).resolve())
    if any(str(Path(c.base.path).resolve()) != root for c in ckpts):
        return None
    return linear_coefficients(req.cfg, len(ckpts), [c.name for c in ckpts])


def _base_name(merger: Any, ckpts: Sequence[Any]) -> str:
    """The adapter's base_model_name_or_path: the base_model given (a Hub id, or a folder's absolute
    path), else the adapters' own."""
    b = merger.base
    if b is None:
        return ckpts[0].lora.base_model_name_or_path
    return str(Path(b.path).resolve()) if b.local else b.id


def _merge_then_extract(merger: Any, merge_into: Callable[..., Any], req: Any, target: Path, base: Checkpoint,
                        progress: bool) -> Tuple[Any, LoraReport]:
    """The full merge in float32 into a scratch folder, then its delta from the base as a LoRA."""
    scratch = scratch_dir("lora")
    try:
        full = copy.copy(merger)
        full.dtype = torch.float32  # the delta is taken in float32: a bf16 merge would round it away
        plain = copy.copy(req)
        plain.output = "model"
        result = merge_into(full, scratch / "merged", plain, overwrite=False, progress=progress)
        result.dtype = merger.dtype
        rep = _extract_into(target, Checkpoint(scratch / "merged"), base, req.rank, embed_lora=False,
                            dtype=None, base_name=_base_name(merger, [base]) if merger.base is not None else None,
                            progress=progress, report_dir=target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.output_dir = result.report.output_dir = target
    return result, rep


def _adapter_result(merger: Any, req: Any, target: Path, ckpts: Sequence[Any], rep: LoraReport, seconds: float) -> Any:
    """The MergeResult of adapters combined without a merge run."""
    ings = [Ingredient(**vars(i)) for i in merger.ingredients]
    for k, ing in enumerate(ings):
        ing.order = k
    report = MergeReport(target, [c.name for c in ckpts], req.cfg, "float32", tensors=len(rep.ranks),
                         parameters=sum(t.numel() for c in ckpts for d in c.deltas.values() for t in d[:2]),
                         merged_tensors=len(rep.ranks), bytes_written=rep.bytes_written, files=[ADAPTER_CONFIG,
                                                                                               ADAPTER_WEIGHTS],
                         seconds=seconds, stream="adapters")
    result = MergeResult(target, req.cfg, ings, report, merger.device_map, merger.dtype,
                         dict(merger.timings, merge=seconds), merger.trust_remote_code)
    result.candidates = [i.id for i in ings]
    result.max_shard_size = req.max_shard_size
    result.base_id = merger.base.id if merger.base is not None else None
    result.choices = dict(merger.choices)
    return result


def _note(rep: LoraReport, base: str) -> str:
    """The card's line on the adapter written."""
    how = {"cat": "the adapters concatenated (exact, as peft's add_weighted_adapter cat)",
           "svd": "each module's merged delta factored by truncated SVD (as peft's svd)",
           "cat+svd": "adapters concatenated where their ranks fit, the other modules' merged delta by truncated SVD",
           "extract": "the merged task vector (merge - base) of each linear module factored by truncated SVD; "
                      "embeddings and other changed modules saved whole (modules_to_save), as mergekit-extract-lora"}
    return (f"output: a peft LoRA adapter over {base} (load it with PeftModel.from_pretrained), "
            f"{len(rep.ranks)} modules at rank <= {rep.rank}: {how.get(rep.how, rep.how)}"
            + (f"; saved whole: {', '.join(rep.saved[:4])}{', ...' if len(rep.saved) > 4 else ''}"
               if rep.saved else ""))
