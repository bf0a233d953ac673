"""mergekit configuration files run as they are (issue 18, first part): models / base_model /
merge_method / parameters (scalars, gradients over layers, filters) / dtype / out_dtype; an `ame:`
section composes with AME; `hf-ame convert`; what is not supported is refused by name."""
import json
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoTokenizer

from hf_ame import AMEConfig, AMEMerger, ConfigError, IncompatibleCheckpointsError, RecipeError, load_recipe, merge_checkpoints
from hf_ame import writer as writer_module
from hf_ame.cli import main
from hf_ame.methods import layer_position
from hf_ame.testing import add_tokens, make_family, save_word_tokenizer

from conftest import read_state

import mergekit.merge as mergekit_merge  # noqa: E402 - in the test extra: the reference implementation
from mergekit.config import MergeConfiguration  # noqa: E402


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("mkcfg")
    paths = make_family("llama", root, 4, seed=11, noise=0.02, hidden_size=64, intermediate_size=128, vocab_size=512,
                        num_hidden_layers=3)
    return paths[0], paths[1:]


def write(tmp_path, name, cfg):
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def mergekit(cfg, out):
    mergekit_merge.run_merge(MergeConfiguration.model_validate(cfg), str(out),
                             mergekit_merge.MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    return read_state(out)


def ours(path, out):
    return read_state(AMEMerger.from_recipe(path, device_map="cpu").merge(output_dir=out, progress=False).output_dir)


def test_linear_with_weight_gradients_by_hand(fam, tmp_path):
    """Expected tensors computed here: layer i of 3 takes t = i / 2, gradient [a, b] gives a + t (b - a);
    tensors outside the layers take t = 0 (mergekit's rule)."""
    base, fts = fam
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": str(fts[0]), "parameters": {"weight": [1.0, 3.0]}},
                      {"model": str(fts[1]), "parameters": {"weight": 1.0}}]}
    got = ours(write(tmp_path, "linear", cfg), tmp_path / "o")
    a, b = read_state(fts[0]), read_state(fts[1])
    for name in got:
        t = layer_position(name, 3)
        w0 = 1.0 + t * 2.0
        want = (w0 * a[name] + b[name]) / (w0 + 1.0)
        assert torch.allclose(got[name], want, atol=1e-6), name
    assert layer_position("model.layers.2.mlp.up_proj.weight", 3) == 1.0
    assert layer_position("model.embed_tokens.weight", 3) == 0.0


def test_filters_and_global_parameters_by_hand(fam, tmp_path):
    """task_arithmetic: model weights by filter (self_attn / mlp / the rest), lambda global."""
    base, fts = fam
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
           "parameters": {"lambda": 0.5, "weight": 0.25},
           "models": [{"model": str(base)},
                      {"model": str(fts[0]), "parameters": {"weight": [{"filter": "self_attn", "value": 1.0},
                                                                       {"filter": "mlp", "value": [0.0, 2.0]}]}},
                      {"model": str(fts[1])}]}
    got = ours(write(tmp_path, "ta", cfg), tmp_path / "o")
    b0, x0, x1 = read_state(base), read_state(fts[0]), read_state(fts[1])
    for name in got:
        t = layer_position(name, 3)
        w0 = 1.0 if "self_attn" in name else (2.0 * t if "mlp" in name else 0.25)  # no filter matches: the global
        want = b0[name] + 0.5 * (w0 * (x0[name] - b0[name]) + 0.25 * (x1[name] - b0[name]))
        assert torch.allclose(got[name], want, atol=1e-6), name


