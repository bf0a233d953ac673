"""Many architectures, read as transformers reads them (issue 19): for each family, two tiny random
fine-tunes are soup-merged; the output must be the mean of the files, load with no missing or
unexpected keys, and keep tied embeddings tied."""
import pytest
import torch
import transformers

from conftest import read_state
from hf_ame import AMEConfig, merge_checkpoints
from hf_ame.testing import tiny_model

# (transformers class, model_type): the kind of model is in the comment of each group
FAMILIES = [
    # decoders
    ("LlamaForCausalLM", "llama"), ("MistralForCausalLM", "mistral"), ("Qwen2ForCausalLM", "qwen2"),
    ("Qwen3ForCausalLM", "qwen3"), ("GemmaForCausalLM", "gemma"), ("Gemma2ForCausalLM", "gemma2"),
    ("Gemma3ForCausalLM", "gemma3_text"), ("PhiForCausalLM", "phi"), ("Phi3ForCausalLM", "phi3"),
    ("GPT2LMHeadModel", "gpt2"), ("GPTNeoXForCausalLM", "gpt_neox"), ("GPTJForCausalLM", "gptj"),
    ("OPTForCausalLM", "opt"), ("BloomForCausalLM", "bloom"), ("FalconForCausalLM", "falcon"),
    ("OlmoForCausalLM", "olmo"), ("StableLmForCausalLM", "stablelm"),
    # mixture of experts
    ("MixtralForCausalLM", "mixtral"), ("Qwen2MoeForCausalLM", "qwen2_moe"), ("Qwen3MoeForCausalLM", "qwen3_moe"),
    ("DeepseekV3ForCausalLM", "deepseek_v3"), ("GptOssForCausalLM", "gpt_oss"),
    # state-space and hybrid
    ("MambaForCausalLM", "mamba"), ("Mamba2ForCausalLM", "mamba2"), ("JambaForCausalLM", "jamba"),
    # encoders
    ("BertForSequenceClassification", "bert"), ("RobertaForMaskedLM", "roberta"),
    ("XLMRobertaForSequenceClassification", "xlm-roberta"), ("DistilBertForSequenceClassification", "distilbert"),
    ("AlbertForMaskedLM", "albert"), ("ElectraForSequenceClassification", "electra"),
    ("DebertaV2ForSequenceClassification", "deberta-v2"), ("ModernBertForMaskedLM", "modernbert"),
    ("MobileBertForSequenceClassification", "mobilebert"),
    # encoder-decoders
    ("T5ForConditionalGeneration", "t5"), ("BartForConditionalGeneration", "bart"), ("MarianMTModel", "marian"),
    # vision
    ("ViTForImageClassification", "vit"), ("DeiTForImageClassification", "deit"),
    ("ConvNextForImageClassification", "convnext"), ("ResNetForImageClassification", "resnet"),
    # audio
    ("WhisperForConditionalGeneration", "whisper"),
    # multimodal
    ("CLIPModel", "clip"), ("SiglipModel", "siglip"), ("LlavaForConditionalGeneration", "llava"),
    ("Qwen2VLForConditionalGeneration", "qwen2_vl"), ("PaliGemmaForConditionalGeneration", "paligemma"),
    ("Gemma3ForConditionalGeneration", "gemma3"),
]


def _tied(model) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return out is not None and bool(getattr(text, "tie_word_embeddings", False))


@pytest.mark.parametrize("arch,model_type", FAMILIES, ids=[m for _, m in FAMILIES])
def test_soup_is_the_mean_of_the_files_and_loads_cleanly(arch, model_type, tmp_path):
    model = tiny_model(arch, model_type, seed=1)
    model.save_pretrained(tmp_path / "ft0")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.01)
    model.save_pretrained(tmp_path / "ft1")
    merge_checkpoints([tmp_path / "ft0", tmp_path / "ft1"], tmp_path / "soup", AMEConfig.soup(), progress=False)
    a, b, s = read_state(tmp_path / "ft0"), read_state(tmp_path / "ft1"), read_state(tmp_path / "soup")
    assert set(s) == set(a)
    for k, v in s.items():
        if v.is_floating_point():
            torch.testing.assert_close(v.float(), (a[k].float() + b[k].float()) / 2, rtol=0, atol=1e-6)
        else:
            assert torch.equal(v, a[k]), k
    cls = getattr(transformers, arch)
    _, ref_info = cls.from_pretrained(tmp_path / "ft0", output_loading_info=True)
    merged, info = cls.from_pretrained(tmp_path / "soup", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert ref_info["missing_keys"] == info["missing_keys"]
    if _tied(model):
        assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight


def test_layer_position_reads_gpt2_style_names():
    """Falcon / Bloom / GPT-2 name layers ".h.N."; a merge of them used to fail planning (int(None))."""
    from hf_ame.methods import layer_position

    assert layer_position("transformer.h.3.mlp.dense_4h_to_h.weight", 4) == 1.0
    assert layer_position("model.layers.1.mlp.up_proj.weight", 3) == 0.5
    assert layer_position("lm_head.weight", 3) == 0.0
