"""Mixtures of experts from dense fine-tunes ("frankenMoE"), from mergekit-moe's config files.

``build_moe(config, output_dir)`` reads a mergekit-moe 0.1.5 config (:mod:`hf_ame.moe_config`) and
writes the MoE mergekit-moe writes (Mixtral, DeepSeek MoE, Qwen2-MoE or Qwen3-MoE), in three steps:

1. **Plan, from headers** (``plan_moe``; ``hf-ame moe --dry-run``): every output tensor is one copy
   (:func:`hf_ame.stacking.build_stack_plan`): an expert's MLP projection into its expert slot, an
   attention / norm / embedding tensor from the base (or, with ``hf_ame.non_expert``, merged from the
   experts by a method of the registry: a second plan, combined into one set of shards), a router
   tensor from the router vectors. Every check (architecture, shapes, prompts, tokenizer, output
   folder) runs here, before any weight is read.
2. **The router** (:mod:`hf_ame.moe_router`), from the prompts, one model in memory at a time.
3. **Copy, tensor by tensor** into a staged output (:func:`hf_ame.executor.run_parts`): memory is
   one tensor (and the next, read ahead), whatever the number of experts; config.json, the base's
   tokenizer files, a model card and ``moe_recipe.yaml`` (re-runnable) are added, then the folder
   is moved into place.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .checkpoints import Checkpoint
from .checks import model_dtype
from .config import AMEConfig, parse_dtype
from .engine import plan_merge
from .errors import ConfigError, IncompatibleCheckpointsError, RecipeError
from .executor import MergeReport, run_parts
from .hub import download, parse_ingredient
from .mergekit_config import merge_section
from .methods import get_method
from .moe_card import moe_files
from .moe_config import (RANDOM_MODES, MoEConfig, check_moe_config, output_config, parse_non_expert,
                         save_output_config, select_architecture)
from .moe_layout import Slot, check_expert_shapes, expert_slots, non_expert_names, zero_bias_shapes
from .moe_router import EMBEDDING, gate_vectors, prompt_tokenizer, router_dtype, warn_degenerate
from .moe_sources import ComputedSource, ExpertSource
from .output import check_output_dir, copy_aux_files, staged_output, write_files
from .plan import MergePlan, combine_plans
from .quantization import check_quantization
from .stacking import build_stack_plan

__all__ = ["MoEPlan", "MoEResult", "build_moe", "plan_moe"]


@dataclass
class MoEPlan(MergePlan):
    """A :class:`~hf_ame.plan.MergePlan` of a mixture of experts, with what the router step needs.
    ``router_bytes``: memory of the one model (or embedding) held at a time while computing the
    router; ``peak_memory`` is the larger of that and the copies' buffers."""

    architecture: str = ""
    gate_mode: str = ""
    experts: List[str] = field(default_factory=list)
    shared: List[str] = field(default_factory=list)
    router_models: List[str] = field(default_factory=list)
    router_bytes: int = 0
    non_expert: str = "base"
    experts_per_token: int = 2

    @property
    def copy_memory(self) -> int:
        """Peak bytes of the copy step's buffers (one tensor, the next read ahead, the output tensor)."""
        return MergePlan.peak_memory.fget(self)

    @property
    def peak_memory(self) -> int:
        return max(self.copy_memory, self.router_bytes)

    def summary(self) -> str:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(self.counts().items()))
        router = (f"{self.gate_mode}: seeded random draws" if self.gate_mode in RANDOM_MODES else
                  f"{self.gate_mode} from the prompts of {', '.join(self.router_models)}, one model at a time")
        lines = [
            f"plan: mixture of experts ({self.architecture}) from base {self.base} + {len(self.experts)} experts"
            + (f" + {len(self.shared)} shared" if self.shared else "") + f" -> {self.output_dir}",
            f"  experts: {', '.join(self.experts)} ({self.experts_per_token} per token)"
            + (f"; shared: {', '.join(self.shared)}" if self.shared else ""),
            f"  router: {router} ({_mib(self.router_bytes)} held)",
            f"  non-expert tensors: {self.non_expert}",
            f"  tensors: {len(self.mine())} ({sum(t.numel for t in self.mine()) / 1e6:.2f}M parameters; {counts}), "
            "one at a time, the next read ahead",
            f"  read: {_mib(self.bytes_to_read)}  write: {_mib(self.bytes_to_write)}  peak memory (estimate): "
            f"{_mib(self.peak_memory)} (copies {_mib(self.copy_memory)}, router {_mib(self.router_bytes)})",
            f"  output: {len(self.shards.files)} shard(s) ({', '.join(self.shards.files[:3])}"
            + (", ..." if len(self.shards.files) > 3 else "") + f"), dtype {self.dtype}",
        ] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        out["moe"] = {"architecture": self.architecture, "gate_mode": self.gate_mode, "experts": self.experts,
                      "shared_experts": self.shared, "router_models": self.router_models,
                      "router_bytes": self.router_bytes, "copy_memory": self.copy_memory,
                      "non_expert": self.non_expert, "experts_per_token": self.experts_per_token}
        return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 or n == 0 else f"{n / 1024:.1f} KiB"


