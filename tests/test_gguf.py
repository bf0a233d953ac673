"""GGUF files as ingredients (hf_ame.gguf): tensors equal transformers' own GGUF load bit for bit,
merges of GGUF and safetensors fine-tunes equal the mean of transformers' loads, memory flat in N,
unsupported files refused by name before any tensor is read."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from hf_ame import AMEConfig, AMEMerger, Checkpoint  # noqa: E402
from hf_ame.algorithm import soup  # noqa: E402
from hf_ame.errors import CheckpointError, IngredientError  # noqa: E402
from hf_ame.gguf import GGUFCheckpoint  # noqa: E402
from hf_ame.hub import parse_ingredient  # noqa: E402
from hf_ame.testing_gguf import tiny_llama, write_llama_gguf  # noqa: E402

from conftest import read_state  # noqa: E402

QTYPES = ("Q8_0", "Q4_K", "F16")


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """Fine-tunes 1-3 of one tiny Llama: 1 as a GGUF of each type, 2 as F16, 3 as safetensors."""
    root = tmp_path_factory.mktemp("gguf")
    files = {q: write_llama_gguf(tiny_llama(1, 0.02), root / q / f"ft1-{q}.gguf", q) for q in QTYPES}
    files["ft2"] = write_llama_gguf(tiny_llama(2, 0.02), root / "ft2" / "ft2-F16.gguf", "F16")
    tiny_llama(3, 0.02).save_pretrained(root / "ft3")
    files["ft3"] = root / "ft3"
    return files


def _hf_state(path):
    """The state dict transformers' own loader gives (a GGUF file through gguf_file=)."""
    from transformers import AutoModelForCausalLM

    if str(path).endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).state_dict()
    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantized_tensors_equal_transformers_bit_for_bit(ggufs, qtype):
    """Every tensor of the GGUF reads as from_pretrained(gguf_file=...) loads it: same names (the
    tensors the file stores), float32, equal bit for bit; the quantization type is recorded."""
    ckpt = Checkpoint(ggufs[qtype])
    assert isinstance(ckpt, GGUFCheckpoint) and ckpt.quantization.startswith({"Q4_K": "Q4_K_M"}.get(qtype, qtype))
    hf = _hf_state(ggufs[qtype])
    assert set(ckpt.tensors) == set(hf)  # untied: lm_head is stored as output.weight
    for name, info in ckpt.tensors.items():
        t = ckpt.get_tensor(name)
        assert t.dtype == torch.float32 and tuple(t.shape) == info.shape == tuple(hf[name].shape), name
        assert torch.equal(t, hf[name]), name
    assert torch.equal(ckpt.read_flat("lm_head.weight", 5, 900), hf["lm_head.weight"].reshape(-1)[5:900])


def test_config_and_tokenizer_as_transformers_builds_them(ggufs):
    """config.json and the tokenizer files come from transformers' AutoConfig / AutoTokenizer of the
    GGUF; architectures is filled in with the causal LM class."""
    from transformers import AutoConfig, AutoTokenizer

    path = ggufs["Q8_0"]
    ckpt = Checkpoint(path)
    want = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    got = json.loads((ckpt.files_path / "config.json").read_text())
    assert got["architectures"] == ["LlamaForCausalLM"] == ckpt.config["architectures"]
    for k in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "vocab_size", "bos_token_id"):
        assert got[k] == want[k], k
    tok = AutoTokenizer.from_pretrained(str(ckpt.files_path))
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert tok("the heat is on").input_ids == ref("the heat is on").input_ids


