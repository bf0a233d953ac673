"""LoRA adapters as ingredients: expanded tensor by tensor, equal to peft's merge_and_unload()."""
import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from conftest import read_state  # noqa: E402
from hf_ame import AMEConfig, AMEMerger, merge_checkpoints  # noqa: E402
from hf_ame.adapters import AdapterCheckpoint  # noqa: E402
from hf_ame.checkpoints import Checkpoint, CheckpointError  # noqa: E402
from hf_ame.testing import make_family  # noqa: E402


def make_adapter(base, out, seed=0, **lora):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base)
    cfg = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["query", "value", "word_embeddings"],
                             "modules_to_save": ["classifier"], **lora})
    pm = peft.get_peft_model(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)  # lora_B starts at 0: make the adapter do something
    pm.save_pretrained(out)
    merged = pm.merge_and_unload().state_dict()
    return Path(out), merged


@pytest.fixture
def bert(tmp_path):
    return [str(p) for p in make_family("bert", tmp_path / "fam", 3, seed=3)]


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True, "rank_pattern": {"value": 2}, "alpha_pattern": {"query": 16}}],
                         ids=["plain", "rslora-patterns"])
def test_adapter_reads_as_peft_merge_and_unload(bert, tmp_path, lora):
    adapter, expected = make_adapter(bert[0], tmp_path / "ad", **lora)
    ck = Checkpoint(adapter)
    assert isinstance(ck, AdapterCheckpoint) and ck.config == Checkpoint(bert[0]).config
    assert set(ck.tensors) == set(Checkpoint(bert[0]).tensors)
    changed = 0
    for name in ck.tensors:
        got = ck.get_tensor(name)
        torch.testing.assert_close(got, expected[name], atol=1e-6, rtol=1e-6)
        changed += not torch.equal(got, Checkpoint(bert[0]).get_tensor(name))
    assert changed == 2 * 2 + 1 + 2  # q and v of 2 layers, the embedding, the classifier's weight and bias


def test_adapters_and_full_fine_tunes_mix(bert, tmp_path):
    adapter, expanded = make_adapter(bert[0], tmp_path / "ad")
    ings = [str(adapter), bert[1], bert[2]]
    result = AMEMerger.from_pretrained(ings, device_map="cpu").merge(AMEConfig.soup(), output_dir=tmp_path / "o",
                                                                    progress=False)
    states = [expanded, read_state(bert[1]), read_state(bert[2])]
    got = read_state(tmp_path / "o")
    for k, v in got.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, torch.stack([s[k] for s in states]).mean(0), atol=1e-6, rtol=1e-5)
    assert (tmp_path / "o/config.json").exists()  # config and tokenizer files come from the base
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "o")
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    assert result.report.bytes_read > 0
    # AME steps through the adapter ingredient as through any other
    merge_checkpoints(ings, tmp_path / "ame", AMEConfig(optimizer="adamw", lr=1e-2, epochs=2), progress=False)


@pytest.mark.parametrize("field,value,match", [
    ("use_dora", True, r"adapter_config\.use_dora = True is not supported"),
    ("peft_type", "IA3", r"peft adapter type 'IA3' is not supported \(LoRA only\)"),
    ("base_model_name_or_path", "nobody/nothing-here", r"base model 'nobody/nothing-here' is neither a folder nor in"),
])
def test_unsupported_adapters_are_refused_by_name(bert, tmp_path, field, value, match):
    adapter, _ = make_adapter(bert[0], tmp_path / "ad")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg[field] = value
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        merge_checkpoints([str(adapter), bert[1]], tmp_path / "o", AMEConfig.soup(), progress=False)
    assert not (tmp_path / "o").exists()


def test_adapter_for_another_model_is_refused(bert, tmp_path):
    adapter, _ = make_adapter(bert[0], tmp_path / "ad")
    other = make_family("bert", tmp_path / "wide", 1, seed=3, hidden_size=48, num_attention_heads=4)[0]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(other)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"adapter tensor '.*' gives shape .* but '.*' of the base has"):
        Checkpoint(adapter)


