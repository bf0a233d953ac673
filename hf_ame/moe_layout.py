"""Where every tensor of a mixture of experts comes from: the output names of each architecture
mergekit-moe 0.1.5 writes, and the sources those names are copied from (headers only).

Experts are written in each architecture's checkpoint layout (one tensor per expert and projection:
Mixtral's ``block_sparse_moe.experts.E.w1/w2/w3``, Qwen's and DeepSeek's
``mlp.experts.E.gate_proj/up_proj/down_proj``), which transformers 4 and 5, vLLM and llama.cpp read.
mergekit 0.1.5 writes Mixtral's and Qwen3-MoE's experts fused per layer (transformers 5's in-memory
``mlp.experts.gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]); the numbers are the same.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .checkpoints import TensorInfo
from .errors import IncompatibleCheckpointsError

__all__ = ["Slot", "MLP_PARAMS", "non_expert_names", "expert_slots", "router_names", "zero_bias_shapes",
           "check_expert_shapes"]

MLP_PARAMS = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_LAYER = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
          "self_attn.o_proj.weight", "post_attention_layernorm.weight")
# per-layer tensors beyond Llama's in mergekit's weight list of the output (qwen2.json, qwen3.json)
_EXTRA = {"Qwen MoE": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
          "Qwen3 MoE": ("self_attn.q_norm.weight", "self_attn.k_norm.weight")}
_MLP = re.compile(r"^model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


@dataclass(frozen=True)
class Slot:
    """One output tensor: its name and what it copies. ``kind``: "base" (a non-expert tensor),
    "expert" / "shared" (``member``: the expert's index), "router" / "shared_router" (``member``:
    the layer), "zeros" (Qwen2-MoE's attention biases a Llama or Mistral base lacks);
    ``source``: the tensor's name in its model."""

    name: str
    kind: str
    source: str
    member: int = 0


def non_expert_names(arch: str, base: Mapping[str, TensorInfo], num_layers: int, base_name: str) -> List[Slot]:
    """The attention, norm and embedding tensors of the output (mergekit's weight list of the output
    architecture), in order, as "base" slots or "zeros" for Qwen2-MoE biases the base lacks. A base
    tensor the output has no place for is refused by name (mergekit drops it silently)."""
    extra = _EXTRA.get(arch, ())
    slots = [Slot(EMBED, "base", EMBED)]
    for i in range(num_layers):
        for suffix in _LAYER + extra:
            name = f"model.layers.{i}.{suffix}"
            zero = name not in base and arch == "Qwen MoE" and suffix.endswith("_proj.bias")
            slots.append(Slot(name, "zeros" if zero else "base", name))
    slots.append(Slot(NORM, "base", NORM))
    if HEAD in base:  # optional: a base with tied embeddings stores none
        slots.append(Slot(HEAD, "base", HEAD))
    missing = [s.name for s in slots if s.kind == "base" and s.name not in base]
    if missing:
        raise IncompatibleCheckpointsError(f"base model {base_name!r} lacks tensor {missing[0]!r}, which a {arch} "
                                           f"output needs ({len(missing)} missing)")
    known = {s.name for s in slots}
    extra_names = [n for n in base if n not in known and not _MLP.match(n)]
    if extra_names:
        raise IncompatibleCheckpointsError(
            f"base model {base_name!r} has tensor {extra_names[0]!r}, which a {arch} model has no place for "
            f"(mergekit 0.1.5 drops it: the output would compute something else)")
    return slots


def expert_name(arch: str, layer: int, expert: int, param: str) -> str:
    """The output name of expert ``expert``'s ``param`` (gate_proj, up_proj, down_proj) in ``layer``."""
    if arch == "Mixtral":
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{_MIXTRAL[param]}.weight"
    return f"model.layers.{layer}.mlp.experts.{expert}.{param}.weight"


def shared_name(arch: str, layer: int, param: str) -> str:
    """The shared expert's tensor (Qwen2-MoE: ``shared_expert``; DeepSeek: ``shared_experts``)."""
    module = "shared_expert" if arch == "Qwen MoE" else "shared_experts"
    return f"model.layers.{layer}.mlp.{module}.{param}.weight"


def router_names(arch: str, layer: int, gated_shared: bool) -> List[Tuple[str, str]]:
    """(name, kind) of a layer's router tensors: the experts' gate, and Qwen2-MoE's shared expert gate."""
    module = "block_sparse_moe" if arch == "Mixtral" else "mlp"
    out = [(f"model.layers.{layer}.{module}.gate.weight", "router")]
    if gated_shared:
        out.append((f"model.layers.{layer}.mlp.shared_expert_gate.weight", "shared_router"))
    return out


def expert_slots(arch: str, num_layers: int, n_experts: int, n_shared: int, gated_shared: bool) -> List[Slot]:
    """Every layer's router(s), experts' and shared expert's MLP tensors, layer by layer."""
    out: List[Slot] = []
    for i in range(num_layers):
        out += [Slot(name, kind, name, i) for name, kind in router_names(arch, i, gated_shared)]
        for e in range(n_experts):
            out += [Slot(expert_name(arch, i, e, p), "expert", f"model.layers.{i}.mlp.{p}.weight", e)
                    for p in MLP_PARAMS]
        for s in range(n_shared):
            out += [Slot(shared_name(arch, i, p), "shared", f"model.layers.{i}.mlp.{p}.weight", s) for p in MLP_PARAMS]
    return out


def zero_bias_shapes(out_config: Mapping[str, object]) -> Dict[str, int]:
    """Lengths of the zero q/k/v biases mergekit gives a Qwen2-MoE made from a base without them
    (head_dim as mergekit takes it: hidden_size // num_attention_heads)."""
    head_dim = int(out_config["hidden_size"]) // int(out_config["num_attention_heads"])
    kv = int(out_config.get("num_key_value_heads") or out_config["num_attention_heads"])
    heads = int(out_config["num_attention_heads"])
    return {"q_proj": heads * head_dim, "k_proj": kv * head_dim, "v_proj": kv * head_dim}


def check_expert_shapes(base: Mapping[str, TensorInfo], models: Sequence[Mapping[str, TensorInfo]],
                        names: Sequence[str], where: Sequence[str], num_layers: int) -> None:
    """Every expert holds every layer's gate/up/down projection with the base's shape; the error
    names the expert and the tensor."""
    for i in range(num_layers):
        for p in MLP_PARAMS:
            name = f"model.layers.{i}.mlp.{p}.weight"
            want: Optional[TensorInfo] = base.get(name)
            if want is None:
                raise IncompatibleCheckpointsError(f"base model {names[0]!r} lacks tensor {name!r}")
            for tensors, label, model in zip(models, where, names[1:]):
                got = tensors.get(name)
                if got is None:
                    raise IncompatibleCheckpointsError(f"{label} ({model!r}) lacks tensor {name!r}")
                if tuple(got.shape) != tuple(want.shape):
                    raise IncompatibleCheckpointsError(
                        f"{label} ({model!r}): tensor {name!r} has shape {list(got.shape)}, the base's is "
                        f"{list(want.shape)} (the experts must share the base's layout)")
