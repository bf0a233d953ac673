"""The model card and recipes of a mixture of experts: ``README.md`` (experts, prompts, gate mode,
router, how the other tensors were made), ``moe_recipe.yaml`` (the config with every model pinned to
the folder or Hub commit used and hf_ame's settings: ``hf-ame moe moe_recipe.yaml --out DIR`` re-runs
it; mergekit-moe runs it too, ignoring the ``hf_ame`` section) and ``mergekit_moe_config.yml`` (the
config as written, the file mergekit-moe leaves in its outputs)."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import yaml

from .moe_config import GATE_MODES, RANDOM_MODES, Expert, MoEConfig
from .version import __version__

__all__ = ["moe_files", "moe_recipe", "moe_card", "RECIPE_FILE", "MERGEKIT_MOE_FILE"]

RECIPE_FILE = "moe_recipe.yaml"
MERGEKIT_MOE_FILE = "mergekit_moe_config.yml"


def _pinned(ref: str, paths: Mapping[str, str], shas: Mapping[str, str]) -> str:
    """A model reference that re-runs to the same model: a Hub id at its commit, a folder's absolute path."""
    if ref in shas and shas[ref]:
        return f"{ref.partition('@')[0]}@{shas[ref]}"
    return paths.get(ref, ref)


def moe_recipe(cfg: MoEConfig, plan: Any, paths: Mapping[str, str], shas: Mapping[str, str]) -> str:
    """``moe_recipe.yaml``: the config with pinned models and an ``hf_ame`` section (settings + provenance)."""
    data = cfg.to_dict()
    data["base_model"] = _pinned(cfg.base_model, paths, shas)
    for key in ("experts", "shared_experts"):
        for e in data.get(key) or []:
            e["source_model"] = _pinned(e["source_model"], paths, shas)
    data["hf_ame"]["provenance"] = {"hf_ame": __version__, "architecture": plan.architecture, "dtype": plan.dtype,
                                    "models": {ref: _pinned(ref, paths, shas) for ref in plan.ingredients}}
    return "# a mixture of experts built by hf_ame: hf-ame moe moe_recipe.yaml --out DIR\n" + \
        yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _cell(prompts: Sequence[str]) -> str:
    return "<br>".join(p.replace("|", "\\|").replace("\n", " ") for p in prompts) or "-"


def _expert_rows(experts: Sequence[Expert], label: str) -> List[str]:
    rows = [f"| {label} | model | positive prompts | negative prompts | noise_scale | residual_scale |",
            "|---|---|---|---|---|---|"]
    for i, e in enumerate(experts):
        rows.append(f"| {i} | `{e.source_model}` | {_cell(e.positive_prompts or [])} | "
                    f"{_cell(e.negative_prompts or [])} | {e.noise_scale if e.noise_scale is not None else '-'} | "
                    f"{e.residual_scale if e.residual_scale is not None else '-'} |")
    return rows


def _router_text(cfg: MoEConfig, plan: Any, warnings: Sequence[str]) -> List[str]:
    src = ("the base model" if cfg.router_source == "base" else "each expert's own model (hf_ame's router_source: "
           "experts; mergekit uses the base)")
    how = (f"seeded with random_seed {cfg.random_seed}" if cfg.gate_mode in RANDOM_MODES else
           f"computed from the prompts with {src}, as mergekit-moe 0.1.5 computes it")
    lines = [f"`gate_mode: {cfg.gate_mode}`: {GATE_MODES[cfg.gate_mode]}; {how}. Each router row is normalised to "
             f"norm 1; {plan.experts_per_token} experts are routed per token."]
    return lines + [f"- warning: {w}" for w in warnings]


def _front_matter(cfg: MoEConfig) -> str:
    refs = [cfg.base_model] + [e.source_model for e in cfg.all_experts()]
    hub = list(dict.fromkeys(r.partition("@")[0] for r in refs if r.count("/") == 1 and not r.startswith((".", "/"))))
    meta: Dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation",
                            "tags": ["moe", "frankenmoe", "merge", "mergekit", "hf_ame"]}
    if hub:
        meta["base_model"] = hub
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _intro(cfg: MoEConfig, plan: Any) -> str:
    router = ("drawn at random (seeded)" if cfg.gate_mode in RANDOM_MODES else "computed from the prompts below")
    return (f"{len(cfg.experts)} experts ({plan.experts_per_token} per token) built by hf_ame {__version__} from "
            f"dense models sharing the base `{cfg.base_model}`, from a mergekit-moe configuration: every layer's MLP "
            f"of expert k is that layer's expert k; the router of every layer is {router}.")


def moe_card(cfg: MoEConfig, plan: Any, warnings: Sequence[str] = ()) -> str:
    """README.md of the output: what it is made of and how to re-make it."""
    load = ("AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # DeepSeek MoE's modelling code "
            "is deepseek-ai/deepseek-moe-16b-base's" if plan.architecture == "DeepSeek MoE"
            else "AutoModelForCausalLM.from_pretrained(path)")
    parts = [_front_matter(cfg), f"# Mixture of experts ({plan.architecture})", "",
             _intro(cfg, plan), "",
             "## Experts", "", *_expert_rows(cfg.experts, "expert"), ""]
    if cfg.shared_experts:
        parts += ["## Shared expert", "", *_expert_rows(cfg.shared_experts, "shared"), ""]
    parts += ["## Router", "", *_router_text(cfg, plan, warnings), "",
              "## Attention, norms and embeddings", "", f"{plan.non_expert[0].upper()}{plan.non_expert[1:]}.", "",
              "## Use", "", "```python", "from transformers import AutoModelForCausalLM", f"model = {load}", "```", "",
              "## Reproduce", "", f"`hf-ame moe {RECIPE_FILE} --out DIR` (the models pinned as used), or the original "
              f"configuration below with `hf-ame moe {MERGEKIT_MOE_FILE} --out DIR` or `mergekit-moe`.", "",
              "```yaml", cfg.original.rstrip("\n"), "```", ""]
    return "\n".join(parts)


def moe_files(cfg: MoEConfig, plan: Any, paths: Mapping[str, str], shas: Mapping[str, str],
              warnings: Sequence[str] = ()) -> Dict[str, str]:
    """The card, the pinned recipe and the original config, by file name."""
    return {"README.md": moe_card(cfg, plan, warnings), RECIPE_FILE: moe_recipe(cfg, plan, paths, shas),
            MERGEKIT_MOE_FILE: cfg.original}
