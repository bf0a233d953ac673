"""LoRA adapters out (hf_ame.lora_out): adapters merged into one adapter equal peft's own
add_weighted_adapter (cat exactly, svd within its tolerance), an extracted rank-r LoRA is the
optimal rank-r approximation of each module's delta (Eckart-Young), and every adapter folder loads
with PeftModel.from_pretrained over the base and generates."""
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from hf_ame import AMEConfig, AMEMerger
from hf_ame.cli import main
from hf_ame.errors import ConfigError, IncompatibleCheckpointsError
from hf_ame.testing import build_model

SMALL = dict(hidden_size=64, intermediate_size=128)


def _base(tmp_path):
    build_model("llama", seed=0, **SMALL).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _adapter(base, out, seed, r, targets, **lora):
    from transformers import AutoModelForCausalLM

    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                             peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), **lora))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)  # lora_B starts at 0: make the adapter do something
    pm.save_pretrained(out)
    return out


@pytest.fixture
def adapters(tmp_path):
    """Two adapters of one base: different ranks and modules, one with rsLoRA and a rank_pattern."""
    base = _base(tmp_path)
    a = _adapter(base, tmp_path / "a", 1, 4, ("q_proj", "v_proj", "down_proj"), rank_pattern={"down_proj": 2})
    b = _adapter(base, tmp_path / "b", 2, 3, ("q_proj", "o_proj", "up_proj"), use_rslora=True)
    return base, a, b


def _applied(base, adapter):
    """The base with the adapter merged in, as peft computes it."""
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return model.merge_and_unload().state_dict()


def _peft_weighted(base, a, b, weights, kind, **kw):
    """peft's own add_weighted_adapter(combination_type=kind) applied to the base."""
    from transformers import AutoModelForCausalLM

    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), a, adapter_name="a")
    pm.load_adapter(b, adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], weights, "merged", combination_type=kind, **kw)
    pm.set_adapter("merged")
    return pm.merge_and_unload().state_dict()


def _generates(base, adapter):
    from transformers import AutoModelForCausalLM

    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    out = pm.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def _max_diff(x, y):
    return max((x[k] - y[k]).abs().max().item() for k in y)


@pytest.mark.parametrize("how", ["soup", "task_arithmetic"])
def test_adapters_concatenated_equal_peft_cat(adapters, tmp_path, how):
    """merge(output="lora") of adapters merged linearly = peft's add_weighted_adapter(cat) with the
    same task-vector weights, both applied to the base (within 1e-6); the rank is the summed ranks."""
    base, a, b = adapters
    if how == "soup":
        merger, kw, weights = AMEMerger.from_pretrained([str(a), str(b)], device_map="cpu"), {}, [0.5, 0.5]
        kw["config"] = AMEConfig.soup()
    else:
        merger = AMEMerger.from_pretrained([str(a), str(b)], base_model=str(base), device_map="cpu")
        kw, weights = dict(method="task_arithmetic", weight=[0.7, -0.3], lambda_=1.5), [1.05, -0.45]
    result = merger.merge(output_dir=tmp_path / "out", output="lora", progress=False, **kw)
    assert result.lora.how == "cat" and result.lora.ranks["model.layers.0.self_attn.q_proj"] == 4 + 3
    assert _max_diff(_applied(base, tmp_path / "out"), _peft_weighted(base, a, b, weights, "cat")) < 1e-6
    card, recipe = (tmp_path / "out" / "README.md").read_text(), (tmp_path / "out" / "ame_recipe.yaml").read_text()
    assert "peft LoRA adapter" in card and "format: lora" in recipe
    _generates(base, tmp_path / "out")


def test_adapters_svd_equal_peft_svd_variants(adapters, tmp_path):
    """With a rank below the summed ranks: the soup / task arithmetic of the adapters equal peft's
    svd, and TIES (hf_ame's one-shot method, through the merge and the extraction) peft's ties_svd,
    within 1e-5 once applied to the base."""
    base, a, b = adapters
    soup = AMEMerger.from_pretrained([str(a), str(b)], device_map="cpu").merge(
        AMEConfig.soup(), output_dir=tmp_path / "svd", output="lora", rank=3, progress=False)
    assert soup.lora.how in ("svd", "cat+svd") and max(soup.lora.ranks.values()) == 3
    ref = _peft_weighted(base, a, b, [0.5, 0.5], "svd", svd_rank=3)
    assert _max_diff(_applied(base, tmp_path / "svd"), ref) < 1e-5
    merger = AMEMerger.from_pretrained([str(a), str(b)], base_model=str(base), device_map="cpu")
    ties = merger.merge(method="ties", density=0.5, output_dir=tmp_path / "ties", output="lora", rank=3, progress=False)
    assert ties.lora.how == "extract"
    ref = _peft_weighted(base, a, b, [1.0, 1.0], "ties_svd", svd_rank=3, density=0.5)
    assert _max_diff(_applied(base, tmp_path / "ties"), ref) < 1e-5
    _generates(base, tmp_path / "ties")


