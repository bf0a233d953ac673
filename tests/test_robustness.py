"""Issue 28, part B: unbounded sizes and counts, silent wrong merges, signals and leftovers, raw errors.

Each case is refused naming the file, tensor or field before anything is written (or gives the clean
result); inputs and old outputs keep their bytes (sha256) and nothing is left behind."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hf_ame import AMEConfig, AMEMerger, merge_checkpoints
from hf_ame.checkpoints import Checkpoint
from hf_ame.cli import main
from hf_ame.errors import (CheckpointError, ConfigError, IncompatibleCheckpointsError, MetricError, OutputExistsError,
                           RecipeError)
from hf_ame import limits
from hf_ame.limits import MAX_EPOCHS, MAX_PAD_TO_MULTIPLE_OF
from hf_ame.search import check_space
from hf_ame.testing import make_family

from conftest import tree_sha

ROOT = Path(__file__).resolve().parent.parent
Q = "model.layers.0.self_attn.q_proj.weight"


def shas(paths) -> list:
    return [tree_sha(p) for p in paths]


def leftovers(parent) -> list:
    return sorted(p.name for p in Path(parent).iterdir() if ".hf_ame-" in p.name)


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def refused_by_cli(argv, capsys, *needles) -> str:
    """``hf-ame argv`` exits 2 with one line on stderr holding every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


# ------------------------------------------------------------------ 1. sizes and counts are bounded

def test_epochs_from_a_recipe_are_bounded_before_a_dry_run_plans(llamas, tmp_path, capsys, monkeypatch):
    before = shas(llamas)
    recipe = write_yaml(tmp_path / "r.yaml", {"hf_ame": 1, "models": llamas, "merge": {"epochs": 10 ** 12}})
    t0 = time.perf_counter()
    refused_by_cli(["merge", str(recipe), "--out", str(tmp_path / "o"), "--dry-run"], capsys,
                   "merge.epochs", f"{MAX_EPOCHS:,}")
    assert time.perf_counter() - t0 < 60  # was: a per-step list of 3e12 entries
    with pytest.raises(ConfigError, match=r"^epochs: .* got 1000000000000"):
        AMEMerger.from_pretrained(llamas, device_map="cpu").plan(AMEConfig(epochs=10 ** 12))
    # epochs within the limit but too many steps in all (batch_size 1: 3 steps per epoch)
    monkeypatch.setattr(limits, "MAX_STEPS", 20_000)
    with pytest.raises(ConfigError, match=r"epochs: 10000 epochs of 3 steps are 30,000 optimizer steps, .* batch_size"):
        merge_checkpoints(llamas, tmp_path / "o", AMEConfig(epochs=MAX_EPOCHS), progress=False)
    assert shas(llamas) == before and not (tmp_path / "o").exists() and not leftovers(tmp_path)


def test_pad_to_multiple_of_is_bounded(llamas, tmp_path, capsys):
    before = shas(llamas)
    with pytest.raises(ConfigError, match=rf"pad_to_multiple_of: expected a whole number from 1 to {MAX_PAD_TO_MULTIPLE_OF:,}"):
        AMEMerger.from_pretrained(llamas, tokenizer_source="first", pad_to_multiple_of=10 ** 9)
    recipe = write_yaml(tmp_path / "r.yaml", {"hf_ame": 1, "models": llamas,
                                              "output": {"tokenizer_source": "first", "pad_to_multiple_of": 10 ** 9}})
    with pytest.raises(RecipeError, match=r"output\.pad_to_multiple_of: .* got 1000000000"):
        AMEMerger.from_recipe(recipe)
    refused_by_cli(["merge", *llamas, "--tokenizer-source", "first", "--pad-to-multiple-of", "1000000000",
                    "--out", str(tmp_path / "o")], capsys, "pad_to_multiple_of")
    assert shas(llamas) == before and not (tmp_path / "o").exists() and not leftovers(tmp_path)


