"""mergekit-moe configuration files read as mergekit 0.1.5 reads them (``mergekit/moe/config.py``).

    base_model: org/base                  # attention, norms, embeddings (and the router's hidden states)
    gate_mode: hidden                     # hidden | hidden_avg | hidden_last | cheap_embed | random | uniform_random
    dtype: bfloat16                       # default: the base's
    experts_per_token: 2
    architecture: mixtral                 # optional: a prefix of Mixtral, DeepSeek MoE, Qwen MoE, Qwen3 MoE
    experts:
      - source_model: org/coder
        positive_prompts: ["Write a function"]
        negative_prompts: ["Tell a story"]  # optional; noise_scale, residual_scale too
    shared_experts: [...]                 # Qwen2-MoE: exactly one, with prompts; DeepSeek: at most one, without
    hf_ame:                               # hf_ame only (mergekit ignores a key it does not know)
      non_expert: base                    # or {merge_method: ties, parameters: {...}, ame: {...}}
      router_source: base                 # or experts: each expert's own hidden states / embeddings
      random_seed: 0

The checks are mergekit's ``is_bad_config`` and each output architecture's ``supports_config``, raised
as errors naming the field; the output config is built as each architecture's ``_generate_config``
builds it. Keys mergekit does not know are ignored with a warning (``strict``: refused), as mergekit
ignores them.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

from .errors import RecipeError

__all__ = ["Expert", "MoEConfig", "GATE_MODES", "ARCHITECTURES", "check_moe_config", "select_architecture",
           "output_config", "save_output_config"]

# what each gate_mode computes the router from (mergekit/moe/router.py get_gate_params)
GATE_MODES = {
    "hidden": "the last prompt token's hidden state at every layer's input, averaged over the prompts",
    "hidden_last": "the same as hidden",
    "hidden_avg": "the hidden states at every layer's input averaged over the tokens, then over the prompts",
    "cheap_embed": "the sum of the prompts' token embeddings, normalised, the same for every layer",
    "random": "standard normal draws (seeded)",
    "uniform_random": "uniform draws in +-1/sqrt(hidden_size), torch.nn.Linear's initialisation (seeded)",
}
RANDOM_MODES = ("random", "uniform_random")
# mergekit's ALL_OUTPUT_ARCHITECTURES, in its order; the input model types each accepts
ARCHITECTURES = {"Mixtral": ("llama", "mistral"), "DeepSeek MoE": ("llama", "mistral"),
                 "Qwen MoE": ("llama", "mistral", "qwen2"), "Qwen3 MoE": ("qwen3",)}
_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture", "hf_ame"}
_EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
_HF_AME_KEYS = {"non_expert", "router_source", "random_seed", "provenance"}
_NON_EXPERT_KEYS = {"merge_method", "parameters", "ame"}


def _fail(where: str, msg: str) -> RecipeError:
    return RecipeError(f"{where}: {msg}")


@dataclass
class Expert:
    """One expert: a dense model whose MLP becomes an expert slot in every layer, and the prompts
    its router row is computed from. ``noise_scale``: std of Gaussian noise added to its MLP
    tensors; ``residual_scale``: multiplies its ``down_proj`` (both mergekit's, default None)."""

    source_model: str
    positive_prompts: Optional[List[str]] = None
    negative_prompts: Optional[List[str]] = None
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None

    @classmethod
    def from_dict(cls, data: Any, where: str, ignored: List[str]) -> "Expert":
        if not isinstance(data, Mapping) or not isinstance(data.get("source_model"), str) or not data["source_model"]:
            raise _fail(where, f"expected {{source_model: <model>, positive_prompts: [...]}}, got {data!r}")
        ignored.extend(f"{where}.{k}" for k in sorted(set(data) - _EXPERT_KEYS, key=str))
        out = cls(data["source_model"])
        for key in ("positive_prompts", "negative_prompts"):
            value = data.get(key)
            if value is not None and not (isinstance(value, list) and all(isinstance(p, str) for p in value)):
                raise _fail(f"{where}.{key}", f"expected a list of prompts (strings), got {value!r}")
            setattr(out, key, list(value) if value is not None else None)
        for key in ("noise_scale", "residual_scale"):
            value = data.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise _fail(f"{where}.{key}", f"expected a number, got {value!r}")
            setattr(out, key, float(value) if value is not None else None)
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}

    def prompts(self) -> tuple:
        return tuple(self.positive_prompts or []), tuple(self.negative_prompts or [])