def test_merge_of_gguf_and_safetensors_equals_mean_of_transformers_loads(ggufs, tmp_path):
    """Two GGUF fine-tunes (Q8_0 as a file path, F16 as {id: folder, gguf_file}) and a safetensors one:
    the soup equals the mean of the three state dicts transformers loads; the card and the recipe
    record each GGUF's file and quantization; the output loads with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    f2 = ggufs["ft2"]
    models = [str(ggufs["Q8_0"]), {"id": str(f2.parent), "gguf_file": f2.name}, str(ggufs["ft3"])]
    result = AMEMerger.from_pretrained(models, device_map="cpu").merge(AMEConfig.soup(), output_dir=tmp_path / "m",
                                                                       progress=False)
    states = [_hf_state(p) for p in (ggufs["Q8_0"], f2, ggufs["ft3"])]
    got = read_state(tmp_path / "m")
    assert set(got) == set(states[0])
    for k, v in got.items():
        assert torch.equal(v, soup([s[k] for s in states])), k  # the engine's soup, bit for bit
        torch.testing.assert_close(v, sum(s[k] for s in states) / 3, atol=1e-6, rtol=0)
    card = (tmp_path / "m" / "README.md").read_text()
    assert f"GGUF `{ggufs['Q8_0'].name}`, Q8_0" in card and f"GGUF `{f2.name}`, F16" in card
    recipe = (tmp_path / "m" / "ame_recipe.yaml").read_text()
    assert f"gguf_file: {f2.name}" in recipe and f"gguf_file: {ggufs['Q8_0'].name}" in recipe
    assert [i.quantization is not None for i in result.ingredients] == [True, True, False]
    AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert AutoTokenizer.from_pretrained(tmp_path / "m")("heat").input_ids


def test_hub_repo_gguf_file_downloads_only_that_file(ggufs, tmp_path, online):
    """{"id": repo, "gguf_file": name}: only the named file of a repo holding several is downloaded."""
    import shutil

    repo = tmp_path / "repo"
    repo.mkdir()
    for q in ("Q8_0", "F16"):
        shutil.copy(ggufs[q], repo / ggufs[q].name)
    online.state.add_folder("org/tiny-gguf", repo)
    models = [{"id": "org/tiny-gguf", "gguf_file": ggufs["Q8_0"].name}, str(ggufs["ft2"])]
    merger = AMEMerger.from_pretrained(models, cache_dir=tmp_path / "cache", endpoint=online.endpoint, device_map="cpu")
    result = merger.merge(AMEConfig.soup(), output_dir=tmp_path / "h", progress=False)
    assert online.state.bytes_sent(".gguf") == ggufs["Q8_0"].stat().st_size
    assert result.ingredients[0].sha and result.ingredients[0].gguf_file == ggufs["Q8_0"].name
    local = AMEMerger.from_pretrained([str(ggufs["Q8_0"]), str(ggufs["ft2"])], device_map="cpu").merge(
        AMEConfig.soup(), output_dir=tmp_path / "l", progress=False)
    assert local.report.tensors == result.report.tensors
    a, b = read_state(tmp_path / "h"), read_state(tmp_path / "l")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _writer(path, arch):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    return w


def _close(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_refused_by_name_before_any_tensor_is_read(ggufs, tmp_path, monkeypatch):
    """An architecture transformers cannot map, one it loads only through its packed path, a tensor
    type gguf cannot dequantize, a folder with several GGUFs, a gguf_file outside the folder: each
    refused naming the architecture / tensor / files, and no tensor byte is read."""
    monkeypatch.setattr(GGUFCheckpoint, "_raw", lambda *a: pytest.fail("a tensor was read"))
    for arch, words in (("foo-arch", "cannot map"), ("lfm2", "packed-GGUF")):
        w = _writer(tmp_path / f"{arch}.gguf", arch)
        w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
        _close(w)
        with pytest.raises(CheckpointError, match=f"{arch}.gguf.*architecture '{arch}'.*{words}"):
            Checkpoint(tmp_path / f"{arch}.gguf")
    w = _writer(tmp_path / "ints.gguf", "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.int32))
    _close(w)
    with pytest.raises(CheckpointError, match="ints.gguf: tensor 'token_embd.weight' is stored as ggml type I32"):
        AMEMerger.from_pretrained([str(tmp_path / "ints.gguf"), str(ggufs["Q8_0"])], device_map="cpu")
    two = tmp_path / "two"
    two.mkdir()
    for q in ("Q8_0", "F16"):
        os.link(ggufs[q], two / ggufs[q].name)
    with pytest.raises(CheckpointError, match=r"holds 2 GGUF files \(ft1-F16.gguf, ft1-Q8_0.gguf\).*gguf_file"):
        Checkpoint(two)
    assert Checkpoint(two / "ft1-F16.gguf").quantization.startswith("F16")
    with pytest.raises(IngredientError, match="gguf_file '../x.gguf'"):
        parse_ingredient({"id": str(two), "gguf_file": "../x.gguf"})


_RSS_SCRIPT = r"""
import json, os, sys, threading, time, psutil
from hf_ame import AMEConfig, Checkpoint, merge_checkpoints
src, root, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
paths = []
for i in range(n):
    d = os.path.join(root, f"g{i}")
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, "m.gguf")
    if not os.path.exists(p):
        os.link(src, p)
    paths.append(p)
proc = psutil.Process()
merge_checkpoints([Checkpoint(p) for p in paths[:2]], os.path.join(root, f"warm{n}"), AMEConfig.soup(), progress=False)
ckpts = [Checkpoint(p) for p in paths]  # headers (config, tokenizer, name map) read before the window
base = proc.memory_info().rss
peak, stop = [base], [False]
def watch():
    while not stop[0]:
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.001)
t = threading.Thread(target=watch); t.start()
rep = merge_checkpoints(ckpts, os.path.join(root, f"out{n}"), AMEConfig.soup(), progress=False)
stop[0] = True; t.join()
print(json.dumps({"growth_mib": (peak[0] - base) / 2**20, "read_mib": rep.bytes_read / 2**20, "stream": rep.stream}))
"""


def test_peak_memory_flat_in_the_number_of_gguf_ingredients(tmp_path):
    """The soup of 8 Q8_0 GGUFs (4-8 MiB float32 tensors once dequantized) grows RSS less than one
    such tensor more than the soup of 3: one ingredient's dequantized copy at a time (measured here:
    41 / 50 / 54 / 55 MiB for N = 2 / 3 / 6 / 10; with each GGUF keeping its last tensor, N = 6 was 98)."""
    model = tiny_llama(0, 0.0, hidden_size=1024, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8)
    src = write_llama_gguf(model, tmp_path / "src" / "m.gguf", "Q8_0")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")  # RSS follows live memory (tests/test_performance.py)
    out = {}
    for n in (3, 8):
        res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(src), str(tmp_path), str(n)], capture_output=True,
                             text=True, timeout=300, env=env)
        assert res.returncode == 0, res.stderr
        out[n] = json.loads(res.stdout.strip().splitlines()[-1])
    print("peak RSS growth:", out)
    assert out[3]["stream"] == out[8]["stream"] == "ingredient"
    assert out[8]["read_mib"] * 3 == 8 * out[3]["read_mib"]  # every ingredient's every tensor, dequantized once
    assert out[8]["growth_mib"] < out[3]["growth_mib"] + 8, out  # N copies of an 8 MiB tensor would be +40 MiB
