"""Tiny transformers checkpoints built locally from configs (no Hub): for tests, the demo and
benchmarks. Each family shares one random init and differs by seeded perturbations, the way
fine-tunes of one pretrained model differ."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

__all__ = ["tiny_config", "build_model", "make_family", "KINDS", "save_word_tokenizer", "add_tokens", "shrink_config",
           "tiny_model"]

KINDS = ("llama", "vit", "bert")


def tiny_config(kind: str, **overrides: Any):
    """A small config of a real architecture: 'llama' (causal LM, tied embeddings),
    'vit' (8x8 image classifier, 10 labels) or 'bert' (sequence classifier, 3 labels)."""
    from transformers import BertConfig, LlamaConfig, ViTConfig

    if kind == "llama":
        kw: Dict[str, Any] = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
        kw.update(overrides)
        return LlamaConfig(**kw)
    if kind == "vit":
        kw = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, num_labels=10,
                  architectures=["ViTForImageClassification"])
        kw.update(overrides)
        return ViTConfig(**kw)
    if kind == "bert":
        kw = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, num_labels=3,
                  architectures=["BertForSequenceClassification"])
        kw.update(overrides)
        return BertConfig(**kw)
    raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")


def build_model(kind: str, seed: int = 0, **overrides: Any):
    """A freshly initialised model of ``kind`` (deterministic in ``seed``)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification

    cfg = tiny_config(kind, **overrides)
    torch.manual_seed(seed)
    auto = {"llama": AutoModelForCausalLM, "vit": AutoModelForImageClassification,
            "bert": AutoModelForSequenceClassification}[kind]
    return auto.from_config(cfg).eval()


def make_family(
    kind: str,
    folder: Union[str, Path],
    n: int,
    *,
    seed: int = 0,
    noise: float = 0.02,
    dtype: Optional[torch.dtype] = None,
    max_shard_size: Union[int, str, None] = None,
    identical: bool = False,
    **overrides: Any,
) -> List[Path]:
    """Save ``n`` checkpoints ``folder/ft-{i}`` of ``kind``: one init, plus independent Gaussian
    perturbations of std ``noise`` per ingredient (none if ``identical``). Returns their paths."""
    folder = Path(folder)
    model = build_model(kind, seed, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    paths = []
    for i in range(n):
        gen = torch.Generator().manual_seed(seed * 1000 + i + 1)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(init[k])
                if p.is_floating_point() and not identical:
                    p.add_((torch.randn(p.shape, generator=gen) * noise).to(p.dtype))
        out = folder / f"ft-{i}"
        kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(out, **kw)
        paths.append(out)
    return paths


def save_word_tokenizer(folder: Union[str, Path], vocab_size: int) -> None:
    """Save a word-level fast tokenizer of ``vocab_size`` tokens ("[UNK]", "w1", "w2", ...) into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(folder))


def add_tokens(folder: Union[str, Path], tokens: List[str], *, special: bool = False, seed: int = 0) -> None:
    """Add ``tokens`` to the tokenizer of the causal LM in ``folder`` and grow its embeddings to
    match, as a chat fine-tune does (the new rows random, seeded); saved in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    old = model.get_input_embeddings().weight.shape[0]
    if special:
        tok.add_special_tokens({"additional_special_tokens": tokens})
    else:
        tok.add_tokens(tokens)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[old:] = torch.randn(emb[old:].shape, generator=gen) * 0.02
    tok.save_pretrained(str(folder))
    model.save_pretrained(str(folder))


# Size fields of transformers configs, shrunk for tests (set only where a config has the field with a
# value of the same kind: a list stays a list).
_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
             vocab_size=128, max_position_embeddings=64, d_model=32, encoder_layers=2, decoder_layers=2,
             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, d_ff=64,
             d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4, n_embd=32, n_layer=2, n_head=4, n_positions=64,
             image_size=32, patch_size=8, num_channels=3, embed_dim=16, hidden_sizes=[16, 32], depths=[1, 1],
             num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8,
             expand=2, state_size=8, conv_kernel=4, time_step_rank=4, n_routed_experts=4,
             shared_expert_intermediate_size=32, projection_dim=16, kv_lora_rank=16, q_lora_rank=16,
             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1, num_mel_bins=16,
             max_source_positions=32, max_target_positions=32, n_group=1, topk_group=1, ssm_state_size=8,
             mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, conv_dim=[16, 16], conv_stride=[2, 2],
             conv_kernel_size=[3, 3], num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, sliding_window=32,
             embedding_size=32, embedding_dim=32, num_labels=3)


def _same_kind(old: Any, new: Any) -> bool:
    return isinstance(old, list) == isinstance(new, list) and not isinstance(old, bool)


def shrink_config(cfg: Any) -> Any:
    """A transformers config made tiny in place (sizes above; token ids kept inside the vocabulary;
    sub-configs of multimodal models too). Returns it."""
    for k, v in _TINY.items():
        old = getattr(cfg, k, None)
        if old is not None and _same_kind(old, v):
            try:
                setattr(cfg, k, list(v) if isinstance(v, list) else v)
            except (AttributeError, ValueError, TypeError):
                pass
    if all(isinstance(getattr(cfg, k, None), int) for k in ("expand", "head_dim", "num_heads", "hidden_size")):
        cfg.num_heads = cfg.hidden_size * cfg.expand // cfg.head_dim  # Mamba-2: heads x head_dim = the inner size
    vocab = getattr(cfg, "vocab_size", None)
    for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id"):
        if isinstance(vocab, int) and isinstance(getattr(cfg, k, None), int) and getattr(cfg, k) >= vocab:
            setattr(cfg, k, 1)
    layers = getattr(cfg, "num_hidden_layers", None)
    try:
        kinds = list(getattr(cfg, "layer_types", None) or [])
        if kinds and isinstance(layers, int):
            cfg.layer_types = (kinds * layers)[:layers]
    except (AttributeError, ValueError, TypeError):
        pass
    for sub in ("text_config", "vision_config", "audio_config", "encoder", "decoder"):
        c = getattr(cfg, sub, None)
        if c is not None and hasattr(c, "to_dict"):
            shrink_config(c)
    return cfg


def tiny_model(architecture: str, model_type: str, seed: int = 0):
    """A tiny randomly initialised ``architecture`` (a transformers class name) of ``model_type``."""
    import transformers

    cfg = shrink_config(transformers.AutoConfig.for_model(model_type))
    cfg.architectures = [architecture]
    torch.manual_seed(seed)
    return getattr(transformers, architecture)(cfg).eval()