@dataclass
class MoEConfig:
    """A mergekit-moe configuration (see the module docstring); the last three fields are hf_ame's:
    ``non_expert`` ("base", mergekit's choice, or {merge_method, parameters, ame}: the attention,
    norms and embeddings merged from the experts), ``router_source`` ("base", mergekit's, or
    "experts"), ``random_seed`` (random gates and noise; default 0)."""

    base_model: str
    experts: List[Expert]
    gate_mode: str = "hidden"
    dtype: Optional[str] = None
    experts_per_token: int = 2
    shared_experts: Optional[List[Expert]] = None
    architecture: Optional[str] = None
    non_expert: Any = "base"
    router_source: str = "base"
    random_seed: int = 0
    original: str = ""  # the file's text, as the user wrote it
    base_dir: Optional[Path] = None  # the file's folder (relative model paths)
    ignored: List[str] = field(default_factory=list)

    @classmethod
    def from_file(cls, path: Any, *, strict: bool = False) -> "MoEConfig":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise RecipeError(f"{path}: cannot read the MoE config ({exc.strerror or exc})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        return cls.from_dict(data, strict=strict, original=text, base_dir=path.resolve().parent)

    @classmethod
    def from_dict(cls, data: Any, *, strict: bool = False, original: Optional[str] = None,
                  base_dir: Optional[Path] = None) -> "MoEConfig":
        """Parse ``data`` as mergekit's ``MoEMergeConfig`` does; errors name the field."""
        if not isinstance(data, Mapping):
            raise _fail("config", f"expected a mapping with base_model and experts, got {type(data).__name__}")
        ignored = sorted(set(data) - _KEYS, key=str)
        if not isinstance(data.get("base_model"), str) or not data["base_model"]:
            raise _fail("base_model", f"expected a model (Hub id or folder), got {data.get('base_model')!r}")
        experts = _experts(data.get("experts"), "experts", ignored, required=True)
        shared = _experts(data.get("shared_experts"), "shared_experts", ignored, required=False)
        cfg = cls(data["base_model"], experts, shared_experts=shared,
                  original=original if original is not None else yaml.safe_dump(dict(data), sort_keys=False),
                  base_dir=base_dir)
        cfg.gate_mode = _choice(data.get("gate_mode", "hidden"), "gate_mode", GATE_MODES)
        cfg.dtype = _optional_str(data.get("dtype"), "dtype")
        cfg.architecture = _optional_str(data.get("architecture"), "architecture")
        cfg.experts_per_token = _int(data.get("experts_per_token", 2), "experts_per_token")
        _hf_ame_section(cfg, data.get("hf_ame"), ignored)
        _ignore(cfg, ignored, strict)
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        """The config as a mergekit-moe file says it, with an ``hf_ame`` section for hf_ame's settings."""
        out: Dict[str, Any] = {"base_model": self.base_model, "gate_mode": self.gate_mode}
        if self.dtype is not None:
            out["dtype"] = self.dtype
        out["experts_per_token"] = self.experts_per_token
        if self.architecture is not None:
            out["architecture"] = self.architecture
        out["experts"] = [e.to_dict() for e in self.experts]
        if self.shared_experts:
            out["shared_experts"] = [e.to_dict() for e in self.shared_experts]
        out["hf_ame"] = {"non_expert": self.non_expert, "router_source": self.router_source,
                         "random_seed": self.random_seed}
        return out

    def all_experts(self) -> List[Expert]:
        return list(self.experts) + list(self.shared_experts or [])


def _experts(value: Any, where: str, ignored: List[str], required: bool) -> Optional[List[Expert]]:
    if value is None and not required:
        return None
    if not isinstance(value, list) or (required and not value):
        raise _fail(where, f"expected a list of {{source_model, positive_prompts, ...}}, got {value!r}")
    return [Expert.from_dict(e, f"{where}[{i}]", ignored) for i, e in enumerate(value)]


def _choice(value: Any, where: str, choices: Mapping[str, Any]) -> str:
    if value not in choices:
        raise _fail(where, f"expected one of {', '.join(choices)}, got {value!r}")
    return value


def _optional_str(value: Any, where: str) -> Optional[str]:
    if value is not None and not isinstance(value, str):
        raise _fail(where, f"expected a name, got {value!r}")
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"expected an integer, got {value!r}")
    return value


