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


def _moe_family(arch, model_type, root, stored="float32"):
    """A tiny MoE base and 3 fine-tunes, task vectors 1% of each tensor's mean |w| (saved the default
    way: one tensor per expert in the files)."""
    model = tiny_model(arch, model_type, seed=3)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(4):
        with torch.no_grad():
            for k, p in model.state_dict().items():
                d = torch.zeros_like(p) if i == 0 else torch.randn(p.shape, generator=gen)
                p.copy_(base[k] + d * 0.01 * base[k].abs().mean())
        paths.append(root / ("base" if i == 0 else f"ft{i}"))
        model.to(getattr(torch, stored)).save_pretrained(paths[-1])
        model.float()
    return paths


MOE_METHODS = {"ties": {"weight": 1.0, "density": 0.5}, "breadcrumbs_ties": {"weight": 1.0, "density": 0.7, "gamma": 0.05},
               "model_stock": {}, "sce": {"weight": 1.0, "select_topk": 0.5}}


@pytest.mark.parametrize("arch,model_type", [("MixtralForCausalLM", "mixtral"), ("Qwen2MoeForCausalLM", "qwen2_moe")])
def test_mergekit_configs_trim_moe_experts_as_mergekit(arch, model_type, tmp_path):
    """Issue 27: under transformers 5 mergekit merges each layer's experts as one fused tensor (the
    in-memory layout) and trims over it; a mergekit config here reads its ingredients in that layout
    too and writes what mergekit writes. hf_ame's own API trims each stored expert on its own (the
    default layout="original") unless asked for layout="in_memory"."""
    import mergekit.merge as mergekit_merge
    import yaml
    from mergekit.config import MergeConfiguration

    from test_conformance import compare, rounded

    base, *fts = _moe_family(arch, model_type, tmp_path)
    cls = getattr(transformers, arch)
    base_state = cls.from_pretrained(base).state_dict()  # in-memory names: the fused layout
    for method, params in MOE_METHODS.items():
        for dtype in ("float32", "bfloat16"):
            cfg = {"merge_method": method, "dtype": dtype, "base_model": str(base),
                   "models": [{"model": str(p), **({"parameters": params} if method != "sce" else {})} for p in fts]}
            if method == "sce":
                cfg["parameters"] = params
            mk, ours = tmp_path / f"mk-{method}-{dtype}", tmp_path / f"ours-{method}-{dtype}"
            mergekit_merge.run_merge(MergeConfiguration.model_validate(cfg), str(mk), mergekit_merge.MergeOptions(
                quiet=True, copy_tokenizer=False, write_model_card=False))
            (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
            AMEMerger.from_recipe(tmp_path / "c.yml", device_map="cpu").merge(output_dir=ours, progress=False)
            want, got = read_state(mk), read_state(ours)
            assert set(got) == set(want), (method, sorted(set(got) ^ set(want))[:4])  # the fused names, as mergekit's
            assert any(k.endswith("experts.gate_up_proj") for k in want), sorted(want)[:8]
            if dtype == "float32":
                exact = want
                for k in want:
                    torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=f"{method} {k}")
            else:  # within mergekit's own rounding, as tests/test_conformance.py measures it
                ours_d, mk_d = compare(got, exact, base_state), compare(rounded(want, dtype), exact, base_state)
                assert ours_d["rel"] <= 1.05 * mk_d["rel"] + 0.01, (method, ours_d, mk_d)
    # hf_ame's own API: each stored expert trimmed on its own, written in the files' layout ...
    own = tmp_path / "own"
    merger = AMEMerger.from_pretrained([str(p) for p in fts], base_model=str(base), device_map="cpu")
    merger.merge(method="ties", density=0.5, output_dir=own, progress=False)
    assert set(read_state(own)) == set(read_state(base))
    per_expert = cls.from_pretrained(own).state_dict()
    fused_mk = cls.from_pretrained(tmp_path / "mk-ties-float32").state_dict()
    k = next(k for k in fused_mk if k.endswith("experts.gate_up_proj"))
    assert not torch.allclose(per_expert[k], fused_mk[k], rtol=0, atol=1e-6)  # the granularity matters
    # ... and mergekit's granularity when asked for
    merger = AMEMerger.from_pretrained([str(p) for p in fts], base_model=str(base), device_map="cpu", layout="in_memory")
    merger.merge(method="ties", density=0.5, output_dir=tmp_path / "asked", progress=False)
    asked, want = read_state(tmp_path / "asked"), read_state(tmp_path / "mk-ties-float32")
    assert set(asked) == set(want) and all(torch.allclose(asked[k], want[k], rtol=0, atol=1e-6) for k in want)
    previewed = merger.plan(method="ties", density=0.5, output_dir=tmp_path / "p")  # the preview opens them as the run
    assert {t.name for t in previewed.mine()} == set(asked)
    assert previewed.bytes_to_write == sum(v.numel() * v.element_size() for v in asked.values())
    from hf_ame.cli import main  # the same choice from the command line

    assert main(["merge", *map(str, fts), "--base-model", str(base), "--method", "ties", "--param", "density=0.5",
                 "--layout", "in_memory", "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    cli = read_state(tmp_path / "cli")
    assert set(cli) == set(asked) and all(torch.equal(cli[k], asked[k]) for k in asked)
