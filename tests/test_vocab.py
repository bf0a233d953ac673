"""Vocabularies that differ (issue 12, item 2): tokenizer_source matches embedding rows by token."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import read_state
from hf_ame import AMEConfig, AMEMerger, ConfigError, IncompatibleCheckpointsError, NonFiniteWeightsError, ame_merge, load_recipe
from hf_ame.checkpoints import Checkpoint
from hf_ame.cli import main
from hf_ame.testing import add_tokens, make_family, save_word_tokenizer

EMB = "model.embed_tokens.weight"


def _family(root: Path, tie: bool = True):
    """ft-0: 128 tokens; ft-1: + <tool>, </tool>; ft-2: + <tool>, then the special <|im_end|>."""
    paths = make_family("llama", root, 3, seed=3, tie_word_embeddings=tie)
    for p in paths:
        save_word_tokenizer(p, 128)
    add_tokens(paths[1], ["<tool>", "</tool>"], seed=1)
    add_tokens(paths[2], ["<tool>"], seed=2)
    add_tokens(paths[2], ["<|im_end|>"], special=True, seed=3)
    return [str(p) for p in paths]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return _family(tmp_path_factory.mktemp("vocab"))


def _rows(paths, name=EMB):
    return [read_state(p)[name] for p in paths]


def test_differing_vocabularies_are_refused_naming_tokenizer_source(fam):
    with pytest.raises(IncompatibleCheckpointsError, match=r"model.embed_tokens.weight.*\(130, 32\).*tokenizer_source"):
        AMEMerger.from_pretrained(fam)


def test_union_soup_merges_each_row_over_the_models_that_have_its_token(fam, tmp_path):
    x = _rows(fam)
    res = AMEMerger.from_pretrained(fam, tokenizer_source="union").merge(AMEConfig.soup(), output_dir=tmp_path / "u",
                                                                          progress=False)
    e = read_state(tmp_path / "u")[EMB]
    assert e.shape == (131, 32)
    torch.testing.assert_close(e[:128], (x[0][:128] + x[1][:128] + x[2][:128]) / 3, rtol=0, atol=1e-7)
    torch.testing.assert_close(e[128], (x[1][128] + x[2][128]) / 2, rtol=0, atol=1e-7)  # <tool>: in ft-1 and ft-2
    assert torch.equal(e[129], x[1][129])  # </tool>: ft-1 only
    assert torch.equal(e[130], x[2][129])  # <|im_end|>: ft-2 only, its row 129 there
    tok = AutoTokenizer.from_pretrained(tmp_path / "u")
    assert tok.convert_ids_to_tokens([128, 129, 130]) == ["<tool>", "</tool>", "<|im_end|>"]
    assert "<|im_end|>" in tok.all_special_tokens
    assert json.loads((tmp_path / "u" / "config.json").read_text())["vocab_size"] == 131
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "u")
    ids = tok("w3 <tool> w5 <|im_end|>", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[3, 128, 5, 130]]
    assert model(ids).logits.shape == (1, 4, 131)
    card = (tmp_path / "u" / "README.md").read_text()
    assert "the union of 3 tokenizers (131 tokens, 3 added" in card
    recipe = yaml.safe_load((tmp_path / "u" / "ame_recipe.yaml").read_text())
    assert recipe["output"]["tokenizer_source"] == "union"
    assert res.report.merged_tensors == len(read_state(tmp_path / "u"))


def test_a_chosen_ingredients_vocabulary(fam, tmp_path):
    x = _rows(fam)
    AMEMerger.from_pretrained(fam, tokenizer_source=fam[2]).merge(AMEConfig.soup(), output_dir=tmp_path / "c", progress=False)
    e = read_state(tmp_path / "c")[EMB]
    assert e.shape == (130, 32)
    torch.testing.assert_close(e[128], (x[1][128] + x[2][128]) / 2, rtol=0, atol=1e-7)
    assert torch.equal(e[129], x[2][129])
    assert (tmp_path / "c" / "tokenizer.json").read_bytes() == (Path(fam[2]) / "tokenizer.json").read_bytes()
    # "first": the first vocabulary; the others' added tokens are left out, and the card says so
    AMEMerger.from_pretrained(fam, tokenizer_source="first").merge(AMEConfig.soup(), output_dir=tmp_path / "f", progress=False)
    e = read_state(tmp_path / "f")[EMB]
    assert e.shape == (128, 32)
    torch.testing.assert_close(e, (x[0] + x[1][:128] + x[2][:128]) / 3, rtol=0, atol=1e-7)
    assert "2 token(s) of" in (tmp_path / "f" / "README.md").read_text()


def test_ame_rows_only_from_the_models_that_have_them(fam, tmp_path):
    """AdamW: rows all three hold merge as the AME of the three; a row two hold, as the AME of those two."""
    x = _rows(fam)
    cfg = AMEConfig(optimizer="adamw", lr=1e-2, epochs=3, batch_size=1, shuffle=True, seed=5)
    AMEMerger.from_pretrained(fam, tokenizer_source="union").merge(cfg, output_dir=tmp_path / "a", progress=False)
    e = read_state(tmp_path / "a")[EMB]
    torch.testing.assert_close(e[:128], ame_merge([t[:128] for t in x], cfg), rtol=0, atol=1e-6)
    torch.testing.assert_close(e[128], ame_merge([x[1][128:129], x[2][128:129]], cfg)[0], rtol=0, atol=1e-6)
    assert torch.equal(e[129], x[1][129])


def test_untied_lm_head_and_padding(tmp_path):
    paths = _family(tmp_path / "untied", tie=False)
    x, h = _rows(paths), _rows(paths, "lm_head.weight")
    m = AMEMerger.from_pretrained(paths, tokenizer_source="union", pad_to_multiple_of=8)
    assert set(m.rows.tensors) == {EMB, "lm_head.weight"}
    m.merge(AMEConfig.soup(), output_dir=tmp_path / "p", progress=False)
    state = read_state(tmp_path / "p")
    assert state[EMB].shape == state["lm_head.weight"].shape == (136, 32)
    assert torch.equal(state["lm_head.weight"][129], h[1][129])
    torch.testing.assert_close(state["lm_head.weight"][128], (h[1][128] + h[2][128]) / 2, rtol=0, atol=1e-7)
    # the 5 padding rows: the mean of the 131 merged rows (mergekit's rule)
    torch.testing.assert_close(state[EMB][131:], state[EMB][:131].mean(0).expand(5, -1), rtol=0, atol=1e-7)
    assert json.loads((tmp_path / "p" / "config.json").read_text())["vocab_size"] == 136
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "p").lm_head.weight.shape == (136, 32)
    del x


def test_same_vocabulary_needs_no_row_maps(tmp_path):
    paths = make_family("llama", tmp_path / "same", 2, seed=4)
    for p in paths:
        save_word_tokenizer(p, 128)
    m = AMEMerger.from_pretrained([str(p) for p in paths], tokenizer_source="union")
    assert m.rows.tensors == {}
    assert m.plan().counts("reader").get("gather") is None


def test_bad_tokenizer_source_and_non_finite_added_row(fam, tmp_path):
    with pytest.raises(IncompatibleCheckpointsError, match="tokenizer_source: expected one of first, base, union"):
        AMEMerger.from_pretrained(fam, tokenizer_source="nope")
    with pytest.raises(IncompatibleCheckpointsError, match="tokenizer_source: 'base' needs a base_model"):
        AMEMerger.from_pretrained(fam, tokenizer_source="base")
    bad = tmp_path / "bad"
    shutil.copytree(fam[1], bad)
    state = read_state(bad)
    state[EMB][129, 3] = float("nan")  # </tool>, a row only this model has
    from safetensors.torch import save_file

    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    m = AMEMerger.from_pretrained([fam[0], str(bad), fam[2]], tokenizer_source="union")
    with pytest.raises(NonFiniteWeightsError, match=r"bad.*embed_tokens|embed_tokens.*bad"):
        m.merge(AMEConfig.soup(), output_dir=tmp_path / "nan", progress=False)
    assert not (tmp_path / "nan").exists()


def test_recipe_and_cli_and_mergekit_union(fam, tmp_path):
    out = tmp_path / "cli"
    assert main(["merge", *fam, "--tokenizer-source", "union", "--method", "linear", "--out", str(out), "--no-progress"]) == 0
    first = read_state(out)
    recipe = load_recipe(out / "ame_recipe.yaml")
    assert recipe.output["tokenizer_source"] == "union"
    assert main(["merge", str(out / "ame_recipe.yaml"), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    assert all(torch.equal(first[k], v) for k, v in read_state(tmp_path / "again").items())
    mk = tmp_path / "mk.yml"
    mk.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": p, "parameters": {"weight": 1.0}} for p in fam],
                                  "tokenizer": {"source": "union", "pad_to_multiple_of": 4}, "dtype": "float32"}))
    assert main(["merge", str(mk), "--out", str(tmp_path / "mk"), "--no-progress"]) == 0
    e = read_state(tmp_path / "mk")[EMB]
    assert e.shape == (132, 32)
    torch.testing.assert_close(e[:131], first[EMB], rtol=0, atol=1e-6)


def test_hub_vocabularies_are_read_before_any_weight_download(fam, tmp_path, online):
    """Hub ingredients: tokenizers come with the small files; a bad tokenizer_source fails before a
    weight byte is downloaded; a good one merges what the local folders merge."""
    hub = online
    for k, p in enumerate(fam):
        hub.state.add_folder(f"org/v{k}", p)
    ids = [f"org/v{k}" for k in range(3)]
    with pytest.raises(IncompatibleCheckpointsError, match="tokenizer_source: expected one of"):
        AMEMerger.from_pretrained(ids, tokenizer_source="org/v9", cache_dir=tmp_path / "cache", endpoint=hub.endpoint)
    assert list((tmp_path / "cache").rglob("tokenizer.json"))
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    AMEMerger.from_pretrained(ids, tokenizer_source="org/v2", cache_dir=tmp_path / "cache", endpoint=hub.endpoint) \
        .merge(AMEConfig.soup(), output_dir=tmp_path / "hub", progress=False)
    AMEMerger.from_pretrained(fam, tokenizer_source=fam[2]).merge(AMEConfig.soup(), output_dir=tmp_path / "loc", progress=False)
    a, b = read_state(tmp_path / "hub"), read_state(tmp_path / "loc")
    assert all(torch.equal(a[k], b[k]) for k in b)


T1 = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
T2 = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def test_chat_templates(tmp_path):
    """chat_template: "auto" takes the one most models have; Jinja text as given; mergekit's bundled
    names; anything else refused before any weight is read."""
    paths = make_family("llama", tmp_path / "chat", 3, seed=5)
    for p, t in zip(paths, (T1, T1, T2)):
        save_word_tokenizer(p, 128)
        tok = AutoTokenizer.from_pretrained(p)
        tok.chat_template = t
        tok.save_pretrained(p)
    paths = [str(p) for p in paths]
    AMEMerger.from_pretrained(paths, chat_template="auto").merge(AMEConfig.soup(), output_dir=tmp_path / "a", progress=False)
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert tok.chat_template == T1.strip()
    assert tok.apply_chat_template([{"role": "user", "content": "w3"}], tokenize=False) == "<|user|>w3\n"
    assert "chat template: the one 2 of 3 models have (auto)" in (tmp_path / "a" / "README.md").read_text()
    AMEMerger.from_pretrained(paths[:2], chat_template=T2).merge(AMEConfig.soup(), output_dir=tmp_path / "b", progress=False)
    assert AutoTokenizer.from_pretrained(tmp_path / "b").chat_template == T2
    AMEMerger.from_pretrained(paths[:2], chat_template="chatml").merge(AMEConfig.soup(), output_dir=tmp_path / "c",
                                                                       progress=False)
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(tmp_path / "c").chat_template
    with pytest.raises(IncompatibleCheckpointsError, match="chat_template: 'nope' is neither 'auto'"):
        AMEMerger.from_pretrained(paths, chat_template="nope")
    mk = tmp_path / "mk.yml"
    mk.write_text(yaml.safe_dump({"merge_method": "linear", "chat_template": "auto", "dtype": "float32",
                                  "models": [{"model": p, "parameters": {"weight": 1.0}} for p in paths]}))
    assert main(["merge", str(mk), "--out", str(tmp_path / "mk"), "--no-progress"]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "mk").chat_template == T1.strip()


def test_missing_tokens_mergekit_fills_the_rows_a_model_lacks(fam, tmp_path):
    """Weighted linear 1, 2, 1: by default <tool> (held by ft-1 and ft-2) merges over its holders,
    (2 r1 + r2) / 3; with missing_tokens="mergekit" (CLI) ft-0 takes the holders' mean first, as
    mergekit does: (0.5 (r1 + r2) + 2 r1 + r2) / 4; a row all three hold is the same either way."""
    x = _rows(fam)
    common = ["merge", *fam, "--tokenizer-source", "union", "--method", "linear", "--param", "weight=[1,2,1]",
              "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "own")]) == 0
    assert main([*common, "--missing-tokens", "mergekit", "--out", str(tmp_path / "mk")]) == 0
    own, mk = read_state(tmp_path / "own")[EMB], read_state(tmp_path / "mk")[EMB]
    r1, r2 = x[1][128], x[2][128]
    torch.testing.assert_close(own[128], (2 * r1 + r2) / 3, rtol=0, atol=1e-6)
    torch.testing.assert_close(mk[128], 0.625 * r1 + 0.375 * r2, rtol=0, atol=1e-6)
    torch.testing.assert_close(mk[:128], own[:128], rtol=0, atol=1e-6)
    assert torch.equal(mk[129], x[1][129])  # </tool>: ft-1's alone, both rules
    assert load_recipe(tmp_path / "mk" / "ame_recipe.yaml").output["missing_tokens"] == "mergekit"
    with pytest.raises(ConfigError, match="missing_tokens: expected None or 'mergekit'"):
        AMEMerger.from_pretrained(fam, tokenizer_source="union", missing_tokens="zero")


def test_row_groups_read_only_their_rows(fam, tmp_path):
    """Each group of rows reads only its span of each copy (Checkpoint.read_rows): the union soup reads
    exactly the bytes its plan says (one copy of every tensor per source), not one whole copy per group."""
    m = AMEMerger.from_pretrained(fam, tokenizer_source="union", device_map="cpu")
    plan = m.plan(AMEConfig.soup(), output_dir=tmp_path / "s")
    assert any(t.reader == "gather" for t in plan.tensors)
    report = m.merge(AMEConfig.soup(), output_dir=tmp_path / "s", progress=False).report
    assert report.bytes_read == plan.bytes_to_read
    c = Checkpoint(fam[1])
    rows = torch.tensor([129, 3, 128])
    assert torch.equal(c.read_rows(EMB, rows), c.get_tensor(EMB)[rows])


def test_union_without_chat_template_keeps_the_base_models_as_mergekit(tmp_path):
    """tokenizer_source union and no chat_template key: mergekit 0.1.5 builds the union on the base
    model's tokenizer, so the output has the base's chat template (not the first model's), checked
    against mergekit on the same config. With no base, mergekit's root is ``list(set(models))[0]``
    (an order that changes with PYTHONHASHSEED); hf_ame takes the first model's, deterministically."""
    import mergekit.merge as mergekit_merge
    from mergekit.config import MergeConfiguration

    paths = make_family("llama", tmp_path / "chat", 3, seed=5)
    for p, t in zip(paths, (T2, T1, T1)):
        save_word_tokenizer(p, 128)
        tok = AutoTokenizer.from_pretrained(p)
        tok.chat_template = t
        tok.save_pretrained(p)
    add_tokens(paths[2], ["<tool>"], seed=2)
    base, fts = str(paths[0]), [str(p) for p in paths[1:]]
    with_base = {"merge_method": "task_arithmetic", "base_model": base, "tokenizer_source": "union", "dtype": "float32",
                 "models": [{"model": m, "parameters": {"weight": 0.5}} for m in fts]}
    no_base = {"merge_method": "linear", "tokenizer_source": "union", "dtype": "float32",
               "models": [{"model": m, "parameters": {"weight": 1.0}} for m in [fts[0], base]]}
    mergekit_merge.run_merge(MergeConfiguration.model_validate(with_base), str(tmp_path / "mk"),
                             mergekit_merge.MergeOptions(quiet=True, write_model_card=False))
    for name, cfg, want in (("base", with_base, T2), ("first", no_base, T1)):
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["merge", str(path), "--out", str(tmp_path / name), "--no-progress"]) == 0
        assert AutoTokenizer.from_pretrained(tmp_path / name).chat_template.strip() == want.strip(), name
    assert AutoTokenizer.from_pretrained(tmp_path / "mk").chat_template.strip() == T2.strip()
