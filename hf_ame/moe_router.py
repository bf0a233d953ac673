"""The router of a mixture of experts, computed from each expert's prompts as mergekit 0.1.5 computes it
(``mergekit/moe/router.py`` and ``scripts/moe.py``), with one model in memory at a time.

For every expert (and a gated shared expert), a vector per layer: ``hidden`` runs the prompts
through a causal LM loaded in bfloat16 and takes the hidden state of the last position at every
layer's input (``output_hidden_states[:-1]``), averaged over the prompts; ``hidden_avg`` averages
over the positions first; ``cheap_embed`` sums the prompts' token embeddings (one vector for every
layer). Negative prompts' vectors are subtracted, then each layer's vector is scaled to norm 1.
Prompts are tokenized as mergekit does: the BOS token's text prepended, padded on the left with the
BOS token (EOS when there is none), no other special tokens. The arithmetic is mergekit's, op for
op, so the vectors are equal bit for bit. ``random`` / ``uniform_random`` draw from a generator
seeded with ``seed`` (mergekit's ``--random-seed`` seeds torch's global generator the same way).
"""
from __future__ import annotations

import gc
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .checkpoints import Checkpoint
from .errors import CheckpointError
from .moe_config import RANDOM_MODES, Expert

__all__ = ["prompt_tokenizer", "tokenize_prompts", "cheap_embedding", "hidden_states", "gate_vectors",
           "router_dtype", "degenerate_layers", "EMBEDDING"]

EMBEDDING = "model.embed_tokens.weight"  # the tensor cheap_embed reads (mergekit's name)


def router_dtype(mode: str) -> torch.dtype:
    """The dtype the router vectors are computed in: bfloat16 for the hidden modes (the model is
    loaded in it), float32 otherwise."""
    return torch.bfloat16 if mode.startswith("hidden") else torch.float32


def prompt_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    """The base model's tokenizer as mergekit sets it up: padding on the left with the BOS token
    (the EOS token where there is no BOS)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        raise CheckpointError(f"{path}: cannot load the tokenizer the router prompts need ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]})") from None
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.pad_token_id is None:
        raise CheckpointError(f"{path}: the tokenizer has neither a BOS nor an EOS token to pad the prompts with")
    return tok


def tokenize_prompts(prompts: Sequence[str], tokenizer: Any) -> Any:
    """mergekit's ``tokenize_prompts``: BOS text + prompt, padded, no special tokens added."""
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def cheap_embedding(embed: torch.Tensor, tokenized: Any, num_layers: int) -> torch.Tensor:
    """mergekit's ``get_cheap_embedding`` ([num_layers, hidden] float32). The token embeddings are
    gathered by index rather than by a one-hot matrix product: the same float32 values (each
    product sums one row and zeros), without a batch x length x vocabulary matrix."""
    ids = tokenized["input_ids"]
    if int(ids.max()) >= embed.shape[0]:
        raise CheckpointError(f"a prompt token id ({int(ids.max())}) is outside the {embed.shape[0]} embedding rows")
    h = embed.float()[ids]  # (batch, length, hidden)
    embedded = (h * tokenized["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    res = embedded / embedded.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return res.repeat(num_layers, 1)


def hidden_states(model: Any, tokenized: Any, average: bool) -> torch.Tensor:
    """mergekit's ``get_hidden_states``: [num_layers, hidden] in the model's dtype."""
    with torch.no_grad():
        output = model(**tokenized.to(model.device), output_hidden_states=True, return_dict=True)
    states = torch.stack(output.hidden_states[:-1])  # (layers, batch, length, hidden)
    if average:
        states = states.sum(dim=2) / states.shape[2]
    else:
        states = states[:, :, -1, :]
    return states.sum(dim=1) / states.shape[1]


def _expert_vector(expert: Expert, encode: Callable[[Any], torch.Tensor], tokenizer: Any) -> torch.Tensor:
    """One expert's [layers, hidden] vectors: positive minus negative prompts, each layer's normalised."""
    states = encode(tokenize_prompts(expert.positive_prompts or [], tokenizer))
    if expert.negative_prompts:
        states -= encode(tokenize_prompts(expert.negative_prompts, tokenizer))
    states /= states.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
    return states


def _random_gates(mode: str, shape: tuple, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn(shape, generator=gen)
    scale = math.sqrt(1.0 / shape[-1])
    return torch.rand(shape, generator=gen) * 2 * scale - scale


def load_causal_lm(path: Path, device: str, trust_remote_code: bool = False) -> Any:
    """A causal LM loaded as mergekit loads it for the hidden modes: bfloat16, low CPU memory."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, device_map=device,
                                                low_cpu_mem_usage=True, trust_remote_code=trust_remote_code).eval()


def gate_vectors(mode: str, experts: Sequence[Expert], sources: Sequence[Checkpoint], tokenizer: Any, *,
                 num_layers: int, hidden_size: int, seed: int = 0, device: str = "cpu",
                 trust_remote_code: bool = False) -> torch.Tensor:
    """[num_layers, len(experts), hidden_size]: each expert's router vectors, expert k's computed from
    the model ``sources[k]`` (the base for all of them in mergekit). The models are taken one at a
    time, in order of first use, and released before the next is loaded."""
    if mode in RANDOM_MODES:
        return _random_gates(mode, (num_layers, len(experts), hidden_size), seed)
    order: Dict[str, List[int]] = {}
    for k, src in enumerate(sources):
        order.setdefault(str(src.path), []).append(k)
    vectors: List[Optional[torch.Tensor]] = [None] * len(experts)
    for ks in order.values():
        src = sources[ks[0]]
        encode = _encoder(mode, src, num_layers, device, trust_remote_code)
        for k in ks:
            vectors[k] = _expert_vector(experts[k], encode, tokenizer)
        del encode
        gc.collect()  # the model goes before the next one is loaded
    return torch.stack(vectors, dim=0).permute(1, 0, 2)


def _encoder(mode: str, src: Checkpoint, num_layers: int, device: str,
             trust_remote_code: bool) -> Callable[[Any], torch.Tensor]:
    if mode == "cheap_embed":
        if EMBEDDING not in src.tensors:
            raise CheckpointError(f"{src.name}: has no tensor {EMBEDDING!r}, which gate_mode cheap_embed reads")
        embed = src.get_tensor(EMBEDDING)
        return lambda tokenized: cheap_embedding(embed, tokenized, num_layers)
    model = load_causal_lm(src.files_path, device, trust_remote_code)
    return lambda tokenized: hidden_states(model, tokenized, average=mode == "hidden_avg")


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> List[int]:
    """Layers whose router rows are nearly dependent (condition number above ``threshold``, mergekit's
    ``warn_degenerate_gates``): the prompts are too alike there, some experts will be underused."""
    return [i for i in range(gates.shape[0]) if float(torch.linalg.cond(gates[i].float())) > threshold]


def warn_degenerate(gates: torch.Tensor) -> Optional[str]:
    """A warning (issued and returned) naming the degenerate layers, or None."""
    bad = degenerate_layers(gates)
    if not bad:
        return None
    where = "every layer" if len(bad) == gates.shape[0] else "layer(s) " + ", ".join(map(str, bad))
    note = (f"the router rows of {where} are nearly dependent (condition number > 5): the prompts are too alike, "
            "one or more experts will be underused")
    warnings.warn(note, stacklevel=3)
    return note