def _fine_tune(base, out, seed, keep=()):
    """The base plus a rank-2 change and noise on every tensor except those named in ``keep``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not any(k in n for k in keep):
                low = torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[-1], generator=g) \
                    if p.dim() == 2 else 0
                p.add_(low * 0.02 + torch.randn(p.shape, generator=g) * 0.002)
    model.save_pretrained(out)
    return out


def test_extracted_lora_is_the_optimal_rank_r_approximation(tmp_path, capsys):
    """hf-ame extract-lora: each linear module's delta becomes B A with ||delta - B A|| equal to the
    optimal rank-r error sqrt(sum_{i>r} s_i^2) (Eckart-Young); embeddings and changed norms are saved
    whole (mergekit-extract-lora's default), the tied lm_head with the embedding; modules equal to the
    base are left out; at full rank the adapter over the base IS the fine-tune."""
    from transformers import AutoModelForCausalLM

    base = _base(tmp_path)
    ft = _fine_tune(base, tmp_path / "ft", 3, keep=("layers.1.mlp", "layers.1.post_attention"))
    assert main(["extract-lora", str(ft), "--base", str(base), "--rank", "4", "--out", str(tmp_path / "r4"),
                 "--no-progress"]) == 0
    assert "optimal rank-4 error" in capsys.readouterr().out
    got = load_file(tmp_path / "r4" / "adapter_model.safetensors")
    cfg = json.loads((tmp_path / "r4" / "adapter_config.json").read_text())
    want = AutoModelForCausalLM.from_pretrained(ft).state_dict()
    old = AutoModelForCausalLM.from_pretrained(base).state_dict()
    linear = [m for m in cfg["target_modules"]]
    assert len(linear) == 2 * 7 - 3 and "model.layers.1.mlp.up_proj" not in linear  # layer 1's MLP: unchanged
    assert cfg["r"] == cfg["lora_alpha"] == 4
    for m in linear:
        delta = want[f"{m}.weight"] - old[f"{m}.weight"]
        approx = got[f"base_model.model.{m}.lora_B.weight"] @ got[f"base_model.model.{m}.lora_A.weight"]
        s = torch.linalg.svdvals(delta.double())
        optimal = s[4:].square().sum().sqrt().item()
        assert abs(torch.linalg.matrix_norm(delta - approx).item() - optimal) <= 1e-5 * s[0].item(), m
    assert set(cfg["modules_to_save"]) == {"model.embed_tokens", "lm_head", "model.norm",
                                           "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                                           "model.layers.1.input_layernorm"}
    assert torch.equal(got["base_model.model.lm_head.weight"], want["model.embed_tokens.weight"])
    _generates(base, tmp_path / "r4")
    main(["extract-lora", str(ft), "--base", str(base), "--rank", "64", "--out", str(tmp_path / "full"),
          "--no-progress"])
    assert _max_diff(_applied(base, tmp_path / "full"), want) < 1e-5


def test_merge_of_full_models_to_lora_and_recipe_rerun(tmp_path):
    """An AdamW-AME merge of two full fine-tunes written as a LoRA (the merged task vector factored):
    at full rank it applies to the base as the model merge itself; its recipe re-runs to the same bytes."""
    from transformers import AutoModelForCausalLM

    base = _base(tmp_path)
    fts = [str(_fine_tune(base, tmp_path / f"ft{i}", i)) for i in (1, 2)]
    cfg = AMEConfig(optimizer="adamw", lr=1e-3, epochs=2)
    merger = AMEMerger.from_pretrained(fts, base_model=str(base), device_map="cpu")
    result = merger.merge(cfg, output_dir=tmp_path / "lora", output="lora", rank=64, progress=False)
    merger.merge(cfg, output_dir=tmp_path / "model", progress=False)
    assert result.lora.how == "extract" and result.lora.output_dir == tmp_path / "lora"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    assert _max_diff(_applied(base, tmp_path / "lora"), model) < 1e-5
    again = AMEMerger.from_recipe(tmp_path / "lora" / "ame_recipe.yaml", device_map="cpu").merge(
        output_dir=tmp_path / "again", progress=False)
    assert again.lora is not None
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "lora" / "adapter_model.safetensors").read_bytes()


def test_refused_by_name_before_anything_is_written(adapters, tmp_path):
    """A bad rank, a bad output, full models without a base, a base of another shape: refused,
    naming the field / tensor, and no output folder appears."""
    base, a, b = adapters
    merger = AMEMerger.from_pretrained([str(a), str(b)], device_map="cpu")
    with pytest.raises(ConfigError, match="rank: expected a LoRA rank"):
        merger.merge(AMEConfig.soup(), output_dir=tmp_path / "x", output="lora", rank=0)
    with pytest.raises(ConfigError, match="output: expected 'model' or 'lora'"):
        merger.merge(AMEConfig.soup(), output_dir=tmp_path / "x", output="gguf")
    with pytest.raises(ConfigError, match="give rank="):
        merger.merge(AMEConfig(optimizer="adam"), output_dir=tmp_path / "x", output="lora")
    fts = [str(_fine_tune(base, tmp_path / f"ft{i}", i)) for i in (1, 2)]
    with pytest.raises(ConfigError, match="give base_model="):
        AMEMerger.from_pretrained(fts, device_map="cpu").merge(AMEConfig.soup(), output_dir=tmp_path / "x",
                                                               output="lora", rank=2)
    build_model("llama", seed=0, hidden_size=32, intermediate_size=128).save_pretrained(tmp_path / "other")
    with pytest.raises(IncompatibleCheckpointsError, match="tensor 'model.embed_tokens.weight' has shape"):
        main(["--debug", "extract-lora", fts[0], "--base", str(tmp_path / "other"), "--rank", "2", "--out",
              str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
