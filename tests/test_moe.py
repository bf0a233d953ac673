"""Mixtures of experts from mergekit-moe configs (issue 33): every output architecture of mergekit-moe
0.1.5 against mergekit-moe itself on tiny Llama / Mistral / Qwen3 experts, the dry-run plan, the
non-expert tensors merged by a method, the card and recipe, errors before any output."""
import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers

from hf_ame import Checkpoint, build_moe, plan_moe
from hf_ame.cli import main
from hf_ame.errors import IncompatibleCheckpointsError, RecipeError
from hf_ame.moe_router import prompt_tokenizer

from conftest import read_state

from mergekit.merge import MergeOptions  # noqa: E402 - in the test extra: the reference implementation
from mergekit.moe.config import MoEMergeConfig  # noqa: E402
from mergekit.scripts.moe import build as mergekit_build  # noqa: E402

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2)


def _tokenizer():
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>",
                                                eos_token="</s>")


def _family(root: Path, arch: str, config: str, n: int = 4, seed: int = 0, **overrides):
    """``n`` fine-tunes of one init (seeded Gaussian perturbations), float32, with a word tokenizer."""
    cfg = getattr(transformers, config)(**{**SIZES, **overrides}, architectures=[arch])
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tok, paths = _tokenizer(), []
    for i in range(n):
        gen = torch.Generator().manual_seed(seed * 100 + i)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(init[k] + torch.randn(p.shape, generator=gen) * 0.05)
        model.save_pretrained(root / f"m{i}")
        tok.save_pretrained(str(root / f"m{i}"))
        paths.append(root / f"m{i}")
    return paths


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    return _family(tmp_path_factory.mktemp("llamas"), "LlamaForCausalLM", "LlamaConfig")


@pytest.fixture(scope="module")
def mistrals(tmp_path_factory):
    return _family(tmp_path_factory.mktemp("mistrals"), "MistralForCausalLM", "MistralConfig", seed=1)


def _config(paths, mode, **extra):
    experts = [{"source_model": str(p), "positive_prompts": [f"w{5 + i} w{9 + i} w3", f"w{20 + i}"]}
               for i, p in enumerate(paths[1:])]
    experts[0]["negative_prompts"] = ["w40 w41"]
    return {"base_model": str(paths[0]), "gate_mode": mode, "experts": experts, **extra}


def mergekit_moe(cfg, out, seed=0):
    opts = MergeOptions(quiet=True, random_seed=seed)
    opts.apply_global_options()  # mergekit-moe's --random-seed: seeds torch's global generator
    mergekit_build(MoEMergeConfig.model_validate(cfg), str(out), opts)
    return read_state(out)


def _as_ours(name, t):
    """mergekit's tensor keyed as :func:`_rename_ours` keys hf_ame's: its fused per-layer experts (Mixtral,
    Qwen3-MoE: ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) split per expert and projection."""
    prefix = name.rsplit("experts.", 1)[0] + "experts"
    if name.endswith("mlp.experts.gate_up_proj"):
        half = t.shape[1] // 2
        return {**{f"{prefix}@{e}.gate": t[e, :half] for e in range(t.shape[0])},
                **{f"{prefix}@{e}.up": t[e, half:] for e in range(t.shape[0])}}
    if name.endswith("mlp.experts.down_proj"):
        return {f"{prefix}@{e}.down": t[e] for e in range(t.shape[0])}
    return {name: t}


def _rename_ours(name, arch):
    """hf_ame's per-expert names in the keys :func:`_as_ours` gives fused tensors."""
    for param, short in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"),
                         ("w1", "gate"), ("w3", "up"), ("w2", "down")):
        for module in ("block_sparse_moe.experts.", "mlp.experts."):
            if module in name and name.endswith(f".{param}.weight") and arch in ("Mixtral", "Qwen3 MoE"):
                prefix, rest = name.split(module)
                return f"{prefix}mlp.experts@{rest.split('.')[0]}.{short}"
    if arch == "Mixtral":
        return name.replace("block_sparse_moe.gate.", "mlp.gate.")
    return name