def _hf_ame_section(cfg: MoEConfig, section: Any, ignored: List[str]) -> None:
    """The ``hf_ame:`` section: non_expert, router_source, random_seed (provenance is written, not read)."""
    if section is None:
        return
    if not isinstance(section, Mapping):
        raise _fail("hf_ame", f"expected a mapping ({', '.join(sorted(_HF_AME_KEYS))}), got {section!r}")
    bad = sorted(set(section) - _HF_AME_KEYS, key=str)
    if bad:
        raise _fail(f"hf_ame.{bad[0]}", f"not an hf_ame MoE setting; expected {', '.join(sorted(_HF_AME_KEYS))}")
    cfg.router_source = _choice(section.get("router_source", "base"), "hf_ame.router_source",
                                {"base": 0, "experts": 0})
    cfg.random_seed = _int(section.get("random_seed", 0), "hf_ame.random_seed")
    cfg.non_expert = parse_non_expert(section.get("non_expert", "base"), "hf_ame.non_expert")


def parse_non_expert(value: Any, where: str = "non_expert") -> Any:
    """"base" or {merge_method: <a method of the registry>, parameters: {...}, ame: {...}}."""
    if value == "base":
        return "base"
    if isinstance(value, str):
        value = {"merge_method": value}
    if not isinstance(value, Mapping) or not isinstance(value.get("merge_method"), str):
        raise _fail(where, f"expected 'base' or {{merge_method, parameters, ame}}, got {value!r}")
    bad = sorted(set(value) - _NON_EXPERT_KEYS, key=str)
    if bad:
        raise _fail(f"{where}.{bad[0]}", f"expected {', '.join(sorted(_NON_EXPERT_KEYS))}")
    for key in ("parameters", "ame"):
        if value.get(key) is not None and not isinstance(value[key], Mapping):
            raise _fail(f"{where}.{key}", f"expected a mapping, got {value[key]!r}")
    return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in value.items() if v is not None}


def _ignore(cfg: MoEConfig, ignored: List[str], strict: bool) -> None:
    if ignored and strict:
        raise _fail(ignored[0], "mergekit-moe accepts and ignores this; refused in strict mode (ignored: "
                    + ", ".join(ignored) + ")")
    for key in ignored:
        warnings.warn(f"MoE config: {key} is ignored (mergekit 0.1.5 ignores it too)", stacklevel=4)
    cfg.ignored = list(ignored)


def check_moe_config(cfg: MoEConfig, allow_all_same: bool = False) -> None:
    """mergekit's ``is_bad_config`` and the build's shared-expert assertion, as errors naming the field."""
    if cfg.experts_per_token < 1:
        raise _fail("experts_per_token", f"must be >= 1, got {cfg.experts_per_token}")
    if len(cfg.experts) < cfg.experts_per_token:
        raise _fail("experts", f"{len(cfg.experts)} expert(s) for experts_per_token {cfg.experts_per_token}: "
                               "give at least as many experts")
    shared = cfg.shared_experts or []
    if shared and len({bool(e.positive_prompts) for e in shared}) > 1:
        raise _fail("shared_experts", "give prompts for every shared expert or for none")
    if cfg.gate_mode == "random":  # mergekit checks nothing more for random gates (uniform_random: it does)
        return
    for i, e in enumerate(cfg.experts):
        if not e.positive_prompts:
            raise _fail(f"experts[{i}].positive_prompts", f"gate_mode {cfg.gate_mode} computes each expert's router "
                                                          "row from its prompts: give at least one")
    if all(e.prompts() == cfg.experts[0].prompts() for e in cfg.experts[1:]):
        raise _fail("experts", "every expert has the same positive and negative prompts: the router could not tell "
                               "them apart (each expert's prompts should be what is routed to it)")
    if not allow_all_same and all(e.source_model == cfg.experts[0].source_model for e in cfg.experts[1:]):
        raise _fail("experts", "every expert is the same model: the MoE would compute what that model computes, at "
                               "more cost (allow_all_same=True / --i-understand-this-is-not-useful-without-training "
                               "if you will train it)")


def _unsupported(arch: str, cfg: MoEConfig, model_types: Sequence[str]) -> Optional[str]:
    """Why ``arch`` cannot take ``cfg`` (mergekit's ``supports_config``), or None."""
    shared = cfg.shared_experts or []
    if arch == "Mixtral" and shared:
        return "Mixtral has no shared experts"
    if arch == "Qwen MoE" and len(shared) != 1:
        return "Qwen MoE needs exactly one shared expert"
    if arch == "Qwen MoE" and cfg.gate_mode != "random" and not shared[0].positive_prompts:
        return "Qwen MoE gates its shared expert: give it prompts"
    if arch == "DeepSeek MoE" and len(shared) > 1:
        return "DeepSeek MoE takes at most one shared expert"
    if arch == "DeepSeek MoE" and shared and (shared[0].positive_prompts or shared[0].negative_prompts):
        return "DeepSeek MoE does not gate its shared expert: give it no prompts"
    if arch == "Qwen3 MoE" and shared:
        return "Qwen3 MoE has no shared experts"
    if len(set(model_types)) != 1 and arch != "Qwen3 MoE":
        return f"{arch} needs one architecture for every model, got {', '.join(sorted(set(model_types)))}"
    bad = [t for t in model_types if t not in ARCHITECTURES[arch]]
    if bad:
        return f"{arch} takes {' or '.join(ARCHITECTURES[arch])} models, got {bad[0]!r}"
    return None


