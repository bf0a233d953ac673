"""MoE fine-tunes saved in the per-expert layout (the default) and in the fused one
(save_original_format=False) merge together (issue 19 item 5), through transformers' own conversion."""
import pytest
import torch
import transformers

from conftest import read_state
from hf_ame import AMEConfig, AMEMerger
from hf_ame.testing import tiny_model


@pytest.mark.parametrize("arch,model_type", [("MixtralForCausalLM", "mixtral"), ("Qwen2MoeForCausalLM", "qwen2_moe")])
def test_fused_and_per_expert_layouts_merge_as_transformers_loads_them(arch, model_type, tmp_path):
    model = tiny_model(arch, model_type, seed=3)
    model.save_pretrained(tmp_path / "a")  # per-expert names, as save_pretrained writes by default
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(tmp_path / "b-fused", save_original_format=False)
    model.save_pretrained(tmp_path / "b")  # the same weights in the default layout, for reference
    assert set(read_state(tmp_path / "a")) != set(read_state(tmp_path / "b-fused"))
    merger = AMEMerger.from_pretrained([str(tmp_path / "a"), str(tmp_path / "b-fused")], device_map="cpu")
    merger.merge(AMEConfig.soup(), output_dir=tmp_path / "m", progress=False)
    ref_merger = AMEMerger.from_pretrained([str(tmp_path / "a"), str(tmp_path / "b")], device_map="cpu")
    ref_merger.merge(AMEConfig.soup(), output_dir=tmp_path / "ref", progress=False)
    got, want = read_state(tmp_path / "m"), read_state(tmp_path / "ref")
    assert set(got) == set(want) == set(read_state(tmp_path / "a"))  # the default layout
    assert all(torch.equal(got[k], want[k]) for k in want)
    # and it is the mean of the two models as transformers loads them
    cls = getattr(transformers, arch)
    a, b = cls.from_pretrained(tmp_path / "a").state_dict(), cls.from_pretrained(tmp_path / "b-fused").state_dict()
    merged, info = cls.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, (a[k] + b[k]) / 2, rtol=0, atol=1e-6)
    assert "in-memory layout" in (tmp_path / "m" / "README.md").read_text()
    # AdamW-AME streams the converted tensors one at a time too
    merger.merge(optimizer="adamw", lr=1e-3, output_dir=tmp_path / "ame", progress=False)
    assert set(read_state(tmp_path / "ame")) == set(want)


def _mixed_layouts(arch, model_type, tmp_path):
    """a (default layout) + b (in-memory layout) soup against a + b (both default): bit-equal. None
    when the family's two layouts are the same (nothing to align)."""
    try:
        model = tiny_model(arch, model_type, seed=3)
    except Exception:  # noqa: BLE001 - a family this transformers cannot build tiny
        return None
    model.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(tmp_path / "b-mem", save_original_format=False)
    model.save_pretrained(tmp_path / "b")
    if set(read_state(tmp_path / "b-mem")) == set(read_state(tmp_path / "b")):
        return None
    AMEMerger.from_pretrained([str(tmp_path / "a"), str(tmp_path / "b-mem")], device_map="cpu").merge(
        AMEConfig.soup(), output_dir=tmp_path / "m", progress=False)
    AMEMerger.from_pretrained([str(tmp_path / "a"), str(tmp_path / "b")], device_map="cpu").merge(
        AMEConfig.soup(), output_dir=tmp_path / "ref", progress=False)
    got, want = read_state(tmp_path / "m"), read_state(tmp_path / "ref")
    assert set(got) == set(want), (model_type, sorted(set(got) ^ set(want))[:4])
    assert all(torch.equal(got[k], want[k]) for k in want), model_type
    return model_type


EXTRA_LAYOUT_FAMILIES = [("Mistral3ForConditionalGeneration", "mistral3"), ("InternVLForConditionalGeneration", "internvl"),
                         ("Qwen2AudioForConditionalGeneration", "qwen2_audio"), ("AyaVisionForConditionalGeneration", "aya_vision"),
                         ("OlmoeForCausalLM", "olmoe"), ("Glm4MoeForCausalLM", "glm4_moe"), ("DeepseekV2ForCausalLM", "deepseek_v2")]


def test_mixed_layouts_across_families(tmp_path):
    """Every family of tests/test_families.py (and the multimodal and MoE families transformers'
    conversion mapping renames) whose in-memory layout differs from its default one: a fine-tune
    saved each way merges as if both were saved the default way (a name of the original layout is
    never converted twice)."""
    from test_families import FAMILIES

    done = [f for i, (arch, mt) in enumerate(FAMILIES + EXTRA_LAYOUT_FAMILIES)
            if (f := _mixed_layouts(arch, mt, tmp_path / str(i))) is not None]
    print("aligned:", done)
    assert {"mixtral", "qwen2_moe", "llava", "paligemma", "gemma3", "mistral3", "qwen2_audio"} <= set(done), done


def test_tied_keys_read_through_transformers_accessors():
    """Inkling's text config has no tie_word_embeddings attribute at all: the tied-keys check (run when
    ingredients store different tensor sets) read it directly and crashed with AttributeError instead
    of naming the missing tensor; now read as transformers reads it (absent: not tied)."""
    from hf_ame.checks import _tied_keys

    assert _tied_keys({"architectures": ["InklingForCausalLM"], "model_type": "inkling_text"}) == {}
    assert _tied_keys({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": True})