def test_karcher_max_iter_infinite_is_refused(llamas, tmp_path, capsys):
    before = shas(llamas)
    recipe = tmp_path / "mk.yml"  # a mergekit config, as it would be shared: YAML's .inf
    recipe.write_text(f"merge_method: karcher\ndtype: float32\nparameters: {{max_iter: .inf}}\n"
                      f"models:\n" + "".join(f"  - model: {p}\n" for p in llamas))
    refused_by_cli(["merge", str(recipe), "--out", str(tmp_path / "o")], capsys, "method_kwargs.max_iter",
                   "from 1 to 10,000", "inf")
    with pytest.raises(ConfigError, match=r"method_kwargs\.max_iter: .* got 100000"):
        AMEConfig(method="karcher", method_kwargs={"max_iter": 100_000}).validate()
    assert shas(llamas) == before and not (tmp_path / "o").exists() and not leftovers(tmp_path)


def test_seed_out_of_range_is_refused_before_any_header_is_read(llamas, tmp_path, monkeypatch):
    import hf_ame.checkpoints as checkpoints

    recipe = write_yaml(tmp_path / "r.yaml", {"hf_ame": 1, "models": llamas, "merge": {"seed": 10 ** 40}})
    reads = []
    monkeypatch.setattr(checkpoints, "_read_header", lambda *a, **k: reads.append(a) or 1 / 0)
    with pytest.raises(RecipeError, match=r"merge\.seed: expected a whole number .* got 10{40}$"):
        AMEMerger.from_recipe(recipe)
    assert not reads  # was: every header read, then "Overflow when unpacking long long"
    with pytest.raises(ConfigError, match=r"search\.seed: .* got 10{40}$"):
        check_space({"seed": [0, 10 ** 40]}, None)
    with pytest.raises(ConfigError, match=r"search: the grid has 1,100 points, more than the 1,000"):
        check_space({"lr": [1e-3] * 100, "epochs": list(range(1, 12))}, None)
    with pytest.raises(ConfigError, match=r"n_trials: expected a whole number from 1 to 1,000"):
        check_space({"lr": {"low": 1e-4, "high": 1e-2}}, 10 ** 6)