@dataclass
class MoEResult:
    """What :func:`build_moe` did: the plan it ran, the executor's report, times in seconds."""

    output_dir: Path
    plan: MoEPlan
    report: MergeReport
    router_seconds: float = 0.0
    seconds: float = 0.0
    bytes_read: int = 0
    warnings: List[str] = field(default_factory=list)

    def summary(self) -> str:
        p = self.plan
        return (f"built a {p.architecture} mixture of {len(p.experts)} experts -> {self.output_dir}: "
                f"{self.report.tensors} tensors ({self.report.parameters / 1e6:.2f}M parameters), router "
                f"({p.gate_mode}) in {self.router_seconds:.2f}s, read {self.bytes_read / 2**20:.1f} MiB, wrote "
                f"{self.report.bytes_written / 2**20:.1f} MiB in {self.seconds:.2f}s")


@dataclass
class _Opened:
    """A MoE build's checked inputs (headers only), the output architecture and config."""

    cfg: MoEConfig
    base: Checkpoint
    experts: List[ExpertSource]
    shared: List[ExpertSource]
    arch: str
    out_config: Any
    out_dtype: Optional[torch.dtype]
    computed: ComputedSource
    shas: Dict[str, str]
    tokenizer: Any = None
    parts: List[Tuple[MergePlan, list, Optional[Checkpoint]]] = field(default_factory=list)

    def checkpoints(self) -> List[Any]:
        seen = {id(self.base): self.base}
        for s in self.experts + self.shared:
            seen.setdefault(id(s.ckpt), s.ckpt)
        for _, srcs, base in self.parts[1:]:
            for c in srcs + ([base] if base is not None else []):
                seen.setdefault(id(c), c)
        return list(seen.values())

    def close(self) -> None:
        for c in self.checkpoints():
            c.close()


def _resolve(ref: str, base_dir: Optional[Path], where: str, shas: Dict[str, str]) -> Path:
    """A model reference as mergekit takes it (a folder, else ``org/name[@revision]`` on the Hub);
    a relative folder is looked for from the current folder (mergekit's rule), then the config's."""
    if "+" in ref:
        raise RecipeError(f"{where}: {ref!r}: model+lora references are not supported for MoE experts yet")
    p = Path(ref).expanduser()
    if p.is_dir():
        return p.resolve()
    if base_dir is not None and not p.is_absolute() and (base_dir / p).is_dir():
        return (base_dir / p).resolve()
    ident, _, rev = ref.partition("@")
    if ident.count("/") != 1 or ident.startswith((".", "/", "~")):
        raise RecipeError(f"{where}: {ref!r} is neither a model folder nor a Hub id (org/name)")

    ing = parse_ingredient({"id": ident, "revision": rev or None}, where=where)
    folder, sha = download(ing, files=["model.safetensors"])  # safetensors, configs, tokenizer
    shas[ref] = sha
    return folder


