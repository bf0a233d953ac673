"""GGUF files of small Llamas, written with the ``gguf`` package as llama.cpp's ``convert_hf_to_gguf.py``
lays them out (tensor names, the q/k head permutation, metadata, a byte-level BPE vocabulary): for
tests and benchmarks of :mod:`hf_ame.gguf`. Not part of the merge path.

2-D weights are stored in the type asked for (``F32``, ``F16``, ``BF16``, ``Q8_0``, ``Q4_0``, ``Q4_1``,
``Q5_0``, ``Q5_1`` through gguf's own quantizers; ``Q4_K`` through :func:`quantize_q4_k`, since gguf
has no Q4_K quantizer); norms stay F32, as llama.cpp keeps them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["write_llama_gguf", "quantize_q4_k", "byte_level_vocab", "GGUF_LLAMA_CONFIG"]

# A Llama whose rows suit every block size (Q4_K: 256 per row), with float32-exact epsilon and theta,
# so the config transformers rebuilds from the GGUF equals this one field for field.
GGUF_LLAMA_CONFIG = dict(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=2.0 ** -16, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         architectures=["LlamaForCausalLM"])

_LETTERS = "etaoinsh"


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE's alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def byte_level_vocab(size: int) -> Tuple[List[str], List[str], List[int]]:
    """(tokens, merges, token types) of a byte-level BPE of ``size`` tokens: the 256 bytes, merges of
    letter pairs, and one control token ``<|endoftext|>`` last."""
    alphabet = list(_bytes_to_unicode().values())
    pairs = [(a, b) for a in _LETTERS for b in _LETTERS][: size - 257]
    if len(pairs) != size - 257:
        raise ValueError(f"size: between 257 and {257 + len(_LETTERS) ** 2}, got {size}")
    tokens = alphabet + [a + b for a, b in pairs] + ["<|endoftext|>"]
    return tokens, [f"{a} {b}" for a, b in pairs], [1] * (size - 1) + [3]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k head permutation (``LlamaModel.permute`` of convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Blocks of ggml's Q4_K for float rows (row length a multiple of 256): per 256 values a float16
    scale and min, 8 six-bit sub-block scales and mins, 4-bit codes; the inverse of gguf's
    ``Q4_K.dequantize_blocks`` up to rounding. Returns uint8 of shape (rows, row_len // 256 * 144)."""
    rows = x.shape[0]
    blocks = x.astype(np.float32).reshape(-1, 8, 32)
    lo, hi = np.minimum(blocks.min(-1), 0), blocks.max(-1)
    scale, mins = (hi - lo) / 15, -lo
    d = (scale.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = (mins.max(-1, keepdims=True) / 63).astype(np.float16)
    sc = np.clip(np.round(scale / np.where(d == 0, 1, d.astype(np.float32))), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(mins / np.where(dmin == 0, 1, dmin.astype(np.float32))), 0, 63).astype(np.uint8)
    step = (d.astype(np.float32) * sc)[..., None]
    q = np.clip(np.round((blocks + (dmin.astype(np.float32) * mn)[..., None]) / np.where(step == 0, 1, step)), 0, 15)
    q = q.astype(np.uint8).reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] & 0x30) << 2), mn[:, :4] | ((mn[:, 4:] & 0x30) << 2),
                             (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)], axis=-1)
    out = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), scales, qs], axis=-1)
    return out.reshape(rows, -1)


def _stored(w: np.ndarray, qtype: str):
    """(array, raw ggml type or None) as GGUFWriter.add_tensor takes them."""
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    if w.ndim == 1 or qtype == "F32":
        return w.astype(np.float32), None
    if qtype == "F16":
        return w.astype(np.float16), None
    if qtype == "Q4_K":
        return quantize_q4_k(w), t
    return gguf.quants.quantize(w.astype(np.float32), t), t


def _names(config) -> List[Tuple[str, str, bool]]:
    """(transformers name, GGUF name, permute as q/k) for every tensor of a Llama."""
    out = [("model.embed_tokens.weight", "token_embd.weight", False),
           ("model.norm.weight", "output_norm.weight", False)]
    if not config.tie_word_embeddings:
        out.append(("lm_head.weight", "output.weight", False))
    parts = [("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
             ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
             ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
             ("mlp.down_proj", "ffn_down")]
    for i in range(config.num_hidden_layers):
        out += [(f"model.layers.{i}.{hf}.weight", f"blk.{i}.{g}.weight", g in ("attn_q", "attn_k")) for hf, g in parts]
    return out


def _metadata(writer, config, qtype: str, tokens: Sequence[str], merges: Sequence[str], types: Sequence[int]) -> None:
    import gguf

    head_dim = config.hidden_size // config.num_attention_heads
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    ftype = {"Q4_K": "Q4_K_M", "F32": "ALL_F32"}.get(qtype, qtype)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, f"MOSTLY_{ftype}", getattr(gguf.LlamaFileType, ftype, 0))))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(list(tokens))
    writer.add_token_types(list(types))
    writer.add_token_merges(list(merges))
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)


def write_llama_gguf(model, path: Union[str, Path], qtype: str = "Q8_0") -> Path:
    """Write a transformers ``LlamaForCausalLM`` (its vocabulary size between 257 and 321) as a GGUF
    file of ``qtype`` that transformers reads back as a Llama with a byte-level BPE tokenizer."""
    import gguf

    config, state = model.config, {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    _metadata(writer, config, qtype, *byte_level_vocab(config.vocab_size))
    for hf, name, perm in _names(config):
        w = state[hf]
        if perm:
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            w = _permute(w, heads)
        data, raw = _stored(w, qtype)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_llama(seed: int = 0, noise: float = 0.0, base_seed: int = 0, **overrides):
    """A LlamaForCausalLM of :data:`GGUF_LLAMA_CONFIG`: the init of ``base_seed`` plus ``noise`` x a
    standard normal of ``seed`` on every weight (a fine-tune of it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(base_seed)
    model = LlamaForCausalLM(LlamaConfig(**{**GGUF_LLAMA_CONFIG, **overrides})).eval()
    if noise:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise)
    return model
