"""Fine-tunes that differ in heads, labels or config (issue 17): head rows matched by label name,
heads= choices, headless bases aligned by base_model_prefix, config differences refused or chosen."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForSequenceClassification, BertModel

from conftest import read_state
from hf_ame import AMEConfig, AMEMerger, IncompatibleCheckpointsError
from hf_ame.cli import main
from hf_ame.testing import build_model, make_family

HEAD = ("classifier.weight", "classifier.bias")


def relabel(folder, labels, order=None):
    """Give the classifier in ``folder`` the label names ``labels``; with ``order`` (a permutation),
    first reorder its head rows so that row i is old row order[i] (the same model, labels listed otherwise)."""
    folder = Path(folder)
    state = read_state(folder)
    if order is not None:
        for k in HEAD:
            state[k] = state[k][list(order)].contiguous()
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["id2label"] = {str(i): x for i, x in enumerate(labels)}
    cfg["label2id"] = {x: i for i, x in enumerate(labels)}
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def berts(tmp_path_factory):
    return [str(p) for p in make_family("bert", tmp_path_factory.mktemp("heads"), 3, seed=7)]


def _copy(paths, root):
    out = []
    for p in paths:
        shutil.copytree(p, root / Path(p).name)
        out.append(str(root / Path(p).name))
    return out


def test_permuted_labels_are_aligned_by_name(berts, tmp_path):
    same = _copy(berts, tmp_path / "same")
    for p in same:
        relabel(p, ["pos", "neg", "neu"])
    perm = _copy(berts, tmp_path / "perm")
    relabel(perm[0], ["pos", "neg", "neu"])
    relabel(perm[1], ["neg", "neu", "pos"], order=[1, 2, 0])  # the same model, its labels listed in another order
    relabel(perm[2], ["neu", "pos", "neg"], order=[2, 0, 1])
    AMEMerger.from_pretrained(same).merge(AMEConfig.soup(), output_dir=tmp_path / "a", progress=False)
    AMEMerger.from_pretrained(perm).merge(AMEConfig.soup(), output_dir=tmp_path / "b", progress=False)
    a, b = read_state(tmp_path / "a"), read_state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["id2label"] == {"0": "pos", "1": "neg", "2": "neu"}
    assert "aligned to" in (tmp_path / "b" / "README.md").read_text()
    # what users got before: the rows averaged by position, "pos" mixed with "neg"
    naive = sum(read_state(p)["classifier.weight"] for p in perm) / 3
    assert not torch.allclose(naive, b["classifier.weight"], atol=1e-3)


@pytest.fixture(scope="module")
def overlap(berts, tmp_path_factory):
    paths = _copy(berts, tmp_path_factory.mktemp("overlap"))
    relabel(paths[0], ["a", "b", "c"])
    relabel(paths[1], ["b", "c", "d"])
    relabel(paths[2], ["c", "a", "e"])
    return paths


def test_different_label_sets_are_refused_listing_them(overlap):
    with pytest.raises(IncompatibleCheckpointsError, match=r"different label sets \(.*ft-0': a, b, c; .*ft-1': b, c, d; "
                                                          r".*ft-2': c, a, e\); choose heads='union'"):
        AMEMerger.from_pretrained(overlap)
    with pytest.raises(IncompatibleCheckpointsError, match="heads: expected None, 'union', 'base', 'drop'"):
        AMEMerger.from_pretrained(overlap, heads="every")


def test_union_of_labels(overlap, tmp_path):
    x = [read_state(p) for p in overlap]
    AMEMerger.from_pretrained(overlap, heads="union").merge(AMEConfig.soup(), output_dir=tmp_path / "u", progress=False)
    s = read_state(tmp_path / "u")
    w = [t["classifier.weight"] for t in x]
    assert s["classifier.weight"].shape == (5, 32)
    torch.testing.assert_close(s["classifier.weight"][0], (w[0][0] + w[2][1]) / 2, rtol=0, atol=1e-7)  # a
    torch.testing.assert_close(s["classifier.weight"][1], (w[0][1] + w[1][0]) / 2, rtol=0, atol=1e-7)  # b
    torch.testing.assert_close(s["classifier.weight"][2], (w[0][2] + w[1][1] + w[2][0]) / 3, rtol=0, atol=1e-7)  # c
    assert torch.equal(s["classifier.weight"][3], w[1][2]) and torch.equal(s["classifier.weight"][4], w[2][2])  # d, e
    torch.testing.assert_close(s["classifier.bias"][4], x[2]["classifier.bias"][2], rtol=0, atol=0)
    body = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(s[body], sum(t[body] for t in x) / 3, rtol=0, atol=1e-7)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "u")
    assert model.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d", 4: "e"} and model.num_labels == 5
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 5)
    card = (tmp_path / "u" / "README.md").read_text()
    assert "label sets: " in card and "ft-1': b, c, d" in card and "the union of the label sets (a, b, c, d, e)" in card


def test_heads_from_one_ingredient_and_drop(overlap, tmp_path):
    x = [read_state(p) for p in overlap]
    AMEMerger.from_pretrained(overlap, heads=1).merge(AMEConfig.soup(), output_dir=tmp_path / "one", progress=False)
    s = read_state(tmp_path / "one")
    assert all(torch.equal(s[k], x[1][k]) for k in HEAD)
    assert json.loads((tmp_path / "one" / "config.json").read_text())["id2label"] == {"0": "b", "1": "c", "2": "d"}
    AMEMerger.from_pretrained(overlap, heads="drop").merge(AMEConfig.soup(), output_dir=tmp_path / "drop", progress=False)
    s = read_state(tmp_path / "drop")
    assert not any(k.startswith(("classifier", "bert.")) for k in s)
    torch.testing.assert_close(s["pooler.dense.weight"], sum(t["bert.pooler.dense.weight"] for t in x) / 3, rtol=0, atol=1e-7)
    assert json.loads((tmp_path / "drop" / "config.json").read_text())["architectures"] == ["BertModel"]
    model, info = AutoModel.from_pretrained(tmp_path / "drop", output_loading_info=True)
    assert isinstance(model, BertModel) and not info["missing_keys"] and not info["unexpected_keys"]


def test_headless_base_is_aligned_by_prefix(berts, tmp_path):
    """A pretrained body saved headless (BertModel: embeddings.*) as the base of headed fine-tunes
    (bert.embeddings.*): task vectors measured from it; the head, which the base lacks, merged alone."""
    body = build_model("bert", seed=7).bert
    body.save_pretrained(tmp_path / "base")
    assert "embeddings.word_embeddings.weight" in read_state(tmp_path / "base")
    m = AMEMerger.from_pretrained(berts, base_model=str(tmp_path / "base"))
    m.merge(method="task_arithmetic", output_dir=tmp_path / "ta", progress=False)
    s, x, b = read_state(tmp_path / "ta"), [read_state(p) for p in berts], read_state(tmp_path / "base")
    k = "bert.encoder.layer.1.output.dense.weight"
    torch.testing.assert_close(s[k], b[k[5:]] + sum(t[k] - b[k[5:]] for t in x), rtol=0, atol=1e-6)
    torch.testing.assert_close(s["classifier.weight"], sum(t["classifier.weight"] for t in x) / 3, rtol=0, atol=1e-6)
    assert "saved headless: its names aligned by the prefix 'bert'" in (tmp_path / "ta" / "README.md").read_text()


def test_config_differences_are_refused_or_chosen(tmp_path):
    paths = [str(p) for p in make_family("llama", tmp_path / "rope", 2, seed=2)]
    harmless = json.loads((Path(paths[0]) / "config.json").read_text())
    harmless.update(use_cache=False, _name_or_path="someone/else", transformers_version="4.0.0")
    (Path(paths[0]) / "config.json").write_text(json.dumps(harmless))
    AMEMerger.from_pretrained(paths)  # fields that say nothing about the computation pass
    cfg = json.loads((Path(paths[1]) / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    cfg["max_position_embeddings"] = 8192
    cfg["_name_or_path"] = "someone/long-context"
    (Path(paths[1]) / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleCheckpointsError, match=r"configs differ .*max_position_embeddings: .*=64, .*=8192.*"
                                                          r"config_source="):
        AMEMerger.from_pretrained(paths)
    AMEMerger.from_pretrained(paths, config_source=paths[1]).merge(AMEConfig.soup(), output_dir=tmp_path / "c",
                                                                   progress=False)
    out = json.loads((tmp_path / "c" / "config.json").read_text())
    assert out["max_position_embeddings"] == 8192 and out["rope_parameters"]["rope_theta"] == 1e6
    assert "max_position_embeddings" in (tmp_path / "c" / "README.md").read_text()
    assert main(["merge", *paths, "--config-source", "first", "--method", "linear", "--out", str(tmp_path / "cli"),
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["max_position_embeddings"] == 64


def test_vit_labels_union_under_the_vit_prefix(tmp_path):
    paths = [str(p) for p in make_family("vit", tmp_path / "vit", 2, seed=3, num_labels=3)]
    relabel(paths[0], ["cat", "dog", "fox"])
    relabel(paths[1], ["dog", "owl", "cat"])
    AMEMerger.from_pretrained(paths, heads="union").merge(AMEConfig.soup(), output_dir=tmp_path / "v", progress=False)
    s, x = read_state(tmp_path / "v"), [read_state(p) for p in paths]
    assert s["classifier.weight"].shape[0] == 4
    torch.testing.assert_close(s["classifier.weight"][0], (x[0]["classifier.weight"][0] + x[1]["classifier.weight"][2]) / 2,
                               rtol=0, atol=1e-7)
    assert torch.equal(s["classifier.weight"][3], x[1]["classifier.weight"][1])
    assert json.loads((tmp_path / "v" / "config.json").read_text())["id2label"]["3"] == "owl"


def test_heads_from_the_base(overlap, tmp_path):
    """heads="base": a base with its own head (labels x, y) gives the head; the body is the soup."""
    base = tmp_path / "base"
    shutil.copytree(overlap[0], base)
    relabel(base, ["x", "y", "z"])
    b, x = read_state(base), [read_state(p) for p in overlap]
    AMEMerger.from_pretrained(overlap, base_model=str(base), heads="base").merge(
        AMEConfig.soup(), output_dir=tmp_path / "hb", progress=False)
    s = read_state(tmp_path / "hb")
    assert all(torch.equal(s[k], b[k]) for k in HEAD)
    k = "bert.encoder.layer.0.output.dense.weight"
    torch.testing.assert_close(s[k], sum(t[k] for t in x) / 3, rtol=0, atol=1e-7)
    assert json.loads((tmp_path / "hb" / "config.json").read_text())["id2label"] == {"0": "x", "1": "y", "2": "z"}
    body = tmp_path / "headless"
    build_model("bert", seed=7).bert.save_pretrained(body)
    with pytest.raises(IncompatibleCheckpointsError, match="heads='base': the base model .* has no head"):
        AMEMerger.from_pretrained(overlap, base_model=str(body), heads="base")