def _fp8(src: str, dst: Path, block=(16, 16), scale_shape=None) -> str:
    """``src`` saved as transformers' fp8 (q_proj weights float8 with a weight_scale_inv per tile);
    ``scale_shape``: give the scales another shape (a broken file)."""
    import shutil

    shutil.copytree(src, dst)
    state = load_file(str(Path(src) / "model.safetensors"))
    out = {}
    for k, w in state.items():
        if k.endswith("q_proj.weight"):
            r, c = w.shape
            tiles = w.reshape(r // block[0], block[0], c // block[1], block[1])
            scale = tiles.abs().amax(dim=(1, 3)) / 448.0
            out[k] = (tiles / scale[:, None, :, None]).reshape(r, c).to(torch.float8_e4m3fn)
            out[k + "_scale_inv"] = scale if scale_shape is None else scale.reshape(-1)[:1].reshape(scale_shape)
        else:
            out[k] = w
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def test_fp8_block_size_zero_is_refused(llamas, tmp_path):
    q = _fp8(llamas[0], tmp_path / "q")
    cfg = json.loads((Path(q) / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [0, 16]
    (Path(q) / "config.json").write_text(json.dumps(cfg))
    before = shas([q, *llamas])
    with pytest.raises(CheckpointError, match=r"quantization_config\.weight_block_size must be two whole numbers from 1 "
                                              r"to 65,536 .* got \[0, 16\]"):
        AMEMerger.from_pretrained([q, llamas[1]], device_map="cpu")
    with pytest.raises(CheckpointError, match=r"weight_block_size"):
        merge_checkpoints([q, llamas[1]], tmp_path / "o", AMEConfig.soup(), progress=False)
    assert shas([q, *llamas]) == before and not (tmp_path / "o").exists() and not leftovers(tmp_path)


# ------------------------------------------------------------------ 2. no silent wrong merges

def test_linear_weights_summing_to_zero_are_refused(llamas, tmp_path, capsys):
    before = shas(llamas)
    cfg = write_yaml(tmp_path / "mergekit_config.yml", {
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": llamas[0], "parameters": {"weight": 1.0}}, {"model": llamas[1], "parameters": {"weight": -1.0}}]})
    refused_by_cli(["merge", str(cfg), "--out", str(tmp_path / "o")], capsys, "method_kwargs.weight",
                   "sum to 0", "'linear' divides by their sum")
    for method, kw in (("linear", {"weight": 0.0}), ("ties", {"weight": [0.5, -0.5]}),
                       ("multislerp", {"weight": [1, -1]})):
        with pytest.raises(ConfigError, match=r"method_kwargs\.weight: the weights .* sum to 0"):
            AMEMerger.from_pretrained(llamas[:2], device_map="cpu", base_model=llamas[2]).merge(
                AMEConfig.one_shot(method, **kw), output_dir=tmp_path / "o", progress=False)
    # normalize: false sums as asked (nothing to divide by)
    AMEConfig.one_shot("linear", weight=[1.0, -1.0], normalize=False)
    assert shas(llamas) == before and not (tmp_path / "o").exists() and not leftovers(tmp_path)


def test_duplicate_label_names_are_refused(tmp_path):
    berts = [str(p) for p in make_family("bert", tmp_path / "b", 2, seed=5)]
    for p in berts:  # the same broken id2label in both: before, row 2 was dropped and row 0 taken from one model
        cfg = json.loads((Path(p) / "config.json").read_text())
        cfg["id2label"], cfg["label2id"] = {"0": "pos", "1": "neg", "2": "pos"}, {"pos": 2, "neg": 1}
        (Path(p) / "config.json").write_text(json.dumps(cfg))
    before = shas(berts)
    for heads in (None, "union", 1):
        with pytest.raises(IncompatibleCheckpointsError,
                           match=r"model '.*ft-0': config\.json's id2label names 'pos' twice \(ids 0 and 2\)"):
            AMEMerger.from_pretrained(berts, device_map="cpu", heads=heads)
    out = AMEMerger.from_pretrained(berts, device_map="cpu", heads="drop").merge(  # no rows matched: fine
        AMEConfig.soup(), output_dir=tmp_path / "o", progress=False)
    assert "classifier.weight" not in Checkpoint(out.output_dir).tensors
    assert shas(berts) == before and not leftovers(tmp_path)


def test_fp8_scale_of_the_wrong_shape_is_refused(llamas, tmp_path):
    q = _fp8(llamas[0], tmp_path / "q", scale_shape=(1, 1))  # 32 x 32 in tiles of 16 needs 2 x 2 scales
    before = shas([q, *llamas])
    with pytest.raises(CheckpointError, match=rf"tensor '{Q}_scale_inv' has shape \[1, 1\], but its weight '{Q}' of "
                                              r"shape \[32, 32\] needs shape \[2, 2\] \(tiles of \[16, 16\]\)"):
        AMEMerger.from_pretrained([q, llamas[1]], device_map="cpu")
    with pytest.raises(CheckpointError, match=rf"{Q}_scale_inv"):
        merge_checkpoints([q, llamas[1]], tmp_path / "o", AMEConfig.soup(), progress=False)
    good = _fp8(llamas[0], tmp_path / "good")  # the right shape still merges
    merge_checkpoints([good, llamas[1]], tmp_path / "ok", AMEConfig.soup(), progress=False)
    assert shas([q, *llamas]) == before and not (tmp_path / "o").exists() and not leftovers(tmp_path)


# ------------------------------------------------------------------ 3. signals and leftovers

def _env(tmp: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}


def _default_sigint() -> None:
    """A test run started in the background ignores SIGINT, and so would the CLI it starts (as Python does)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(predicate, proc, timeout=180.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "timed out"
        time.sleep(0.2)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signals_end_a_merge_like_an_error(llamas, tmp_path, sig, code):
    out = tmp_path / "o"
    merge_checkpoints(llamas, out, AMEConfig.soup(), progress=False)  # an old output, replaced with --overwrite
    before, old = shas(llamas), tree_sha(out)
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "hf_ame", "merge", *llamas, "--out", str(out), "--overwrite",
                             "--epochs", str(MAX_EPOCHS), "--no-progress", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path / "tmp"),
                            preexec_fn=_default_sigint)
    try:
        _wait_for(lambda: any("hf_ame-tmp-" in n for n in leftovers(tmp_path)), proc)
        time.sleep(1.0)  # inside the merge's steps
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert err.count("\n") == 1 and f"interrupted by {sig.name}" in err and "Traceback" not in err, err
    assert not leftovers(tmp_path)  # staging folders and lock files
    assert tree_sha(out) == old and shas(llamas) == before


_SEARCH = textwrap.dedent("""
    import sys, time
    from datasets import Dataset
    from hf_ame import AMEConfig, AMEMerger

    calls = []
    def slow(model, ds):  # the ingredients score at once; each trial takes minutes
        calls.append(1)
        if len(calls) > 3:
            time.sleep(600)
        return 0.5

    AMEMerger.from_pretrained(sys.argv[1:4], device_map="cpu").merge(
        AMEConfig(), order_by=slow, eval_dataset=Dataset.from_dict({"x": [1]}), search={"lr": [1e-3]},
        stream="tensor", output_dir=sys.argv[4], score_cache=False, progress=False)
""")


def test_a_killed_search_leaves_a_trial_folder_the_next_run_removes(llamas, tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    before = shas(llamas)
    proc = subprocess.Popen([sys.executable, "-c", _SEARCH, *llamas, str(tmp_path / "o")], env=_env(tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trials = lambda: [p for p in tmp.glob(f"hf_ame-search-{proc.pid}-*/trial-0/model.safetensors")]  # noqa: E731
    try:
        _wait_for(lambda: trials(), proc)
        proc.kill()  # kill -9: no clean-up runs
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    stale = [p.parent.parent for p in trials()]
    assert len(stale) == 1 and stale[0].is_dir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with pytest.warns(UserWarning, match=rf"removing 1 folder\(s\) left in .* by a killed hf_ame run: {stale[0].name}"):
        result = AMEMerger.from_pretrained(llamas, device_map="cpu").merge(AMEConfig.soup(), progress=False)
    assert not stale[0].exists()
    assert result.output_dir.parent.name.startswith(f"hf_ame-merge-{os.getpid()}-")  # found the same way if killed
    del result
    # the killed run's staging folder beside its output goes with the next write into it, as before
    assert any("hf_ame-tmp-" in n for n in leftovers(tmp_path))
    with pytest.warns(UserWarning, match=r"left by an interrupted write"):
        merge_checkpoints(llamas, tmp_path / "o", AMEConfig.soup(), progress=False)
    assert not leftovers(tmp_path) and shas(llamas) == before


def test_output_that_is_the_current_folder_is_refused_before_the_merge(llamas, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "mine.txt").write_text("keep")
    monkeypatch.chdir(work)
    before = shas(llamas)
    for out in (".", "..", str(work), "sub/.."):
        refused_by_cli(["merge", *llamas, "--out", out, "--overwrite", "--no-progress"], capsys,
                       "is the current folder or one of its parents")
    with pytest.raises(OutputExistsError, match="current folder"):
        AMEMerger.from_pretrained(llamas, device_map="cpu").plan(output_dir=".", overwrite=True)
    assert tree_sha(work) == {"mine.txt": hashlib.sha256(b"keep").hexdigest()} and not leftovers(work.parent)
    assert shas(llamas) == before


# ------------------------------------------------------------------ 4. errors name the culprit

def test_config_json_that_is_a_list_is_refused_naming_it(llamas, tmp_path, capsys):
    (Path(llamas[1]) / "config.json").write_text("[1, 2]")
    before = shas(llamas)
    refused_by_cli(["merge", *llamas, "--out", str(tmp_path / "o")], capsys, "ft-1", "config.json is a JSON list")
    assert shas(llamas) == before and not (tmp_path / "o").exists() and not leftovers(tmp_path)


def test_index_with_a_weight_map_value_that_is_not_a_string(tmp_path, capsys):
    paths = [str(p) for p in make_family("llama", tmp_path / "f", 2, seed=6, max_shard_size="20KB")]
    index = Path(paths[1]) / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = sorted(data["weight_map"])[0]
    data["weight_map"][name] = ["model-00001-of-00002.safetensors"]
    index.write_text(json.dumps(data))
    before = shas(paths)
    err = refused_by_cli(["merge", *paths, "--out", str(tmp_path / "o")], capsys, "model.safetensors.index.json",
                         f"weight_map['{name}']", "not the name of a weight file")
    assert "unhashable" not in err
    assert shas(paths) == before and not (tmp_path / "o").exists() and not leftovers(tmp_path)


def _adapter(base: str, folder: Path, rank_b: int = 4) -> str:
    """A LoRA adapter on q_proj of layer 0, written as peft writes one (B's rank ``rank_b``)."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
        "base_model_name_or_path": base}))
    g = torch.Generator().manual_seed(0)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{key}.lora_A.weight": torch.randn(4, 32, generator=g),
               f"{key}.lora_B.weight": torch.randn(32, rank_b, generator=g)}, folder / "adapter_model.safetensors")
    return str(folder)


def test_lora_adapter_whose_ranks_disagree_is_refused(llamas, tmp_path, capsys):
    bad = _adapter(llamas[0], tmp_path / "ad", rank_b=3)
    before = shas([bad, *llamas])
    refused_by_cli(["merge", bad, *llamas[1:], "--out", str(tmp_path / "o")], capsys, "adapter_model.safetensors",
                   "'model.layers.0.self_attn.q_proj' has rank 4 in its A tensor (4, 32) but 3 in its B tensor")
    ok = _adapter(llamas[0], tmp_path / "ok")  # the same adapter with matching ranks merges
    merge_checkpoints([ok, *llamas[1:]], tmp_path / "m", AMEConfig.soup(), progress=False)
    assert shas([bad, *llamas]) == before and not (tmp_path / "o").exists() and not leftovers(tmp_path)


def test_truncated_adapter_file_is_refused(llamas, tmp_path, capsys):
    ad = Path(_adapter(llamas[0], tmp_path / "ad"))
    f = ad / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    before = shas([ad, *llamas])
    refused_by_cli(["merge", str(ad), *llamas[1:], "--out", str(tmp_path / "o")], capsys, str(f),
                   "truncated or padded file")
    assert shas([ad, *llamas]) == before and not (tmp_path / "o").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("content,what", [
    ("[1, 2]", "is a JSON list, not an object of entries"),
    ('{"abc": {"score": "high"}}', "entry 'abc' has no numeric score"),
    ('{"abc": ', "cannot be read as JSON"),
], ids=["list", "score-not-a-number", "not-json"])
def test_malformed_score_cache_is_refused_naming_it(llamas, tmp_path, content, what):
    from datasets import Dataset

    cache = tmp_path / "scores.json"
    cache.write_text(content)
    before = shas(llamas)
    with pytest.raises(MetricError, match=rf"score cache {cache} {what}.*score_cache=False"):
        AMEMerger.from_pretrained(llamas, device_map="cpu").merge(
            AMEConfig.soup(), order_by=lambda model, ds: 0.5, eval_dataset=Dataset.from_dict({"x": [1]}),
            score_cache=cache, output_dir=tmp_path / "o", progress=False)
    assert cache.read_text() == content  # not overwritten
    assert shas(llamas) == before and not (tmp_path / "o").exists() and not leftovers(tmp_path)


def test_push_with_an_invalid_repo_id_is_refused_before_the_merge(llamas, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    merge_checkpoints(llamas, out, AMEConfig.soup(), progress=False)
    before, old = shas(llamas), tree_sha(out)
    import hf_ame.merger as merger

    monkeypatch.setattr(merger.AMEMerger, "merge", lambda *a, **k: 1 / 0)  # never reached
    refused_by_cli(["merge", *llamas, "--out", str(out), "--overwrite", "--push", "me/not a valid id"], capsys,
                   "--push:", "'me/not a valid id'")
    assert tree_sha(out) == old and shas(llamas) == before and not leftovers(tmp_path)