def _open_models(cfg: MoEConfig, shas: Dict[str, str]) -> Tuple[Checkpoint, List[ExpertSource], List[ExpertSource]]:
    """Checkpoints (headers) of the base and every expert; one per folder, shared by its experts."""
    opened: Dict[Path, Checkpoint] = {}

    def open_ref(ref: str, where: str) -> Checkpoint:
        path = _resolve(ref, cfg.base_dir, where, shas)
        if path not in opened:
            ckpt = opened[path] = Checkpoint(path, name=ref)
            if ckpt.files_path != ckpt.path:
                raise RecipeError(f"{where}: {ref!r} is a LoRA adapter; MoE experts must be full models")
            check_quantization(ref, ckpt.config, getattr(ckpt, "raw_tensors", ckpt.tensors))
        return opened[path]

    base = open_ref(cfg.base_model, "base_model")
    experts = [ExpertSource(open_ref(e.source_model, f"experts[{i}].source_model"), e, cfg.random_seed, f"expert{i}")
               for i, e in enumerate(cfg.experts)]
    shared = [ExpertSource(open_ref(e.source_model, f"shared_experts[{i}].source_model"), e, cfg.random_seed,
                           f"shared{i}") for i, e in enumerate(cfg.shared_experts or [])]
    return base, experts, shared


def _out_dtype(cfg: MoEConfig, base: Checkpoint) -> Optional[torch.dtype]:
    """mergekit's ``select_dtype``: the config's ``dtype``, else the base config's, else None (as stored)."""
    if cfg.dtype is not None:
        return parse_dtype(cfg.dtype, "dtype")
    name = base.config.get("dtype") or base.config.get("torch_dtype")
    return parse_dtype(name, "base_model config.json dtype") if isinstance(name, str) else None


def _check_models(o: _Opened, num_layers: int) -> None:
    """Every expert has the base's layer count, width and MLP shapes (errors name the expert)."""
    for label, src in [(f"experts[{i}]", s) for i, s in enumerate(o.experts)] + \
                      [(f"shared_experts[{i}]", s) for i, s in enumerate(o.shared)]:
        for key in ("num_hidden_layers", "hidden_size"):
            if src.ckpt.config.get(key) != o.base.config.get(key):
                raise IncompatibleCheckpointsError(
                    f"{label} ({src.name!r}): config {key} is {src.ckpt.config.get(key)!r}, the base's is "
                    f"{o.base.config.get(key)!r}")
    srcs = o.experts + o.shared
    labels = [f"experts[{i}]" for i in range(len(o.experts))] + [f"shared_experts[{i}]" for i in range(len(o.shared))]
    check_expert_shapes(o.base.tensors, [s.tensors for s in srcs], [o.base.name] + [s.name for s in srcs], labels,
                        num_layers)


def _gated_shared(cfg: MoEConfig) -> bool:
    """Whether the shared experts get router rows (mergekit: when they have prompts, or gates are random)."""
    return bool(cfg.shared_experts) and (any(e.positive_prompts for e in cfg.shared_experts)
                                         or cfg.gate_mode in RANDOM_MODES)


def _open(cfg: MoEConfig, output_dir: Path, overwrite: bool, allow_all_same: bool,
          trust_remote_code: bool) -> _Opened:
    """Everything checked from configs and headers; nothing big read."""
    check_moe_config(cfg, allow_all_same)
    check_output_dir(output_dir, overwrite)  # before any download
    shas: Dict[str, str] = {}
    base, experts, shared = _open_models(cfg, shas)
    check_output_dir(output_dir, overwrite, [base.path] + [s.path for s in experts + shared])
    arch = select_architecture(cfg, [c.model_type for c in [base] + [s.ckpt for s in experts + shared]])
    out_dtype = _out_dtype(cfg, base)
    from transformers import AutoConfig

    base_config = AutoConfig.from_pretrained(str(base.files_path), trust_remote_code=trust_remote_code)
    o = _Opened(cfg, base, experts, shared, arch, output_config(arch, base_config, cfg, out_dtype), out_dtype,
                ComputedSource(), shas)
    _check_models(o, int(base.config["num_hidden_layers"]))
    if cfg.gate_mode not in RANDOM_MODES:
        o.tokenizer = prompt_tokenizer(base.files_path, trust_remote_code)
    return o


def _slots(o: _Opened) -> List[Slot]:
    """Every output tensor in order: embeddings, then layer by layer its attention and norms, router(s),
    experts and shared expert, then the final norm and head."""
    layers = int(o.base.config["num_hidden_layers"])
    outside = non_expert_names(o.arch, o.base.tensors, layers, o.base.name)
    inner = expert_slots(o.arch, layers, len(o.experts), len(o.shared), o.arch == "Qwen MoE")
    by_layer: Dict[int, List[Slot]] = {}
    for s in inner:
        by_layer.setdefault(s.member if s.kind.endswith("router") else int(s.name.split(".")[2]), []).append(s)
    out = [outside[0]]
    for i in range(layers):
        out += [s for s in outside if s.name.startswith(f"model.layers.{i}.")] + by_layer.get(i, [])
    return out + [s for s in outside[1:] if not s.name.startswith("model.layers.")]