CONFIGS = {
    "ties_gradients_filters": lambda base, fts: {
        "merge_method": "ties", "base_model": base, "dtype": "float32", "parameters": {"normalize": True, "density": 0.6},
        "models": [{"model": base},
                   {"model": fts[0], "parameters": {"weight": [0.2, 0.8], "density": 0.5}},
                   {"model": fts[1], "parameters": {"weight": [{"filter": "self_attn", "value": [1.0, 0.1]},
                                                               {"filter": "mlp", "value": 0.3}, {"value": 0.7}]}},
                   {"model": fts[2], "parameters": {"weight": 0.5}}]},
    "slerp_gradient_slerp": lambda base, fts: {  # mergekit's examples/gradient-slerp.yml, on tiny models
        "merge_method": "slerp", "base_model": base, "dtype": "float32",
        "models": [{"model": base}, {"model": fts[0]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
    "dare_linear_seeded": None,  # random: see test_dare_config
    "breadcrumbs": lambda base, fts: {
        "merge_method": "breadcrumbs", "base_model": base, "dtype": "float32",
        "parameters": {"density": 0.8, "gamma": 0.02},
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(fts, (0.3, 0.3, 0.4))]},
    "model_stock": lambda base, fts: {"merge_method": "model_stock", "base_model": base, "dtype": "float32",
                                      "models": [{"model": m} for m in fts]},
    "karcher_base_listed": lambda base, fts: {  # mergekit merges the base as one more input
        "merge_method": "karcher", "base_model": base, "dtype": "float32", "parameters": {"max_iter": 5},
        "models": [{"model": base}] + [{"model": m} for m in fts]},
    "multislerp_base": lambda base, fts: {  # task vectors from the base
        "merge_method": "multislerp", "base_model": base, "dtype": "float32",
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(fts, (0.5, [0.1, 0.9], 0.2))]},
    "nuslerp_rows": lambda base, fts: {
        "merge_method": "nuslerp", "dtype": "float32", "parameters": {"nuslerp_flatten": False},
        "models": [{"model": fts[0], "parameters": {"weight": 0.4}}, {"model": fts[1], "parameters": {"weight": 0.6}}]},
    "sce": lambda base, fts: {"merge_method": "sce", "base_model": base, "dtype": "float32",
                              "parameters": {"select_topk": 0.3}, "models": [{"model": m} for m in fts]},
    "task_arithmetic_density": lambda base, fts: {  # density is accepted (and unused) as mergekit does
        "merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
        "models": [{"model": m, "parameters": {"weight": 0.3, "density": 0.5}} for m in fts]},
}


@pytest.mark.parametrize("name", [k for k, v in CONFIGS.items() if v is not None])
def test_configs_equal_mergekit(fam, tmp_path, name):
    base, fts = fam
    cfg = CONFIGS[name](str(base), [str(p) for p in fts])
    want = mergekit(cfg, tmp_path / "mk")
    got = ours(write(tmp_path, name, cfg), tmp_path / "o")
    assert set(got) == set(want)
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6


def test_out_dtype_and_ame_section(fam, tmp_path):
    base, fts = fam
    cfg = {"merge_method": "ties", "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
           "parameters": {"density": 0.5}, "models": [{"model": str(m)} for m in fts]}
    got = ours(write(tmp_path, "bf16", cfg), tmp_path / "bf16")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    cfg["ame"] = {"optimizer": "adamw", "lr": 1e-3, "epochs": 2, "batch_size": None}
    del cfg["out_dtype"]
    composed = ours(write(tmp_path, "ame", cfg), tmp_path / "ame")
    direct = merge_checkpoints(fts, tmp_path / "direct", AMEConfig(optimizer="adamw", lr=1e-3, epochs=2, batch_size=None,
                                                                   pivot=str(base), method="ties",
                                                                   method_kwargs={"density": 0.5}), progress=False)
    d = read_state(direct.output_dir)
    assert all(torch.equal(composed[k], d[k]) for k in d)


def test_unsupported_is_refused_by_name_before_reading(fam, tmp_path):
    base, fts = fam
    good = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(m)} for m in fts]}
    cases = [
        ({**good, "modules": {}}, "modules: mergekit's per-module merges"),
        ({**good, "slices": []}, "slices: give either models or slices"),
        ({**good, "tokenizer": {"tokens": {"<x>": {"source": {"kind": "mean"}}}}}, r"tokenizer.tokens.<x>.source: expected"),
        ({**good, "tokenizer": {"tokens": {"<x>": {"force": True}}}}, r"tokenizer.tokens.<x>.source: required"),
        ({**good, "tokenizer": {"source": "union"}, "tokenizer_source": "base"}, "tokenizer_source or tokenizer.source"),
        ({**good, "merge_method": "dellla"}, "merge_method: 'dellla' is not supported by hf_ame yet; supported: "),
        ({**good, "models": [{"model": str(fts[0]) + "+a+b"}]}, "expected model\\+lora"),
        ({**good, "parameters": {"density": 1.5}}, r"density: expected a number in \(0, 1\]"),
    ]
    for cfg, msg in cases:
        with pytest.raises(RecipeError, match=msg):
            load_recipe(write(tmp_path, "bad", cfg))
    # what mergekit accepts and ignores is refused in strict mode, by name
    strict = [({**good, "tokenizer": {"lowercase": True}}, r"tokenizer.lowercase: mergekit accepts and ignores"),
              ({**good, "dtyp": "float32"}, "dtyp: mergekit accepts and ignores"),
              ({**good, "parameters": {"densty": 0.5}}, r"parameters.densty: mergekit accepts and ignores")]
    for cfg, msg in strict:
        with pytest.raises(RecipeError, match=msg):
            load_recipe(write(tmp_path, "bad", cfg), strict=True)


