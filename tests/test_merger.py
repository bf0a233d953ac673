"""AMEMerger.from_pretrained(...).merge(...) over local folders and a Hub served on 127.0.0.1."""
import json
from pathlib import Path

import pytest
import torch

from conftest import read_state
from hf_ame import AMEConfig, AMEMerger, IncompatibleCheckpointsError, OutputExistsError, merge_checkpoints
from hf_ame.hub import IngredientError
from hf_ame.placement import DevicePlacementError
from hf_ame.testing import make_family

CFG = AMEConfig(optimizer="adamw", lr=1e-3, epochs=2, batch_size=2, seed=3)


def _forward(model, kind):
    with torch.no_grad():
        if kind == "vit":
            return model(pixel_values=torch.randn(2, 1, 8, 8)).logits
        return model(input_ids=torch.tensor([[1, 5, 7, 9]])).logits


@pytest.mark.parametrize("kind", ["llama", "vit", "bert"])
def test_from_pretrained_merge_model(families, tmp_path, kind):
    paths = [str(p) for p in families[kind]]
    result = AMEMerger.from_pretrained(paths, device_map="auto").merge(CFG, output_dir=tmp_path / "api", progress=False)
    merge_checkpoints(paths, tmp_path / "core", CFG, progress=False)
    assert (tmp_path / "api/model.safetensors").read_bytes() == (tmp_path / "core/model.safetensors").read_bytes()
    y = _forward(result.model, kind)
    assert torch.isfinite(y).all()
    assert type(result.model).__name__ == json.loads((Path(paths[0]) / "config.json").read_text())["architectures"][0]
    assert [i.id for i in result.ingredients] == paths and [i.order for i in result.ingredients] == [0, 1, 2, 3]
    assert all(i.local and i.sha is None for i in result.ingredients)
    assert result.config == CFG and result.device_map == {"": "cpu"}
    assert set(result.timings) >= {"resolve", "download", "placement", "merge"}


def test_overrides_and_default_temp_output(families, tmp_path):
    merger = AMEMerger.from_pretrained(families["bert"])
    r = merger.merge(optimizer="sgd", lr=1.0, lr_schedule="constant", adaptive_pivot=False, progress=False)
    assert r.config.optimizer == "sgd" and r.output_dir.exists()
    states = [read_state(p) for p in families["bert"]]
    got = read_state(r.output_dir)
    for k in got:
        torch.testing.assert_close(got[k], torch.stack([s[k] for s in states]).mean(0), atol=1e-6, rtol=1e-5)
    before = (r.output_dir / "model.safetensors").read_bytes()
    saved = r.save_pretrained(tmp_path / "saved")
    assert (saved / "model.safetensors").read_bytes() == before and r.output_dir == saved  # a temporary merge moves
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        r.save_pretrained(tmp_path / "other")
    r.save_pretrained(tmp_path / "saved", overwrite=True, max_shard_size="10KB")  # re-shard in place
    assert (tmp_path / "saved/model.safetensors.index.json").exists() and not (tmp_path / "saved/model.safetensors").exists()
    resharded = read_state(tmp_path / "saved")
    assert all(torch.equal(resharded[k], got[k]) for k in got)


def test_dtype_and_auxiliary_files_travel(tmp_path):
    from transformers import AutoTokenizer, BertTokenizer, ViTImageProcessor

    vit = make_family("vit", tmp_path / "vit", 2, seed=5)
    proc = ViTImageProcessor(do_resize=False, image_mean=[0.5], image_std=[0.5], size={"height": 8, "width": 8})
    for p in vit:
        proc.save_pretrained(p)
    r = AMEMerger.from_pretrained(vit, dtype="bfloat16").merge(CFG, output_dir=tmp_path / "o", progress=False)
    assert (tmp_path / "o/preprocessor_config.json").exists()
    assert all(v.dtype == torch.bfloat16 for v in read_state(tmp_path / "o").values())
    cfg = json.loads((tmp_path / "o/config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["architectures"] == ["ViTForImageClassification"] and "transformers_version" in cfg
    assert r.model.dtype == torch.bfloat16

    bert = make_family("bert", tmp_path / "bert", 2, seed=5)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]) + "\n")
    tok = BertTokenizer(str(vocab))
    for p in bert:
        tok.save_pretrained(p)
    AMEMerger.from_pretrained(bert).merge(CFG, output_dir=tmp_path / "b", progress=False)
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "b")
    assert tok2("w1 w2")["input_ids"] == tok("w1 w2")["input_ids"]


def test_cpu_device_map_split_by_max_memory(families, tmp_path):
    paths = families["llama"]
    merger = AMEMerger.from_pretrained(paths, device_map="auto", max_memory={"cpu": "60KB", "disk": "10GB"})
    assert len(merger.device_map) > 1 and set(merger.device_map.values()) == {"cpu", "disk"}
    merger.merge(CFG, output_dir=tmp_path / "split", progress=False)
    merge_checkpoints(paths, tmp_path / "plain", CFG, progress=False)
    assert (tmp_path / "split/model.safetensors").read_bytes() == (tmp_path / "plain/model.safetensors").read_bytes()
    with pytest.raises(DevicePlacementError, match=r"device_map\['model.layers'\]: 'cuda:3' is not available"):
        AMEMerger.from_pretrained(paths, device_map={"model.layers": "cuda:3", "": "cpu"})
    with pytest.raises(DevicePlacementError, match="'cuda' is not available"):
        AMEMerger.from_pretrained(paths, device_map="cuda")