def _declare_computed(o: _Opened, slots: List[Slot]) -> None:
    """Headers of the router tensors ([experts, hidden] in the router's dtype) and zero biases."""
    hidden = int(o.base.config["hidden_size"])
    cfg_dict = o.out_config if isinstance(o.out_config, dict) else o.out_config.to_dict()
    sizes = zero_bias_shapes(cfg_dict) if any(s.kind == "zeros" for s in slots) else {}
    for s in slots:
        if s.kind == "router":
            o.computed.declare(s.name, router_dtype(o.cfg.gate_mode), (len(o.experts), hidden))
        elif s.kind == "shared_router":
            o.computed.declare(s.name, router_dtype(o.cfg.gate_mode), (1, hidden))
        elif s.kind == "zeros":
            n = sizes[s.name.split(".")[-2]]
            o.computed.declare(s.name, o.out_dtype or torch.float32, (n,))
            o.computed.values[s.name] = torch.zeros(n, dtype=o.out_dtype)


def _router_sources(o: _Opened) -> List[Checkpoint]:
    """The model each gated expert's router row is computed from: the base (mergekit) or its own."""
    gated = o.experts + (o.shared if _gated_shared(o.cfg) else [])
    if o.cfg.router_source == "base":
        return [o.base] * len(gated)
    return [s.ckpt for s in gated]


def _router_bytes(o: _Opened) -> int:
    """Memory held while the router is computed, meant as an upper bound: for the hidden modes the
    largest model's files (mapped while it loads) plus its parameters in bfloat16; for cheap_embed the
    embedding as read (its mapped pages and the copy) and in float32; for random gates the draws."""
    mode, srcs = o.cfg.gate_mode, _router_sources(o)
    if mode in RANDOM_MODES:
        return len(srcs) * int(o.base.config["num_hidden_layers"]) * int(o.base.config["hidden_size"]) * 4
    if mode == "cheap_embed":
        return max(2 * c.tensors[EMBEDDING].nbytes + c.tensors[EMBEDDING].numel * 4 for c in srcs
                   if EMBEDDING in c.tensors)
    return max(sum(i.nbytes + i.numel * 2 for i in c.tensors.values()) for c in srcs)


def _copy_plan(o: _Opened, slots: List[Slot], output_dir: Path, max_shard_size: Any) -> Tuple[MergePlan, list]:
    """The copies: each slot's source tensor (base, expert view or computed), read whole, one at a time."""
    sources: List[Any] = [o.base, *o.experts, *o.shared, o.computed]
    first = {"base": 0, "expert": 1, "shared": 1 + len(o.experts)}
    computed = len(sources) - 1
    entries = [(s.name, first[s.kind] + s.member if s.kind in first else computed, s.source, None) for s in slots]
    plan = build_stack_plan(sources, entries, output_dir, out_dtype=o.out_dtype, model_dtype=model_dtype(o.base),
                            max_shard_size=max_shard_size)
    for t in plan.tensors:
        if t.source_models[0] == computed:
            t.read_bytes = 0  # made in memory, not read
    return plan, sources


def _non_expert_part(o: _Opened, names: List[str], output_dir: Path, max_shard_size: Any,
                     overwrite: bool) -> Tuple[MergePlan, list, Optional[Checkpoint]]:
    """The attention, norm and embedding tensors merged from the experts' distinct models by a method
    of the registry (task-vector methods from the base), planned as an ordinary merge of those tensors."""

    spec, where = o.cfg.non_expert, "hf_ame.non_expert"
    try:
        entry = get_method(spec["merge_method"])
    except ConfigError as exc:
        raise RecipeError(f"{where}.merge_method: {exc}") from None
    pivot_base = entry.needs_base or entry.optional_base
    section = merge_section({"ame": spec.get("ame")}, entry.name, dict(spec.get("parameters") or {}), pivot_base)
    config = AMEConfig.from_dict(section, prefix=where)
    keep = {n: n for n in names}
    models = {s.ckpt.path: s.name for s in o.experts + o.shared}
    views = [Checkpoint(p, name=n).rekey(keep) for p, n in models.items()]
    base = Checkpoint(o.base.path, name=o.base.name).rekey(keep) if pivot_base else None
    plan = plan_merge(views, output_dir, config, base=base, dtype=o.out_dtype, max_shard_size=max_shard_size,
                      overwrite=overwrite, min_ingredients=1)
    return plan, views, base