def assert_equal_to_mergekit(ours_dir, theirs, arch, only=None):
    """Every tensor of mergekit's output (``only``: those whose name passes) equals hf_ame's, bit for
    bit and in dtype, and hf_ame writes no other tensor."""
    ours = {_rename_ours(k, arch): v for k, v in read_state(ours_dir).items()}
    want = {}
    for k, v in theirs.items():
        want.update(_as_ours(k, v))
    keep = [k for k in want if only is None or only(k)]
    assert set(keep) <= set(ours)
    if only is None:
        assert set(ours) == set(want), sorted(set(ours) ^ set(want))[:5]
    for k in keep:
        assert ours[k].dtype == want[k].dtype and torch.equal(ours[k], want[k]), k
    return len(keep)


def assert_same_config(ours_dir, theirs_dir):
    a, b = (json.loads((Path(d) / "config.json").read_text()) for d in (ours_dir, theirs_dir))
    a.pop("transformers_version", None), b.pop("transformers_version", None)
    assert a == b


def _loads_and_generates(folder, cls_name):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert type(model).__name__ == cls_name
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    out = model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    return model


@pytest.mark.parametrize("mode,dtype", [("cheap_embed", "float32"), ("hidden", "bfloat16")])
def test_mixtral_equals_mergekit_moe(llamas, tmp_path, mode, dtype):
    """Llama experts -> Mixtral: every tensor (attention, norms, embeddings, head, experts, routers
    from the prompts with a negative prompt) and config.json equal mergekit-moe's; both load in
    transformers as the same model, which generates."""
    cfg = _config(llamas, mode, dtype=dtype)
    theirs = mergekit_moe(cfg, tmp_path / "mk")
    result = build_moe(cfg, tmp_path / "ours", progress=False)
    assert result.plan.architecture == "Mixtral"
    assert assert_equal_to_mergekit(tmp_path / "ours", theirs, "Mixtral") == 3 + 2 * (6 + 1 + 3 * 3)
    assert_same_config(tmp_path / "ours", tmp_path / "mk")
    ours = _loads_and_generates(tmp_path / "ours", "MixtralForCausalLM")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "mk"))
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ours.state_dict().items())


def test_random_gates_experts_equal_and_router_equal_with_the_seed(llamas, tmp_path):
    """gate_mode random with residual_scale on an expert: the expert tensors equal mergekit-moe's; the
    router too, with mergekit's --random-seed equal to hf_ame's random_seed; another seed differs."""
    cfg = _config(llamas, "random", dtype="float32")
    cfg["experts"][1]["residual_scale"] = 0.5
    theirs = mergekit_moe(cfg, tmp_path / "mk", seed=7)
    build_moe(cfg, tmp_path / "ours", progress=False, random_seed=7)
    assert assert_equal_to_mergekit(tmp_path / "ours", theirs, "Mixtral") == 3 + 2 * (6 + 1 + 3 * 3)
    build_moe(cfg, tmp_path / "other", progress=False, random_seed=8)
    other = read_state(tmp_path / "other")
    assert not torch.equal(other["model.layers.0.block_sparse_moe.gate.weight"],
                           theirs["model.layers.0.mlp.gate.weight"])
    not_router = lambda k: ".gate." not in k  # noqa: E731
    assert assert_equal_to_mergekit(tmp_path / "other", theirs, "Mixtral", only=not_router) == 3 + 2 * (6 + 3 * 3)


def test_qwen2_moe_with_a_shared_expert_from_mistral_equals_mergekit(mistrals, tmp_path):
    """Mistral experts + a gated shared expert -> Qwen2-MoE (hidden_avg): experts, shared expert, both
    routers, the zero attention biases Mistral lacks and config.json equal mergekit-moe's; it loads
    and generates."""
    cfg = _config(mistrals, "hidden_avg", dtype="float32", architecture="qwen")
    cfg["shared_experts"] = [{"source_model": str(mistrals[0]), "positive_prompts": ["w3 w4"]}]
    theirs = mergekit_moe(cfg, tmp_path / "mk")
    result = build_moe(cfg, tmp_path / "ours", progress=False)
    assert result.plan.architecture == "Qwen MoE"
    n = assert_equal_to_mergekit(tmp_path / "ours", theirs, "Qwen MoE")
    assert n == 3 + 2 * (6 + 3 + 2 + 3 * 3 + 3)
    assert_same_config(tmp_path / "ours", tmp_path / "mk")
    _loads_and_generates(tmp_path / "ours", "Qwen2MoeForCausalLM")