def test_keys_mergekit_ignores_are_ignored_with_a_warning_and_listed_in_the_card(fam, tmp_path, capsys):
    """Published configs carry keys mergekit 0.1.5 accepts and ignores (a per-model weight under
    model_stock, normalize under sce, a typo, a top-level method parameter): hf_ame ignores them too,
    naming each in a warning and in the card, and writes the tensors of the config without them;
    --strict refuses them. mergekit itself is run on the config with the keys: same output."""
    base, fts = fam
    clean = {"merge_method": "sce", "base_model": str(base), "dtype": "float32", "parameters": {"select_topk": 0.5},
             "models": [{"model": str(m)} for m in fts]}
    noisy = {**clean, "dype": "bfloat16", "density": 0.5, "parameters": {"select_topk": 0.5, "normalize": True},
             "models": [{"model": str(fts[0]), "parameters": {"weight": 0.3}}] + clean["models"][1:]}
    want = ours(write(tmp_path, "clean", clean), tmp_path / "clean")
    assert all(torch.allclose(mergekit(noisy, tmp_path / "mk")[k], want[k], atol=1e-6) for k in want)
    with pytest.warns(UserWarning) as caught:
        result = AMEMerger.from_recipe(write(tmp_path, "noisy", noisy)).merge(output_dir=tmp_path / "noisy", progress=False)
    said = " ".join(str(w.message) for w in caught)
    for key in ("dype", "density", "parameters.normalize", "models[0].parameters.weight"):
        assert key in said, key
    got = read_state(result.output_dir)
    assert all(torch.equal(got[k], want[k]) for k in want)
    card = (result.output_dir / "README.md").read_text()
    assert "## Warnings" in card and "models[0].parameters.weight" in card
    assert main(["merge", str(write(tmp_path, "noisy", noisy)), "--out", str(tmp_path / "strict"), "--strict",
                 "--no-progress"]) == 2
    assert "mergekit accepts and ignores" in capsys.readouterr().err and not (tmp_path / "strict").exists()