def _describe_non_expert(cfg: MoEConfig, n_models: int) -> str:
    if cfg.non_expert == "base":
        return "copied from the base (mergekit's choice)"
    spec = cfg.non_expert
    how = "through AME " + str(spec["ame"]) if spec.get("ame") else "one-shot"
    return (f"merged from the experts' {n_models} distinct model(s) by {spec['merge_method']} ({how}"
            + (f", parameters {spec['parameters']}" if spec.get("parameters") else "") + ")")


def _moe_plan(o: _Opened, plan: MergePlan, n_models: int) -> MoEPlan:
    values = {f.name: getattr(plan, f.name) for f in fields(MergePlan)}
    names = list(dict.fromkeys([o.base.name] + [s.name for s in o.experts + o.shared]))
    values.update(ingredients=names, base=o.base.name)
    routers = list(dict.fromkeys(c.name for c in _router_sources(o)))
    moe = MoEPlan(**values, architecture=o.arch, gate_mode=o.cfg.gate_mode, experts=[s.name for s in o.experts],
                  shared=[s.name for s in o.shared], router_models=routers, router_bytes=_router_bytes(o),
                  non_expert=_describe_non_expert(o.cfg, n_models), experts_per_token=o.cfg.experts_per_token)
    moe.notes.append("experts are written one tensor per expert and projection (the architecture's checkpoint "
                     "layout; mergekit 0.1.5 fuses Mixtral's and Qwen3-MoE's per layer): the same numbers")
    return moe


def _prepare(cfg: MoEConfig, output_dir: Path, *, overwrite: bool, allow_all_same: bool, trust_remote_code: bool,
             max_shard_size: Any) -> Tuple[_Opened, MoEPlan]:
    """Open and check everything, and plan the output, from configs and headers."""
    o = _open(cfg, output_dir, overwrite, allow_all_same, trust_remote_code)
    try:
        slots = _slots(o)
        _declare_computed(o, slots)
        if cfg.non_expert == "base":
            copy, sources = _copy_plan(o, slots, output_dir, max_shard_size)
            o.parts = [(copy, sources, None)]
            return o, _moe_plan(o, copy, 0)
        names = [s.name for s in slots if s.kind == "base"]
        merged = _non_expert_part(o, names, output_dir, max_shard_size, overwrite)
        copy, sources = _copy_plan(o, [s for s in slots if s.kind != "base"], output_dir, max_shard_size)
        o.parts = [(copy, sources, None), merged]
        combined = combine_plans([copy, merged[0]], [_same, _same], output_dir, max_shard_size)
        return o, _moe_plan(o, combined, len(merged[1]))
    except BaseException:
        o.close()
        raise


def _same(name: str) -> str:
    return name


def _compute_router(o: _Opened, device: str, trust_remote_code: bool) -> Optional[str]:
    """Fill the router tensors: [experts, hidden] per layer (and Qwen2-MoE's shared expert gate)."""
    cfg = o.cfg
    gated = list(cfg.experts) + (list(cfg.shared_experts or []) if _gated_shared(cfg) else [])
    layers, hidden = int(o.base.config["num_hidden_layers"]), int(o.base.config["hidden_size"])
    gates = gate_vectors(cfg.gate_mode, gated, _router_sources(o), o.tokenizer, num_layers=layers, hidden_size=hidden,
                         seed=cfg.random_seed, device=device, trust_remote_code=trust_remote_code)
    n = len(cfg.experts)
    for name in o.computed.tensors:
        layer = int(name.split(".")[2])
        if name.endswith("shared_expert_gate.weight"):
            o.computed.values[name] = gates[layer, n:, :].contiguous()
        elif name.endswith("gate.weight"):
            o.computed.values[name] = gates[layer, :n, :].contiguous()
    return warn_degenerate(gates)