def test_deepseek_and_qwen3_moe_equal_mergekit(llamas, tmp_path_factory, tmp_path):
    """DeepSeek MoE (cheap_embed, an ungated shared expert) from Llamas and Qwen3-MoE (uniform_random)
    from Qwen3 experts: every tensor and config.json equal mergekit-moe's; Qwen3-MoE loads and generates
    (DeepSeek MoE's modelling code is a Hub repo's: not loaded here)."""
    cfg = _config(llamas, "cheap_embed", architecture="deepseek", shared_experts=[{"source_model": str(llamas[0])}])
    theirs = mergekit_moe(cfg, tmp_path / "mk-ds")
    build_moe(cfg, tmp_path / "ours-ds", progress=False)
    assert assert_equal_to_mergekit(tmp_path / "ours-ds", theirs, "DeepSeek MoE") == 3 + 2 * (6 + 1 + 12)
    assert_same_config(tmp_path / "ours-ds", tmp_path / "mk-ds")
    qwens = _family(tmp_path_factory.mktemp("qwen3"), "Qwen3ForCausalLM", "Qwen3Config", n=3, seed=2)
    cfg = _config(qwens, "uniform_random", dtype="float32")
    theirs = mergekit_moe(cfg, tmp_path / "mk-q3", seed=3)
    result = build_moe(cfg, tmp_path / "ours-q3", progress=False, random_seed=3)
    assert result.plan.architecture == "Qwen3 MoE"
    assert assert_equal_to_mergekit(tmp_path / "ours-q3", theirs, "Qwen3 MoE") == 3 + 2 * (8 + 1 + 6)
    assert_same_config(tmp_path / "ours-q3", tmp_path / "mk-q3")
    _loads_and_generates(tmp_path / "ours-q3", "Qwen3MoeForCausalLM")


def test_router_from_each_expert_equals_mergekit_on_that_expert(llamas, tmp_path):
    """router_source experts (hf_ame's): expert k's router rows are what mergekit's get_gate_params
    computes from expert k's own model on its prompts."""
    from mergekit.common import ModelReference
    from mergekit.moe.config import Expert
    from mergekit.moe.router import get_gate_params

    cfg = _config(llamas, "hidden", dtype="float32", hf_ame={"router_source": "experts"})
    plan = plan_moe(cfg, tmp_path / "ours")
    assert plan.router_models == [str(p) for p in llamas[1:]]
    build_moe(cfg, tmp_path / "ours", progress=False)
    ours = read_state(tmp_path / "ours")
    tok = prompt_tokenizer(llamas[0])
    for k, e in enumerate(cfg["experts"]):
        want = get_gate_params(ModelReference.parse(e["source_model"]), tok, [Expert(**e)], mode="hidden", device="cpu")
        for layer in range(2):
            got = ours[f"model.layers.{layer}.block_sparse_moe.gate.weight"][k]
            assert torch.equal(got, want[layer, 0].float()), (k, layer)


def test_dry_run_plan_reads_nothing_and_its_bytes_are_what_the_build_reads(llamas, tmp_path, monkeypatch, capsys):
    """--dry-run: the MoE plan (bytes, memory, shards) from headers, no weight read, nothing written;
    every tensor is one source copied on its own; the build then reads exactly the planned bytes."""
    cfg = _config(llamas, "random", dtype="float32")
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(cfg))

    def refuse(*a, **k):
        raise AssertionError("a weight was read")

    with monkeypatch.context() as m:
        m.setattr(Checkpoint, "get_tensor", refuse)
        m.setattr(Checkpoint, "read_flat", refuse)
        assert main(["moe", str(path), "--out", str(tmp_path / "o"), "--dry-run", "--max-shard-size", "100KB"]) == 0
        plan = plan_moe(path, tmp_path / "o", max_shard_size="100KB")
    printed = capsys.readouterr().out
    assert "plan: mixture of experts (Mixtral)" in printed and "peak memory" in printed and "shard(s)" in printed
    assert not (tmp_path / "o").exists() and len(plan.shards.files) > 1
    assert all(len(t.sources) == 1 and t.transform == "copy" for t in plan.tensors)
    base, fts = read_state(llamas[0]), [read_state(p) for p in llamas[1:]]
    mlp = sum(v.numel() * 4 for k, v in base.items() if ".mlp." in k)
    assert plan.bytes_to_read == sum(v.numel() * 4 for v in base.values()) - mlp + 3 * mlp
    assert plan.copy_memory <= 2 * max(v.numel() * 4 for v in base.values()) * 2
    result = build_moe(path, tmp_path / "o", progress=False, max_shard_size="100KB")
    assert result.bytes_read == plan.bytes_to_read
    assert sorted(p.name for p in (tmp_path / "o").glob("*.safetensors")) == sorted(plan.shards.files)
    assert torch.equal(read_state(tmp_path / "o")["model.layers.1.block_sparse_moe.experts.2.w2.weight"],
                       fts[2]["model.layers.1.mlp.down_proj.weight"])


