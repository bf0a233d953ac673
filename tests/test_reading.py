"""Reading checkpoints as transformers does (issue 19, first items): the config's dtype, BatchNorm
step counters, what the summary says."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import read_state
from hf_ame import AMEConfig, merge_checkpoints
from hf_ame.testing import make_family


def test_output_dtype_comes_from_the_config_not_the_first_tensor(tmp_path):
    paths = make_family("llama", tmp_path / "f", 2, seed=1, dtype=torch.bfloat16)
    for p in paths:  # a bf16 model keeping one tensor in float32 (as routers and T5's wo are)
        f = Path(p) / "model.safetensors"
        sd = load_file(f)
        sd["model.norm.weight"] = sd["model.norm.weight"].float()
        save_file(sd, f, metadata={"format": "pt"})
        raw = f.read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        assert header[[k for k in header if k != "__metadata__"][0]]["dtype"] == "F32"  # safetensors lists it first
    rep = merge_checkpoints(paths, tmp_path / "o", AMEConfig.soup(), progress=False)
    cfg = json.loads((tmp_path / "o/config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and rep.dtype == "bfloat16"
    out = read_state(tmp_path / "o")
    assert out["model.norm.weight"].dtype == torch.float32  # kept in its own dtype
    assert out["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert "the exact uniform soup (one pass)" in rep.summary() and "steps per tensor" not in rep.summary()


def test_batchnorm_counters_take_the_maximum(tmp_path):
    paths = make_family("llama", tmp_path / "f", 3, seed=1)
    for i, p in enumerate(paths):  # a BatchNorm-style step counter: fine-tunes trained 10, 30, 20 steps
        f = Path(p) / "model.safetensors"
        sd = load_file(f)
        sd["model.bn.num_batches_tracked"] = torch.tensor(10 * [1, 3, 2][i])
        sd["model.other_counter"] = torch.tensor(5)
        save_file(sd, f, metadata={"format": "pt"})
    rep = merge_checkpoints(paths, tmp_path / "o", AMEConfig.soup(), progress=False)
    assert read_state(tmp_path / "o")["model.bn.num_batches_tracked"].item() == 30
    assert rep.counters_maxed == ["model.bn.num_batches_tracked"]
    from hf_ame import AMEMerger

    AMEMerger.from_pretrained([str(p) for p in paths]).merge(AMEConfig.soup(), output_dir=tmp_path / "card", progress=False)
    assert "num_batches_tracked differs between the models: the maximum was taken for 1 tensor(s)" in \
        (tmp_path / "card" / "README.md").read_text()
    sd = load_file(Path(paths[2]) / "model.safetensors")
    sd["model.other_counter"] = torch.tensor(6)
    save_file(sd, Path(paths[2]) / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.other_counter' .* differs between .* integer buffers cannot be averaged"):
        merge_checkpoints(paths, tmp_path / "o2", AMEConfig.soup(), progress=False)


def test_hf_hub_offline_reads_the_cache_as_transformers_does(tmp_path, online, monkeypatch):
    import huggingface_hub.constants as C

    from hf_ame import AMEMerger, IngredientError

    hub = online
    paths = make_family("llama", tmp_path / "f", 2, seed=1)
    shas = [hub.state.add_folder(f"org/ll-{i}", p) for i, p in enumerate(paths)]
    hub.state.add_folder("org/ll-never-fetched", paths[0])
    cache = tmp_path / "cache"
    AMEMerger.from_pretrained(["org/ll-0", "org/ll-1"], cache_dir=cache, endpoint=hub.endpoint, device_map="cpu")
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 in the environment
    n = len(hub.state.requests)
    merger = AMEMerger.from_pretrained(["org/ll-0", "org/ll-1"], cache_dir=cache, endpoint=hub.endpoint, device_map="cpu")
    assert [i.sha for i in merger.ingredients] == shas and len(hub.state.requests) == n  # no request made
    from transformers import AutoConfig

    AutoConfig.from_pretrained("org/ll-0", cache_dir=cache)  # transformers finds it offline too
    with pytest.raises(IngredientError, match=r"'org/ll-never-fetched'.*local cache"):
        AMEMerger.from_pretrained(["org/ll-0", "org/ll-never-fetched"], cache_dir=cache, endpoint=hub.endpoint)


def _transformers_state(folder):
    from transformers import AutoModelForCausalLM

    return {k: v.detach() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


@pytest.mark.parametrize("stale", ["single-file", "index"])
def test_weight_files_are_chosen_as_transformers_chooses_them(tmp_path, stale):
    from transformers import AutoModelForCausalLM

    paths = make_family("llama", tmp_path / "f", 2, seed=1)
    for i, p in enumerate(paths):
        model = AutoModelForCausalLM.from_pretrained(p)
        with torch.no_grad():
            for t in model.parameters():
                t.mul_(1.5 + i)  # other weights than the folder's own model.safetensors
        if stale == "single-file":  # re-saved sharded over an older single-file save: both sets present
            model.save_pretrained(tmp_path / "tmp", max_shard_size="20KB")
            for f in (tmp_path / "tmp").glob("model-*.safetensors"):
                f.replace(Path(p) / f.name)
            (tmp_path / "tmp/model.safetensors.index.json").replace(Path(p) / "model.safetensors.index.json")
        else:  # a stale index (its shards gone) beside a newer single file
            (Path(p) / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00005.safetensors"}}))
    merge_checkpoints(paths, tmp_path / "o", AMEConfig.soup(), progress=False)
    got = _transformers_state(tmp_path / "o")
    states = [_transformers_state(p) for p in paths]  # what transformers loads from each folder
    for k, v in got.items():
        torch.testing.assert_close(v, (states[0][k] + states[1][k]) / 2, atol=1e-6, rtol=1e-5)


def test_a_bin_file_storing_the_tied_head_matches_safetensors_storing_it_once(tmp_path):
    from transformers import AutoModelForCausalLM

    paths = make_family("llama", tmp_path / "f", 3, seed=1)  # tie_word_embeddings: lm_head.weight not in the files
    old = Path(paths[1])
    sd = AutoModelForCausalLM.from_pretrained(old).state_dict()
    assert "lm_head.weight" in sd and "lm_head.weight" not in load_file(old / "model.safetensors")
    torch.save({k: v.clone() for k, v in sd.items()}, old / "pytorch_model.bin")  # the older format: both stored
    (old / "model.safetensors").unlink()
    for order in (paths, [paths[1], paths[0], paths[2]]):  # the .bin one as the reference too
        out = tmp_path / f"o-{Path(order[0]).name}"
        merge_checkpoints(order, out, AMEConfig.soup(), progress=False)
        assert "lm_head.weight" not in load_file(out / "model.safetensors")  # written as save_pretrained would
        got = _transformers_state(out)
        states = [_transformers_state(p) for p in order]
        for k, v in got.items():
            torch.testing.assert_close(v, sum(s[k] for s in states) / 3, atol=1e-6, rtol=1e-5)
        assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])  # still tied