def select_architecture(cfg: MoEConfig, model_types: Sequence[str]) -> str:
    """mergekit's ``select_output_arch``: the architectures whose name starts with ``architecture``
    (case-insensitive; all without it) that support the config; Mixtral when it does, else the first."""
    names = [a for a in ARCHITECTURES if cfg.architecture is None or a.lower().startswith(cfg.architecture.lower())]
    if not names:
        raise _fail("architecture", f"{cfg.architecture!r} names no output architecture; expected a prefix of "
                                    + ", ".join(ARCHITECTURES))
    reasons = {a: _unsupported(a, cfg, model_types) for a in names}
    fit = [a for a in names if reasons[a] is None]
    if not fit:
        raise _fail("architecture" if cfg.architecture else "experts",
                    "no output architecture takes this config: " + "; ".join(f"{r}" for r in reasons.values()))
    return "Mixtral" if "Mixtral" in fit else fit[0]


def output_config(arch: str, base_config: Any, cfg: MoEConfig, out_dtype: Any) -> Any:
    """The output's config as mergekit's ``_generate_config`` builds it from the base's transformers
    config (a transformers config; a dict for DeepSeek, whose modelling code is the Hub's)."""
    import transformers

    n, k = len(cfg.experts), cfg.experts_per_token
    if arch == "DeepSeek MoE":
        return _deepseek_config(base_config, n, len(cfg.shared_experts or []), k, out_dtype)
    if arch == "Mixtral":
        if not isinstance(base_config, transformers.MistralConfig):
            mistral = transformers.MistralConfig(**base_config.to_dict())
            mistral.sliding_window = None
            mistral.max_position_embeddings = base_config.max_position_embeddings
            base_config = mistral
        out = transformers.MixtralConfig(**base_config.to_dict())
        out.architectures, out.num_local_experts, out.num_experts_per_tok = ["MixtralForCausalLM"], n, k or 2
        out.sliding_window = None
        out.dtype = out_dtype  # transformers 5's name of mergekit's torch_dtype
        return out
    qwen2 = arch == "Qwen MoE"
    out = (transformers.Qwen2MoeConfig if qwen2 else transformers.Qwen3MoeConfig)(**base_config.to_dict())
    out.architectures = ["Qwen2MoeForCausalLM" if qwen2 else "Qwen3MoeForCausalLM"]
    out.num_experts, out.num_experts_per_tok, out.decoder_sparse_step, out.norm_topk_prob = n, k or 2, 1, True
    if qwen2:
        out.sliding_window, out.use_sliding_window = None, False
        out.shared_expert_intermediate_size = out.intermediate_size
    out.moe_intermediate_size = out.intermediate_size
    if out_dtype is not None:
        out.dtype = out_dtype
    return out


def _deepseek_config(base_config: Any, n: int, shared: int, k: int, out_dtype: Any) -> Dict[str, Any]:
    res = base_config.to_dict()
    res.update(architectures=["DeepseekForCausalLM"], model_type="deepseek", n_routed_experts=n,
               n_shared_experts=shared or None, num_experts_per_tok=k or (1 if shared else 2), first_k_dense_replace=0,
               moe_layer_freq=1, scoring_func="softmax", norm_topk_prob=True,
               moe_intermediate_size=res["intermediate_size"])
    repo = "deepseek-ai/deepseek-moe-16b-base"
    res["auto_map"] = {"AutoConfig": f"{repo}--configuration_deepseek.DeepseekConfig",
                       "AutoModel": f"{repo}--modeling_deepseek.DeepseekModel",
                       "AutoModelForCausalLM": f"{repo}--modeling_deepseek.DeepseekForCausalLM"}
    if out_dtype is not None:
        res["torch_dtype"] = str(out_dtype).removeprefix("torch.")
    return res


def save_output_config(folder: Path, out_cfg: Any) -> None:
    """config.json as mergekit writes it (``save_pretrained``; DeepSeek's dict as JSON)."""
    if isinstance(out_cfg, dict):
        (Path(folder) / "config.json").write_text(json.dumps(out_cfg, indent=4))
    else:
        out_cfg.save_pretrained(str(folder))