def test_clear_errors(families, tmp_path):
    with pytest.raises(IncompatibleCheckpointsError, match="at least 2 ingredients, got 1"):
        AMEMerger.from_pretrained(families["bert"][:1])
    with pytest.raises(IngredientError, match="single one"):
        AMEMerger.from_pretrained(str(families["bert"][0]))
    with pytest.raises(IncompatibleCheckpointsError) as info:
        AMEMerger.from_pretrained([families["bert"][0], families["vit"][0]])
    assert str(families["bert"][0]) in str(info.value) and str(families["vit"][0]) in str(info.value)
    with pytest.raises(IngredientError, match=r"models\[1\]: '\./missing-folder': no such folder"):
        AMEMerger.from_pretrained([families["bert"][0], "./missing-folder"])
    with pytest.raises(IngredientError, match=r"models\[1\]: 'bad repo id!!' is neither a folder nor a valid Hub repo id"):
        AMEMerger.from_pretrained([families["bert"][0], "bad repo id!!"])
    # HF_HUB_OFFLINE=1 (as in this suite): a Hub id is refused with the reason, naming the repo.
    with pytest.raises(IngredientError, match=r"'org/not-local'.*HF_HUB_OFFLINE"):
        AMEMerger.from_pretrained([families["bert"][0], "org/not-local"])


def test_hub_ingredients_download_path_and_pinned_revisions(families, tmp_path, online):
    hub = online
    shas = [hub.state.add_folder(f"org/ft-{i}", p) for i, p in enumerate(families["llama"])]
    new_main = hub.state.commit("org/ft-1", {"README.md": b"a later commit"}, message="card")
    cache = tmp_path / "cache"
    models = ["org/ft-0", {"id": "org/ft-1", "revision": shas[1]}, str(families["llama"][2]), "org/ft-3"]
    result = AMEMerger.from_pretrained(models, cache_dir=cache, endpoint=hub.endpoint).merge(
        CFG, output_dir=tmp_path / "hub", progress=False)
    got = [(i.id, i.sha, i.local) for i in result.ingredients]
    assert got == [("org/ft-0", shas[0], False), ("org/ft-1", shas[1], False), (str(families["llama"][2]), None, True),
                   ("org/ft-3", shas[3], False)]
    assert new_main != shas[1]
    merge_checkpoints(families["llama"], tmp_path / "local", CFG, progress=False)
    assert (tmp_path / "hub/model.safetensors").read_bytes() == (tmp_path / "local/model.safetensors").read_bytes()
    assert all(Path(i.path).is_relative_to(cache) for i in result.ingredients if not i.local)
    # Only what a merge needs was fetched: no README from the later commit (not even at that revision)
    fetched = {r["path"].rsplit("/", 1)[-1] for r in hub.state.requests if r["method"] == "GET" and "/resolve/" in r["path"]}
    assert fetched == {"config.json", "generation_config.json", "model.safetensors"}
    # The cache layout now serves local_files_only=True with no server at all.
    n = len(hub.state.requests)
    again = AMEMerger.from_pretrained(["org/ft-0", {"id": "org/ft-1", "revision": shas[1]}], cache_dir=cache,
                                      local_files_only=True, endpoint=hub.endpoint)
    assert len(hub.state.requests) == n and [i.sha for i in again.ingredients] == shas[:2]
    with pytest.raises(IngredientError, match="'org/ft-2'.*local cache"):
        AMEMerger.from_pretrained(["org/ft-0", "org/ft-2"], cache_dir=cache, local_files_only=True)


def test_mismatch_reported_before_any_weight_download(tmp_path, online):
    hub = online
    # tensors large enough that a full file is more than the 100 kB a header read asks for
    a = make_family("llama", tmp_path / "a", 1, seed=1, vocab_size=2048, hidden_size=64)[0]
    b = make_family("llama", tmp_path / "b", 1, seed=1, vocab_size=2048, hidden_size=64, intermediate_size=96)[0]
    hub.state.add_folder("org/a", a)
    hub.state.add_folder("org/b", b)
    with pytest.raises(IncompatibleCheckpointsError, match=r"tensor 'model.layers.0.mlp.down_proj.weight' has shape \(64, 96\) in model 'org/b'"):
        AMEMerger.from_pretrained(["org/a", "org/b"], cache_dir=tmp_path / "cache", endpoint=hub.endpoint)
    st_gets = [r for r in hub.state.requests if r["path"].endswith(".safetensors") and r["method"] == "GET"]
    assert st_gets and all(r["range"] for r in st_gets)  # header range reads only
    full = (Path(a) / "model.safetensors").stat().st_size + (Path(b) / "model.safetensors").stat().st_size
    assert hub.state.bytes_sent(".safetensors") < 0.25 * full
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    with pytest.raises(IngredientError, match=r"'org/missing'.*repository not found"):
        AMEMerger.from_pretrained(["org/a", "org/missing"], cache_dir=tmp_path / "cache", endpoint=hub.endpoint)
    with pytest.raises(IngredientError, match=r"'org/a' at revision 'v9'.*revision not found"):
        AMEMerger.from_pretrained([{"id": "org/a", "revision": "v9"}, "org/b"], cache_dir=tmp_path / "cache",
                                  endpoint=hub.endpoint)