def test_base_model_overrides_the_adapters_base_and_hub_adapter_repos(bert, tmp_path, online):
    """from_pretrained(base_model=...) is every adapter's base (its own base_model_name_or_path may
    name a folder that is not there); an adapter repo on the Hub is an ingredient too."""
    import json

    adapter, expanded = make_adapter(bert[0], tmp_path / "ad")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "not-here")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="not-here"):
        AMEMerger.from_pretrained([str(adapter), bert[1]], device_map="cpu")
    merger = AMEMerger.from_pretrained([str(adapter), bert[1]], base_model=bert[0], device_map="cpu")
    merger.merge(AMEConfig.soup(), output_dir=tmp_path / "o", progress=False)
    got, other = read_state(tmp_path / "o"), read_state(bert[1])
    for k, v in got.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (expanded[k] + other[k]) / 2, atol=1e-6, rtol=1e-5)
    hub = online
    hub.state.add_folder("org/adapter", adapter)
    AMEMerger.from_pretrained(["org/adapter", bert[1]], base_model=bert[0], cache_dir=tmp_path / "cache",
                              endpoint=hub.endpoint, device_map="cpu").merge(AMEConfig.soup(), output_dir=tmp_path / "h",
                                                                             progress=False)
    hub_state = read_state(tmp_path / "h")
    assert all(torch.equal(hub_state[k], got[k]) for k in got)


def test_mergekit_model_plus_lora_reference(bert, tmp_path):
    """mergekit's "model+lora": the adapter read over that model (whatever its config names), as in
    a recipe entry {id: adapter, base: model}; the recipe written keeps the pair."""
    import json

    import yaml

    from hf_ame.cli import main

    adapter, expanded = make_adapter(bert[0], tmp_path / "ad")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/never-downloaded"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    mk = tmp_path / "mk.yml"
    mk.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": f"{bert[0]}+{adapter}", "parameters": {"weight": 1.0}},
        {"model": bert[1], "parameters": {"weight": 1.0}}]}))
    assert main(["merge", str(mk), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    got, other = read_state(tmp_path / "o"), read_state(bert[1])
    for k, v in got.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (expanded[k] + other[k]) / 2, atol=1e-6, rtol=1e-5)
    recipe = yaml.safe_load((tmp_path / "o" / "ame_recipe.yaml").read_text())
    assert recipe["models"][0]["base"] == bert[0]


@pytest.mark.parametrize("method", ["passthrough", "linear", "ties"])
def test_model_plus_lora_in_slices_and_as_base_equals_mergekit(tmp_path, method):
    """mergekit's "model+lora" as a slice source, and as the base_model of slices merged by a method:
    the adapter's tensors are read under the slice's layer names; every tensor equals mergekit 0.1.5's."""
    import mergekit.merge as mergekit_merge
    import yaml
    from mergekit.config import MergeConfiguration
    from transformers import AutoModelForCausalLM

    a, b = [str(p) for p in make_family("llama", tmp_path / "fam", 2, seed=3, num_hidden_layers=4)]
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(a),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(tmp_path / "ad")
    lora = f"{a}+{tmp_path / 'ad'}"
    if method == "passthrough":
        cfg = {"slices": [{"sources": [{"model": lora, "layer_range": [0, 3]}]},
                          {"sources": [{"model": b, "layer_range": [1, 4]}]}]}
    else:
        cfg = {"slices": [{"sources": [{"model": lora, "layer_range": [0, 4]}, {"model": b, "layer_range": [0, 4]}]}],
               "parameters": {"weight": 0.5, **({"density": 0.6} if method == "ties" else {})},
               **({"base_model": lora} if method == "ties" else {})}
    cfg.update(merge_method=method, dtype="float32")
    mergekit_merge.run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
                             mergekit_merge.MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False,
                                                         lora_merge_cache=str(tmp_path / "mk-cache")))
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    got = read_state(AMEMerger.from_recipe(path).merge(output_dir=tmp_path / "o", progress=False).output_dir)
    want = read_state(tmp_path / "mk")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)
    plain = read_state(a)  # the adapter really acted: layer 0's q_proj is not the plain base's
    assert not torch.allclose(got["model.layers.0.self_attn.q_proj.weight"], plain["model.layers.0.self_attn.q_proj.weight"])