def test_non_expert_tensors_merged_from_the_experts(llamas, tmp_path):
    """hf_ame's non_expert: linear (mergekit only copies the base's): attention, norms, embeddings and
    head are the experts' mean; the expert tensors and routers are still mergekit's."""
    cfg = _config(llamas, "cheap_embed", dtype="float32")
    theirs = mergekit_moe(cfg, tmp_path / "mk")
    result = build_moe(cfg, tmp_path / "ours", progress=False, non_expert="linear")
    assert "merged from the experts' 3 distinct model(s) by linear" in result.plan.non_expert
    ours, fts = read_state(tmp_path / "ours"), [read_state(p) for p in llamas[1:]]
    outside = [k for k in fts[0] if ".mlp." not in k]
    for k in outside:
        assert torch.allclose(ours[k], sum(f[k] for f in fts) / 3, atol=1e-6), k
    assert assert_equal_to_mergekit(tmp_path / "ours", theirs, "Mixtral", only=lambda k: ".mlp." in k) == 2 * 10
    card = (tmp_path / "ours" / "README.md").read_text()
    assert "by linear" in card and "## Experts" in card
    _loads_and_generates(tmp_path / "ours", "MixtralForCausalLM")


def test_card_recipe_and_cli_rerun(llamas, tmp_path, capsys):
    """The card lists the experts, prompts and gate mode; moe_recipe.yaml re-runs through the CLI to
    the same bytes (noise_scale included: seeded per expert and tensor)."""
    cfg = _config(llamas, "cheap_embed")
    cfg["experts"][2]["noise_scale"] = 0.01
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["moe", str(path), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert "built a Mixtral mixture of 3 experts" in capsys.readouterr().out
    card = (tmp_path / "a" / "README.md").read_text()
    assert "gate_mode: cheap_embed" in card and "w40 w41" in card and str(llamas[3]) in card
    recipe = yaml.safe_load((tmp_path / "a" / "moe_recipe.yaml").read_text())
    assert recipe["gate_mode"] == "cheap_embed" and recipe["experts"][0]["positive_prompts"] == ["w5 w9 w3", "w20"]
    assert recipe["hf_ame"]["random_seed"] == 0 and recipe["hf_ame"]["provenance"]["architecture"] == "Mixtral"
    assert (tmp_path / "a" / "mergekit_moe_config.yml").read_text() == path.read_text()
    assert main(["moe", str(tmp_path / "a" / "moe_recipe.yaml"), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    a, b = read_state(tmp_path / "a"), read_state(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    noisy = a["model.layers.0.block_sparse_moe.experts.2.w1.weight"]
    source = read_state(llamas[3])["model.layers.0.mlp.gate_proj.weight"]
    assert 0.005 < float((noisy - source).std()) < 0.02


def test_errors_name_the_field_or_tensor_before_any_output(llamas, tmp_path_factory, tmp_path):
    """Refused before anything is written (no output folder, no staging leftovers), naming what is wrong."""
    wide = _family(tmp_path_factory.mktemp("wide"), "LlamaForCausalLM", "LlamaConfig", n=1, intermediate_size=96)[0]
    cases = [
        (_config(llamas[:2] + [wide], "random"), IncompatibleCheckpointsError,
         "experts\\[1\\] .* tensor 'model.layers.0.mlp.gate_proj.weight' has shape \\[96, 64\\]"),
        ({**_config(llamas, "hidden"), "experts": [{"source_model": str(llamas[1])}] * 2}, RecipeError,
         "experts\\[0\\].positive_prompts"),
        (_config(llamas, "hidden", architecture="qwen"), RecipeError, "exactly one shared expert"),
        (_config(llamas, "sometimes"), RecipeError, "gate_mode: expected one of"),
        (_config(llamas, "random", hf_ame={"non_expert": {"merge_method": "nope"}}), RecipeError,
         "hf_ame.non_expert.merge_method"),
    ]
    for cfg, error, match in cases:
        with pytest.raises(error, match=match):
            build_moe(cfg, tmp_path / "out", progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == []
