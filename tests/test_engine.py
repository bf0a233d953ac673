"""The streaming engine on real transformers checkpoints built here."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import read_state
from hf_ame import (AMEConfig, Checkpoint, CheckpointError, ConfigError, IncompatibleCheckpointsError, OutputExistsError,
                    list_optimizers, merge_checkpoints)
from hf_ame.testing import make_family

SOUP = AMEConfig.soup()
AUTO = {"llama": "AutoModelForCausalLM", "vit": "AutoModelForImageClassification",
        "bert": "AutoModelForSequenceClassification"}


def _mean_state(paths):
    states = [read_state(p) for p in paths]
    return {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}


@pytest.mark.parametrize("kind", ["llama", "vit", "bert"])
def test_soup_settings_reproduce_the_plain_average(families, tmp_path, kind):
    paths = families[kind]
    report = merge_checkpoints(paths, tmp_path / "out", SOUP.replace(shuffle=True, batch_size=2), progress=False)
    merged = read_state(tmp_path / "out")
    expect = _mean_state(paths)
    assert merged.keys() == expect.keys()  # merged by the names in the files (ViT's attention.attention.*)
    for k in expect:
        torch.testing.assert_close(merged[k], expect[k], atol=1e-6, rtol=1e-5, msg=k)
    assert report.merged_tensors == len(expect) and report.copied_tensors == 0
    assert report.bytes_read == sum(os.path.getsize(Path(p) / "model.safetensors") for p in paths) - 4 * _header_bytes(paths[0])


def _header_bytes(folder):
    with open(Path(folder) / "model.safetensors", "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


@pytest.mark.parametrize("kind", ["llama", "vit", "bert"])
def test_merged_folder_loads_and_runs(families, tmp_path, kind):
    import transformers

    out = tmp_path / "m"
    merge_checkpoints(families[kind], out, AMEConfig(optimizer="adamw", lr=1e-3, epochs=2, batch_size=2), progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "float32" and cfg["transformers_version"] == transformers.__version__
    assert cfg["architectures"] == json.loads((Path(families[kind][0]) / "config.json").read_text())["architectures"]
    model = getattr(transformers, AUTO[kind]).from_pretrained(out)
    if kind == "vit":
        y = model(pixel_values=torch.randn(2, 1, 8, 8)).logits
    else:
        y = model(input_ids=torch.tensor([[1, 5, 7, 9]])).logits
    assert torch.isfinite(y).all()
    if kind == "llama":  # tied head: stays tied, written once
        assert "lm_head.weight" not in read_state(out)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert (out / "generation_config.json").exists()


def test_identical_ingredients_unchanged_for_every_builtin_optimizer(tmp_path):
    paths = make_family("bert", tmp_path / "same", 3, seed=4, identical=True)
    ref = read_state(paths[0])
    for entry in list_optimizers():
        kwargs = {"weight_decay": 0.0} if "weight_decay" in entry.defaults() else {}
        out = tmp_path / f"o-{entry.name}"
        merge_checkpoints(paths, out, AMEConfig(optimizer=entry.name, lr=0.05, epochs=2, optimizer_kwargs=kwargs),
                          progress=False)
        merged = read_state(out)
        for k in ref:
            torch.testing.assert_close(merged[k], ref[k], atol=1e-6, rtol=0, msg=f"{entry.name}: {k}")


def test_same_seed_bit_identical_different_seed_differs(families, tmp_path):
    cfg = AMEConfig(optimizer="adam", lr=1e-2, epochs=3, batch_size=1, shuffle=True, seed=1)
    paths = families["vit"]
    merge_checkpoints(paths, tmp_path / "a", cfg, progress=False)
    merge_checkpoints(paths, tmp_path / "b", cfg, progress=False)
    merge_checkpoints(paths, tmp_path / "c", cfg.replace(seed=2), progress=False)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    a, c = read_state(tmp_path / "a"), read_state(tmp_path / "c")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_sharded_inputs_and_outputs(families, tmp_path):
    sharded = make_family("llama", tmp_path / "sh", 4, seed=1, max_shard_size="30KB")
    assert (sharded[0] / "model.safetensors.index.json").exists()
    cfg = AMEConfig(optimizer="adamw", lr=1e-3, epochs=2)
    merge_checkpoints(families["llama"], tmp_path / "single", cfg, progress=False)
    rep = merge_checkpoints(sharded, tmp_path / "fromsharded", cfg, progress=False, max_shard_size="20KB")
    a, b = read_state(tmp_path / "single"), read_state(tmp_path / "fromsharded")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    index = json.loads((tmp_path / "fromsharded/model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == sorted(p.name for p in (tmp_path / "fromsharded").glob("*.safetensors"))
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in b.values())
    for s in shards:  # every shard is within the limit unless it holds a single larger tensor
        st = load_file(tmp_path / "fromsharded" / s)
        assert len(st) == 1 or sum(v.numel() * v.element_size() for v in st.values()) <= 20_000
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "fromsharded")
    assert set(rep.files) >= set(shards) | {"model.safetensors.index.json", "config.json"}


def test_output_dtype_and_bf16_inputs(tmp_path):
    paths = make_family("llama", tmp_path / "bf", 3, seed=2, dtype=torch.bfloat16)
    merge_checkpoints(paths, tmp_path / "keep", SOUP, progress=False)
    merge_checkpoints(paths, tmp_path / "f32", SOUP, progress=False, dtype="float32")
    keep, f32 = read_state(tmp_path / "keep"), read_state(tmp_path / "f32")
    states = [read_state(p) for p in paths]
    for k in keep:
        assert keep[k].dtype == torch.bfloat16 and f32[k].dtype == torch.float32
        exact = torch.stack([s[k].float() for s in states]).mean(0)
        torch.testing.assert_close(f32[k], exact, atol=1e-6, rtol=1e-6)  # fp32 math, no bf16 round trip
        assert torch.equal(keep[k], f32[k].to(torch.bfloat16))  # one rounding, at the end
    assert json.loads((tmp_path / "keep/config.json").read_text())["dtype"] == "bfloat16"


def _ckpt_with_buffer(folder, value, counts):
    folder.mkdir(parents=True)
    save_file({"w": torch.full((3, 3), float(value)), "counts": counts}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return folder


def test_integer_buffers_are_copied_after_checking_agreement(tmp_path):
    c = torch.arange(5, dtype=torch.int64)
    a = _ckpt_with_buffer(tmp_path / "a", 1, c)
    b = _ckpt_with_buffer(tmp_path / "b", 3, c)
    rep = merge_checkpoints([a, b], tmp_path / "out", SOUP, progress=False)
    out = read_state(tmp_path / "out")
    assert torch.equal(out["counts"], c) and torch.allclose(out["w"], torch.full((3, 3), 2.0))
    assert rep.copied_tensors == 1 and rep.merged_tensors == 1
    d = _ckpt_with_buffer(tmp_path / "d", 3, c + 1)
    with pytest.raises(IncompatibleCheckpointsError, match=r"non-floating tensor 'counts'.*'.*d'"):
        merge_checkpoints([a, d], tmp_path / "out2", SOUP, progress=False)
    assert not (tmp_path / "out2").exists()
    assert not list(tmp_path.glob(".out2*"))  # the staging folder is gone too


def test_pytorch_bin_checkpoint_is_read_with_weights_only(families, tmp_path):
    src = Path(families["bert"][1])
    binckpt = tmp_path / "bin"
    binckpt.mkdir()
    shutil.copy(src / "config.json", binckpt)
    torch.save(read_state(src), binckpt / "pytorch_model.bin")
    paths = [families["bert"][0], binckpt]
    merge_checkpoints(paths, tmp_path / "out", SOUP, progress=False)
    expect = _mean_state([families["bert"][0], src])
    got = read_state(tmp_path / "out")
    for k in expect:
        torch.testing.assert_close(got[k], expect[k])
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(src / "config.json", evil)
    torch.save({"w": torch.zeros(1), "obj": _Unpicklable()}, evil / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"evil.*weights_only=True"):
        merge_checkpoints([families["bert"][0], evil], tmp_path / "out3", SOUP, progress=False)


class _Unpicklable:
    pass


def test_read_flat_ranges_equal_the_tensor(families, tmp_path):
    """Checkpoint.read_flat (preadv at the header's offsets) returns exactly the elements get_tensor
    would, for sharded safetensors and for .bin, and counts the bytes it read."""
    sharded = make_family("llama", tmp_path / "sh", 1, seed=3, max_shard_size="30KB")[0]
    ck = Checkpoint(sharded)
    assert len(ck.weight_files()) > 1 and all(i.offset > 8 for i in ck.tensors.values())
    for name, info in ck.tensors.items():
        full = ck.get_tensor(name).reshape(-1)
        n = info.numel
        before = ck.bytes_read
        for a, b in ((0, n), (n // 3, n // 2), (n - 1, n), (5, 5)):
            part = ck.read_flat(name, a, b)
            assert part.dtype == info.dtype and torch.equal(part, full[a:b]), (name, a, b)
        assert ck.bytes_read - before == (n + (n // 2 - n // 3) + 1) * full.element_size()
    # where the OS has no preadv (macOS, Windows): seek + readinto, same bytes
    with pytest.MonkeyPatch.context() as mp:
        mp.delattr(os, "preadv")
        first = next(iter(ck.tensors))
        assert torch.equal(ck.read_flat(first, 3, 40), ck.get_tensor(first).reshape(-1)[3:40])
    with pytest.raises(ValueError, match="is outside tensor"):
        ck.read_flat(name, 0, 10**9)
    with pytest.raises(CheckpointError, match="has no tensor 'nope'"):
        ck.read_flat("nope", 0, 1)
    ck.close()
    src = Path(families["bert"][1])
    binckpt = tmp_path / "bin"
    binckpt.mkdir()
    shutil.copy(src / "config.json", binckpt)
    torch.save(read_state(src), binckpt / "pytorch_model.bin")
    cb = Checkpoint(binckpt)
    for name in list(cb.tensors)[:3]:
        assert torch.equal(cb.read_flat(name, 1, 7), cb.get_tensor(name).reshape(-1)[1:7])


# ---------------------------------------------------------------- bad input, before any output
@pytest.fixture
def existing_out(tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    return out


def _intact(out):
    return sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_existing_output_is_refused_without_overwrite(families, existing_out):
    with pytest.raises(OutputExistsError, match="overwrite"):
        merge_checkpoints(families["bert"], existing_out, SOUP, progress=False)
    assert _intact(existing_out)


def test_overwrite_replaces_only_on_success(families, tmp_path, existing_out):
    vit = families["vit"]
    with pytest.raises(IncompatibleCheckpointsError, match=r"model_type 'vit' but .* has 'bert'"):
        merge_checkpoints([families["bert"][0], vit[0]], existing_out, SOUP, overwrite=True, progress=False)
    assert _intact(existing_out)
    merge_checkpoints(families["bert"], existing_out, SOUP, overwrite=True, progress=False)
    assert not (existing_out / "keep.txt").exists() and (existing_out / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".existing")]


def test_shape_mismatch_names_model_and_tensor(families, tmp_path, existing_out):
    other = make_family("bert", tmp_path / "wide", 1, seed=1, num_labels=5)[0]
    with pytest.raises(IncompatibleCheckpointsError) as info:
        merge_checkpoints([families["bert"][0], other], existing_out, SOUP, overwrite=True, progress=False)
    msg = str(info.value)
    assert "classifier.bias" in msg and str(other) in msg and "(5)" in msg and "(3)" in msg
    assert _intact(existing_out)


def test_missing_tensor_and_dtype_mismatch(families, tmp_path):
    a = families["bert"][0]
    st = read_state(a)
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy(Path(a) / "config.json", b)
    st2 = dict(st)
    st2.pop("classifier.bias")
    save_file(st2, b / "model.safetensors")
    with pytest.raises(IncompatibleCheckpointsError, match=r"lacks 1 tensor.*'classifier.bias'"):
        merge_checkpoints([a, b], tmp_path / "o", SOUP, progress=False)
    st3 = {k: (v.to(torch.int32) if k == "classifier.bias" else v) for k, v in st.items()}
    save_file(st3, b / "model.safetensors")
    with pytest.raises(IncompatibleCheckpointsError, match=r"'classifier.bias' has dtype int32 in model '.*b'"):
        merge_checkpoints([a, b], tmp_path / "o", SOUP, progress=False)
    assert not (tmp_path / "o").exists()
    # another floating dtype merges (community uploads differ; tests/test_community.py), in the first one's dtype
    save_file({k: (v.half() if k == "classifier.bias" else v) for k, v in st.items()}, b / "model.safetensors")
    merge_checkpoints([a, b], tmp_path / "o", SOUP, progress=False)
    assert read_state(tmp_path / "o")["classifier.bias"].dtype == st["classifier.bias"].dtype


def test_missing_folder_no_weights_and_too_few(families, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder.*nope"):
        merge_checkpoints([families["bert"][0], tmp_path / "nope"], tmp_path / "o", SOUP, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no weights found in .*empty.*config.json"):
        merge_checkpoints([families["bert"][0], empty], tmp_path / "o", SOUP, progress=False)
    with pytest.raises(IncompatibleCheckpointsError, match="at least 2 ingredients, got 1"):
        merge_checkpoints([families["bert"][0]], tmp_path / "o", SOUP, progress=False)
    with pytest.raises(ConfigError, match="^optimizer: unknown optimizer"):
        merge_checkpoints(families["bert"], tmp_path / "o", AMEConfig(optimizer="sgdd"), progress=False)
    with pytest.raises(ConfigError, match="^pivot: 'nowhere'"):
        merge_checkpoints(families["bert"], tmp_path / "o", AMEConfig(pivot="nowhere"), progress=False)
    assert not (tmp_path / "o").exists()


def test_base_checkpoint_pivot(families, tmp_path):
    base = make_family("bert", tmp_path / "base", 1, seed=1, noise=0.0)[0]
    cfg = AMEConfig(optimizer="sgd", lr=1.0, lr_schedule="constant", adaptive_pivot=False, pivot=str(base), shuffle=False)
    merge_checkpoints(families["bert"], tmp_path / "o", cfg, progress=False)
    got, expect = read_state(tmp_path / "o"), _mean_state(families["bert"])
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], atol=1e-6, rtol=1e-5)
    # The pivot really was the base: one step of lr 0.5 lands half-way between base and soup.
    merge_checkpoints(families["bert"], tmp_path / "half", cfg.replace(lr=0.5), progress=False)
    half, b = read_state(tmp_path / "half"), read_state(base)
    k = "classifier.weight"
    torch.testing.assert_close(half[k], (b[k] + expect[k]) / 2, atol=1e-6, rtol=1e-5)


def test_memory_stays_near_a_few_tensors_not_n_models(tmp_path):
    """8 ingredients of 8 x 4 MiB tensors (32 MiB each, 256 MiB in all): peak RSS growth of the
    merge must stay far below N x model (and near (2N + optimizer state) x largest tensor)."""
    script = r"""
import json, os, resource, sys, torch
from safetensors.torch import save_file
root = sys.argv[1]
paths = []
for i in range(8):
    d = os.path.join(root, f"m{i}"); os.makedirs(d)
    g = torch.Generator().manual_seed(i)
    save_file({f"layer.{j}.weight": torch.randn(1024, 1024, generator=g) for j in range(8)}, os.path.join(d, "model.safetensors"))
    json.dump({"model_type": "toy"}, open(os.path.join(d, "config.json"), "w"))
    paths.append(d)
import gc; gc.collect()
from hf_ame import AMEConfig, merge_checkpoints
import psutil
proc = psutil.Process()
merge_checkpoints(paths[:2], os.path.join(root, "warm"), AMEConfig(optimizer="adam"), progress=False)  # warm-up: imports (torch.optim loads torch._dynamo), allocator
base = proc.memory_info().rss
peak = [base]
import threading, time
stop = False
def watch():
    while not stop:
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.002)
t = threading.Thread(target=watch); t.start()
merge_checkpoints(paths, os.path.join(root, "out"), AMEConfig(optimizer="adam", lr=1e-3, epochs=2), progress=False)
stop = True; t.join()
print(json.dumps({"base_mib": base / 2**20, "growth_mib": (peak[0] - base) / 2**20}))
"""
    # fixed glibc mmap threshold: RSS follows live memory, not the allocator's retained heap (see test_performance)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env=env)
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    tensor_mib, n = 4, 8
    print("memory:", m)
    # current + prefetched ingredient copies (2N), merge + grad + 2 Adam states + output cast: ~ (2N + 5) tensors
    assert m["growth_mib"] < (2 * n + 8) * tensor_mib, m
    assert m["growth_mib"] < 0.5 * n * 8 * tensor_mib, m


def test_special_cases_2_and_3_on_real_checkpoints(families, tmp_path):
    paths = families["vit"]
    n = len(paths)
    expect = _mean_state(paths)
    # case 2: SGD, harmonic lr 1/t, zeta = N, B = 1, one epoch, adaptive pivot, any w_0 -> the running mean
    harmonic = AMEConfig(optimizer="sgd", lr=1.0, lr_schedule="harmonic", amplification=float(n), batch_size=1,
                         epochs=1, shuffle=True, seed=5, adaptive_pivot=True, pivot=2)
    merge_checkpoints(paths, tmp_path / "h", harmonic, progress=False)
    got = read_state(tmp_path / "h")
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], atol=1e-5, rtol=1e-4, msg=k)
    # case 3: Adagrad with eps far above the accumulated pseudogradients and lr = eta * eps ~ SGD at eta
    common = dict(lr_schedule="harmonic", epochs=2, batch_size=2, pivot="first")
    merge_checkpoints(paths, tmp_path / "sgd", AMEConfig(optimizer="sgd", lr=0.5, **common), progress=False)
    eps = 1e6
    merge_checkpoints(paths, tmp_path / "ada", AMEConfig(optimizer="adagrad", lr=0.5 * eps, optimizer_kwargs={"eps": eps},
                                                         **common), progress=False)
    a, b = read_state(tmp_path / "sgd"), read_state(tmp_path / "ada")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