def _load_config(config: Union[MoEConfig, str, Path, Dict[str, Any]], strict: bool,
                 overrides: Dict[str, Any]) -> MoEConfig:

    if isinstance(config, MoEConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = MoEConfig.from_dict(config, strict=strict)
    else:
        cfg = MoEConfig.from_file(config, strict=strict)
    if overrides.get("non_expert") is not None:
        cfg.non_expert = parse_non_expert(overrides["non_expert"])
    if overrides.get("router_source") is not None:
        if overrides["router_source"] not in ("base", "experts"):
            raise ConfigError(f"router_source: expected base or experts, got {overrides['router_source']!r}")
        cfg.router_source = overrides["router_source"]
    if overrides.get("random_seed") is not None:
        cfg.random_seed = int(overrides["random_seed"])
    return cfg


def plan_moe(config: Union[MoEConfig, str, Path, Dict[str, Any]], output_dir: Union[str, Path],
             **kwargs: Any) -> MoEPlan:
    """The :class:`MoEPlan` :func:`build_moe` would run with the same arguments, from configs and
    headers alone: no weight is read, no model loaded, nothing written."""
    return build_moe(config, output_dir, dry_run=True, **kwargs)


def build_moe(config: Union[MoEConfig, str, Path, Dict[str, Any]], output_dir: Union[str, Path], *,
              overwrite: bool = False, max_shard_size: Union[int, str] = "5GB", device: str = "cpu",
              allow_all_same: bool = False, trust_remote_code: bool = False, strict: bool = False,
              progress: bool = True, dry_run: bool = False, non_expert: Any = None, router_source: Optional[str] = None,
              random_seed: Optional[int] = None) -> Union[MoEResult, MoEPlan]:
    """Build the mixture of experts a mergekit-moe config describes into ``output_dir``.

    Args:
        config: a mergekit-moe YAML file, its parsed mapping or a :class:`MoEConfig`.
        output_dir: refused if it exists and is not empty, unless ``overwrite``.
        max_shard_size: bytes per output shard (int) or a size string; default "5GB".
        device: where the hidden-state modes run the prompts through a model; default "cpu".
        allow_all_same: allow experts that are all one model (mergekit's
            ``--i-understand-this-is-not-useful-without-training``).
        trust_remote_code: allow the models' custom code (configs, tokenizers, the router's model).
        strict: refuse config keys mergekit ignores (default: ignored with a warning).
        dry_run: return the :class:`MoEPlan` and stop.
        non_expert, router_source, random_seed: override the config's ``hf_ame`` section
            ("base" or a method name / {merge_method, parameters, ame}; "base" or "experts"; an int).
    Returns a :class:`MoEResult` (the :class:`MoEPlan` with ``dry_run``)."""
    t0 = time.perf_counter()
    cfg = _load_config(config, strict, {"non_expert": non_expert, "router_source": router_source,
                                        "random_seed": random_seed})
    output_dir = Path(output_dir)
    o, plan = _prepare(cfg, output_dir, overwrite=overwrite, allow_all_same=allow_all_same,
                       trust_remote_code=trust_remote_code, max_shard_size=max_shard_size)
    try:
        if dry_run:
            return plan
        tr = time.perf_counter()
        note = _compute_router(o, device, trust_remote_code)
        result = MoEResult(output_dir, plan, None, router_seconds=time.perf_counter() - tr,  # type: ignore[arg-type]
                           warnings=[note] if note else [])
        before = sum(c.bytes_read for c in o.checkpoints())
        inputs = [c.path for c in o.checkpoints()]
        result.report = run_parts([(p, srcs, base, _same) for p, srcs, base in o.parts], plan,
                                  lambda: staged_output(output_dir, overwrite, inputs),
                                  lambda tmp: _finish(tmp, o, result, trust_remote_code), progress=progress)
        result.bytes_read = sum(c.bytes_read for c in o.checkpoints()) - before
    finally:
        o.close()
    result.seconds = time.perf_counter() - t0
    return result


def _finish(tmp: Path, o: _Opened, result: MoEResult, trust_remote_code: bool) -> None:
    """config.json (mergekit's), the base's tokenizer and generation files, the card and the recipes."""

    copy_aux_files(o.base.files_path, tmp, trust_remote_code)
    save_output_config(tmp, o.out_config)
    paths = {c.name: str(c.path) for c in o.checkpoints()}
    write_files(tmp, moe_files(o.cfg, result.plan, paths, o.shas, result.warnings))