def test_cli_runs_converts_and_the_card_shows_the_config(fam, tmp_path, capsys):
    base, fts = fam
    cfg = CONFIGS["breadcrumbs"](str(base), [str(p) for p in fts])
    path = write(tmp_path, "mergekit_config", cfg)
    assert main(["merge", str(path), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    card = (tmp_path / "a" / "README.md").read_text()
    assert "## mergekit configuration" in card and "merge_method: breadcrumbs" in card
    assert main(["convert", str(path), "--out", str(tmp_path / "recipe.yaml")]) == 0
    assert main(["merge", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    a, b = read_state(tmp_path / "a"), read_state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "mergekit_config.yml").write_text(path.read_text())
    assert load_recipe(tmp_path / "folder").merge.method == "breadcrumbs"
    assert main(["convert", str(path), "--out", str(tmp_path / "recipe.yaml")]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err


def test_passthrough_stacking_equals_mergekit(tmp_path):
    """mergekit's orcamini-platy-44layer example on tiny Llamas: layers [0, 3) of a, [1, 5) of b."""
    a = make_family("llama", tmp_path / "a", 1, seed=1, num_hidden_layers=5, tie_word_embeddings=False)[0]
    b = make_family("llama", tmp_path / "b", 1, seed=2, num_hidden_layers=5, tie_word_embeddings=False)[0]
    cfg = {"slices": [{"sources": [{"model": str(a), "layer_range": [0, 3]}]},
                      {"sources": [{"model": str(b), "layer_range": [1, 5]}]}],
           "merge_method": "passthrough", "dtype": "float32"}
    want = mergekit(cfg, tmp_path / "mk")
    path = write(tmp_path, "stack", cfg)
    plan = AMEMerger.from_recipe(path, device_map="cpu").plan(output_dir=tmp_path / "o")
    assert {t.transform for t in plan.tensors} == {"copy"} and not (tmp_path / "o").exists()
    got = ours(path, tmp_path / "o")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    sa, sb = read_state(a), read_state(b)
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], sb["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], sb["lm_head.weight"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert model.config.num_hidden_layers == 7 and len(model.model.layers) == 7


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_passthrough_scale_with_filters_equals_mergekit(tmp_path, dtype):
    """An interleaved-layer frankenmerge: the copied layers' o_proj and down_proj scaled to 0 by a
    filtered ``scale`` on the source, a slice-level scalar scale, a gradient at the top level (the
    pre/post-layer tensors take the first/last slice's setting at t = 0): every tensor equals mergekit's."""
    a = make_family("llama", tmp_path / "a", 1, seed=1, num_hidden_layers=4, tie_word_embeddings=False)[0]
    b = make_family("llama", tmp_path / "b", 1, seed=2, num_hidden_layers=4, tie_word_embeddings=False)[0]
    zero_out = [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}, {"value": 1.0}]
    cfg = {"merge_method": "passthrough", "dtype": dtype, "parameters": {"scale": [0.5, 1.5]},
           "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                      {"sources": [{"model": str(b), "layer_range": [1, 3], "parameters": {"scale": zero_out}}]},
                      {"sources": [{"model": str(a), "layer_range": [2, 4]}], "parameters": {"scale": 0.9}}]}
    want = mergekit(cfg, tmp_path / "mk")
    got = ours(write(tmp_path, "stack", cfg), tmp_path / "o")
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in want), \
        [k for k in want if not torch.equal(got[k], want[k].to(got[k].dtype))][:3]
    assert not got["model.layers.2.self_attn.o_proj.weight"].any() and got["model.layers.2.mlp.up_proj.weight"].any()
    sa = read_state(a)
    half = getattr(torch, dtype)  # the tensor as loaded in the config's dtype, then scaled (as mergekit)
    assert torch.equal(got["model.layers.5.mlp.up_proj.weight"],
                       (sa["model.layers.3.mlp.up_proj.weight"].to(half).float() * 0.9).to(half))


def test_passthrough_rebuilds_per_layer_config_lists(tmp_path):
    """Qwen2's layer_types (one entry per layer): rebuilt from the layers taken, so transformers loads
    the result (mergekit 0.1.5 writes a config transformers refuses)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True, sliding_window=16,
                      max_window_layers=2, architectures=["Qwen2ForCausalLM"])
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / f"q{i}")
        paths.append(tmp_path / f"q{i}")
    types = AutoModelForCausalLM.from_pretrained(paths[0]).config.layer_types
    assert len(types) == 4 and len(set(types)) == 2  # sliding and full layers
    mk = {"slices": [{"sources": [{"model": str(paths[0]), "layer_range": [0, 3]}]},
                     {"sources": [{"model": str(paths[1]), "layer_range": [1, 4]}]}], "merge_method": "passthrough"}
    ours(write(tmp_path, "q", mk), tmp_path / "o")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert model.config.num_hidden_layers == 6
    assert model.config.layer_types == types[0:3] + types[1:4]


def test_slices_forms(fam, tmp_path):
    base, fts = fam
    full = {"slices": [{"sources": [{"model": str(base), "layer_range": [0, 3]},
                                    {"model": str(fts[0]), "layer_range": [0, 3]}]}],
            "merge_method": "slerp", "base_model": str(base), "dtype": "float32",
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]}}
    want = mergekit(full, tmp_path / "mk")
    got = ours(write(tmp_path, "full", full), tmp_path / "o")
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    with pytest.raises(RecipeError, match="exactly one source per slice"):
        load_recipe(write(tmp_path, "pt2", {**full, "merge_method": "passthrough"}))


def test_passthrough_from_one_model_repeats_layers(tmp_path):
    a = make_family("llama", tmp_path / "a", 1, seed=3, num_hidden_layers=4)[0]
    cfg = {"slices": [{"sources": [{"model": str(a), "layer_range": [0, 3]}]},
                      {"sources": [{"model": str(a), "layer_range": [1, 4]}]}], "merge_method": "passthrough"}
    want = mergekit(cfg, tmp_path / "mk")
    got = ours(write(tmp_path, "self", cfg), tmp_path / "o")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    sa = read_state(a)
    assert torch.equal(got["model.layers.3.self_attn.q_proj.weight"], sa["model.layers.1.self_attn.q_proj.weight"])


def _save_tokenizer(folder, vocab):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    Tokenizer(WordLevel(vocab, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))


def test_tokenizer_source(fam, tmp_path):
    """tokenizer_source: base copies the base's tokenizer files when every model shares its
    vocabulary; a model whose tokenizer orders the tokens otherwise has its rows matched by token:
    the same merge as with its embedding rows swapped back."""
    import shutil

    base, fts = fam
    root = tmp_path / "m"
    paths = []
    for p in [base, *fts]:
        shutil.copytree(p, root / p.name)
        paths.append(root / p.name)
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    for p in paths:
        _save_tokenizer(p, vocab)
    (paths[0] / "tokenizer_config.json").write_text('{"model_max_length": 77}')  # the base's own file
    cfg = {"merge_method": "ties", "base_model": str(paths[0]), "tokenizer_source": "base",
           "parameters": {"density": 0.5}, "models": [{"model": str(p)} for p in paths[1:]]}
    ours(write(tmp_path, "tok", cfg), tmp_path / "o")
    assert (tmp_path / "o" / "tokenizer_config.json").read_text() == '{"model_max_length": 77}'
    assert (tmp_path / "o" / "config.json").exists()
    _save_tokenizer(paths[2], {"[UNK]": 0, "world": 1, "hello": 2})
    ours(write(tmp_path, "tok2", cfg), tmp_path / "permuted")
    state = read_state(paths[2])
    emb = [k for k in state if "embed_tokens" in k][0]
    state[emb][[1, 2]] = state[emb][[2, 1]]
    save_file(state, paths[2] / "model.safetensors", metadata={"format": "pt"})
    _save_tokenizer(paths[2], vocab)
    ours(write(tmp_path, "tok3", cfg), tmp_path / "swapped")
    a, b = read_state(tmp_path / "permuted"), read_state(tmp_path / "swapped")
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.fixture(scope="module")
def fam6(tmp_path_factory):
    root = tmp_path_factory.mktemp("mkslices")
    paths = make_family("llama", root, 4, seed=11, noise=0.02, hidden_size=64, intermediate_size=128, vocab_size=512,
                        num_hidden_layers=6)
    return [str(p) for p in paths]


SLICED = {  # mergekit's slices merged by a method: other layer ranges per source, per-slice and per-source parameters
    "ties_two_slices": lambda b, f: {
        "merge_method": "ties", "base_model": b, "dtype": "float32", "parameters": {"density": 0.6, "weight": 0.5},
        "slices": [{"sources": [{"model": b, "layer_range": [0, 3]},
                                {"model": f[0], "layer_range": [0, 3], "parameters": {"weight": [0.2, 0.9]}},
                                {"model": f[1], "layer_range": [2, 5]}]},
                   {"sources": [{"model": b, "layer_range": [3, 6]}, {"model": f[2], "layer_range": [3, 6]},
                                {"model": f[0], "layer_range": [1, 4]}], "parameters": {"density": 0.3}}]},
    "slerp_partial": lambda b, f: {
        "merge_method": "slerp", "base_model": b, "dtype": "float32",
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.3}]},
        "slices": [{"sources": [{"model": b, "layer_range": [1, 5]}, {"model": f[0], "layer_range": [0, 4]}]}]},
    "linear_three_slices": lambda b, f: {
        "merge_method": "linear", "dtype": "float32",
        "slices": [{"sources": [{"model": f[0], "layer_range": [0, 2], "parameters": {"weight": 1}},
                                {"model": f[1], "layer_range": [0, 2], "parameters": {"weight": 3}}]},
                   {"sources": [{"model": f[1], "layer_range": [2, 4], "parameters": {"weight": 1}},
                                {"model": f[2], "layer_range": [4, 6], "parameters": {"weight": 1}}]},
                   {"sources": [{"model": f[2], "layer_range": [5, 6], "parameters": {"weight": 2}},
                                {"model": f[0], "layer_range": [5, 6], "parameters": {"weight": 1}}]}]},
}


@pytest.mark.parametrize("name", sorted(SLICED))
def test_slices_merged_by_a_method_equal_mergekit(fam6, tmp_path, name, monkeypatch):
    """Each slice merges its sources' layer ranges (renumbered while streaming; a layer's t runs over its
    slice), embeddings from the first slice's sources, norm and head from the last's; equal to mergekit
    0.1.5, config included; every tensor is written once, straight into the output (the dry-run plan lists
    them all); the written recipe re-runs to the same bytes."""
    cfg = SLICED[name](fam6[0], fam6[1:])
    want = mergekit(cfg, tmp_path / "mk")
    writes = []
    real_write = writer_module.ShardedWriter.write
    monkeypatch.setattr(writer_module.ShardedWriter, "write",
                        lambda self, n, t: (writes.append((str(self.folder), n)), real_write(self, n, t))[1])
    merger = AMEMerger.from_recipe(write(tmp_path, name, cfg), device_map="cpu")
    plan = merger.plan(output_dir=tmp_path / "o")
    result = merger.merge(output_dir=tmp_path / "o", progress=False)
    got = read_state(result.output_dir)
    assert set(got) == set(want) == {t.name for t in plan.tensors}
    assert len(writes) == len(got) and len({f for f, _ in writes}) == 1 and {n for _, n in writes} == set(got)
    assert str(plan).count("slice ") >= len(cfg["slices"]) and result.report.bytes_written == plan.bytes_to_write
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    mk_cfg = json.loads((tmp_path / "mk" / "config.json").read_text())
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_hidden_layers"] == mk_cfg["num_hidden_layers"]
    again = AMEMerger.from_recipe(tmp_path / "o" / "ame_recipe.yaml", device_map="cpu").merge(
        output_dir=tmp_path / "again", progress=False)
    assert all(torch.equal(v, read_state(again.output_dir)[k]) for k, v in got.items())
    assert not list(Path(tempfile.gettempdir()).glob("hf_ame-slices-*"))


def test_slices_are_checked_before_anything_is_written(fam6, tmp_path, monkeypatch):
    b, f = fam6[0], fam6[1:]
    good = SLICED["ties_two_slices"](b, f)
    uneven = json.loads(json.dumps(good))
    uneven["slices"][1]["sources"][2]["layer_range"] = [1, 3]
    with pytest.raises(IncompatibleCheckpointsError, match=r"slices\[1\].sources\[2\].layer_range: every source"):
        AMEMerger.from_recipe(write(tmp_path, "uneven", uneven), device_map="cpu").merge(output_dir=tmp_path / "o1")
    outside = json.loads(json.dumps(good))
    outside["slices"][1]["sources"][1]["layer_range"] = [3, 7]
    outside["slices"][1]["sources"][0]["layer_range"] = [2, 6]
    outside["slices"][1]["sources"][2]["layer_range"] = [0, 4]
    with pytest.raises(IncompatibleCheckpointsError, match=r"\[3, 7\] is outside the 6 layers"):
        AMEMerger.from_recipe(write(tmp_path, "outside", outside), device_map="cpu").merge(output_dir=tmp_path / "o2")
    nobase = json.loads(json.dumps(good))
    nobase["slices"][0]["sources"] = nobase["slices"][0]["sources"][1:]
    with pytest.raises(RecipeError, match=r"slices\[0\].sources: 'ties' needs the base model among"):
        load_recipe(write(tmp_path, "nobase", nobase))
    extra = {**good, "slices": [{**good["slices"][0], "residual_weight": 0.5}]}
    with pytest.raises(RecipeError, match=r"slices\[0\].residual_weight: .*not supported by hf_ame yet"):
        load_recipe(write(tmp_path, "extra", extra))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    with monkeypatch.context() as mp:  # every process would write the whole output: refused, nothing written
        mp.setenv("WORLD_SIZE", "2")
        with pytest.raises(ConfigError, match="slices: layer stacking and slice merges run in one process"):
            AMEMerger.from_recipe(write(tmp_path, "good", good), device_map="cpu").merge(output_dir=tmp_path / "o4")
    assert not (tmp_path / "o4").exists()
    plan = AMEMerger.from_recipe(write(tmp_path, "good", good), device_map="cpu").plan(output_dir=tmp_path / "o3")
    assert "slice 1 of 2" in str(plan) and not (tmp_path / "o3").exists()


@pytest.fixture(scope="module")
def vocab6(tmp_path_factory):
    """Three 4-layer Llamas (untied head) whose tokenizers differ: ft-1 adds <tool>, </tool>; ft-2 adds <tool>."""
    root = tmp_path_factory.mktemp("mkvocab")
    paths = make_family("llama", root, 3, seed=5, noise=0.02, hidden_size=32, intermediate_size=64, vocab_size=128,
                        num_hidden_layers=4, tie_word_embeddings=False)
    for p in paths:
        save_word_tokenizer(p, 128)
    add_tokens(paths[1], ["<tool>", "</tool>"], seed=1)
    add_tokens(paths[2], ["<tool>"], seed=2)
    return [str(p) for p in paths]


@pytest.mark.parametrize("source", ["union", "base"])
def test_slices_with_a_tokenizer_source_equal_mergekit(vocab6, tmp_path, source):
    """Slices merged by a method with models whose vocabularies differ: the embedding rows (first slice)
    and the head rows (last slice) are matched by token, as mergekit 0.1.5 builds them; the tokenizer
    and vocab_size follow."""
    b, f = vocab6[0], vocab6[1:]
    cfg = {"merge_method": "linear", "base_model": b, "dtype": "float32", "tokenizer_source": source,
           "slices": [{"sources": [{"model": b, "layer_range": [0, 2], "parameters": {"weight": 1}},
                                   {"model": f[0], "layer_range": [1, 3], "parameters": {"weight": 2}},
                                   {"model": f[1], "layer_range": [0, 2], "parameters": {"weight": 1}}]},
                      {"sources": [{"model": b, "layer_range": [2, 4], "parameters": {"weight": 1}},
                                   {"model": f[1], "layer_range": [2, 4], "parameters": {"weight": 3}}]}]}
    want = mergekit(cfg, tmp_path / "mk")
    got = ours(write(tmp_path, "tok", cfg), tmp_path / "o")
    assert set(got) == set(want)
    assert got["model.embed_tokens.weight"].shape[0] == (130 if source == "union" else 128)
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    out_cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert out_cfg["vocab_size"] == got["lm_head.weight"].shape[0] and out_cfg["num_hidden_layers"] == 4
    assert len(AutoTokenizer.from_pretrained(tmp_path / "o")) == got["model.embed_tokens.weight"].shape[0]
    again = ours(tmp_path / "o" / "ame_recipe.yaml", tmp_path / "again")  # the recipe keeps the tokenizer choices
    assert set(again) == set(got) and all(torch.equal(again[k], v) for k, v in got.items())
    assert "vocabulary:" in (tmp_path / "o" / "README.md").read_text()


def test_passthrough_with_a_tokenizer_is_refused(fam, tmp_path):
    base, fts = fam
    cfg = {"merge_method": "passthrough", "tokenizer_source": "union",
           "slices": [{"sources": [{"model": str(base), "layer_range": [0, 2]}]},
                      {"sources": [{"model": str(fts[0]), "layer_range": [1, 3]}]}]}
    with pytest.raises(RecipeError, match="tokenizer_source: not supported yet with passthrough slices"):
        load_recipe(write(tmp_path, "pt", cfg))


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_models_with_a_tokenizer_union_equal_mergekit(vocab6, tmp_path, method):
    """mergekit merges a vocabulary by filling the rows a model lacks (the holders' mean, the only holder's)
    and then merging whole tensors: weighted linear and TIES (density over the whole tensor) equal to it,
    through output.missing_tokens = mergekit, which the converted recipe records."""
    b, f = vocab6[0], vocab6[1:]
    extra = {"density": 0.5} if method == "ties" else {}
    cfg = {"merge_method": method, "dtype": "float32", "tokenizer_source": "union",
           "models": [{"model": p, "parameters": {"weight": w, **extra}} for p, w in zip(f, [2, 1])]}
    cfg.update({"base_model": b} if method == "ties" else {})
    if method == "linear":
        cfg["models"].insert(0, {"model": b, "parameters": {"weight": 1}})
    want = mergekit(cfg, tmp_path / "mk")
    got = ours(write(tmp_path, "tok", cfg), tmp_path / "o")
    assert set(got) == set(want) and got["model.embed_tokens.weight"].shape[0] == 130
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    assert load_recipe(tmp_path / "o" / "ame_recipe.yaml").output["missing_tokens"] == "mergekit"


def test_tokenizer_tokens_equal_mergekit(vocab6, tmp_path):
    """mergekit's tokenizer.tokens: a token's row from one model, zero, another token's row of a model
    (forced on every model, also where all hold it); equal to mergekit 0.1.5. Bad names fail before any weight."""
    b, f = vocab6[0], vocab6[1:]
    tokens = {"<tool>": {"source": f[1]}, "</tool>": {"source": {"kind": "zero"}},
              "w5": {"source": {"kind": "model_token", "model": b, "token": "w7"}, "force": True},
              "w9": {"source": {"kind": "model_token", "model": f[0], "token_id": 3}}}
    cfg = {"merge_method": "ties", "base_model": b, "dtype": "float32", "parameters": {"density": 0.5, "weight": 1.0},
           "tokenizer": {"source": "union", "tokens": tokens}, "models": [{"model": p} for p in f]}
    want = mergekit(cfg, tmp_path / "mk")
    got = ours(write(tmp_path, "tok", cfg), tmp_path / "o")
    assert set(got) == set(want)
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    emb = got["model.embed_tokens.weight"]
    torch.testing.assert_close(emb[5], read_state(b)["model.embed_tokens.weight"][7], rtol=0, atol=1e-6)  # forced
    again = ours(tmp_path / "o" / "ame_recipe.yaml", tmp_path / "again")  # the recipe keeps the tokens
    assert all(torch.equal(again[k], v) for k, v in got.items())
    for bad, msg in ((f[0] + "x", r"tokens.<tool>.source: '.*x' is not one of the models"),):
        cfg2 = {**cfg, "tokenizer": {"source": "union", "tokens": {"<tool>": {"source": bad}}}}
        with pytest.raises(IncompatibleCheckpointsError, match=msg):
            AMEMerger.from_recipe(write(tmp_path, "bad", cfg2), device_map="cpu")
    cfg3 = {**cfg, "tokenizer": {"source": "union", "tokens": {"<nope>": {"source": f[0]}}}}
    with pytest.raises(IncompatibleCheckpointsError, match="tokens: '<nope>' is not in the output vocabulary"):
        AMEMerger.from_recipe(write(tmp_path, "bad3", cfg3), device_map="cpu")
