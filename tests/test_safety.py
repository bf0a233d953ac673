"""Recipes from strangers and unlucky runs: no code runs without consent, bad files are refused
naming the culprit, no failure loses or half-writes data, nothing is left behind."""
import json
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
import yaml

from hf_ame import AMEConfig, AMEMerger, merge_checkpoints
from hf_ame.checkpoints import Checkpoint, CheckpointError
from hf_ame.cli import main
from hf_ame.merger import MergeResult
from hf_ame.output import OutputExistsError
from hf_ame.recipe import RecipeError, load_recipe

from conftest import tree_sha


def leftovers(parent) -> list:
    return sorted(p.name for p in Path(parent).iterdir() if ".hf_ame-" in p.name)


def write_recipe(path, models, **sections) -> Path:
    path.write_text(yaml.safe_dump({"hf_ame": 1, "models": list(models), **sections}))
    return path


# ------------------------------------------------------------------ consent: no code from a recipe

def test_recipe_cannot_turn_on_remote_code(llamas, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", llamas, load={"trust_remote_code": True})
    with pytest.raises(RecipeError, match=r"load\.trust_remote_code: a recipe cannot turn on .*--trust-remote-code"):
        load_recipe(recipe)
    assert main(["merge", str(recipe), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "load.trust_remote_code" in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    assert load_recipe(recipe, trust_remote_code=True).load["trust_remote_code"] is True  # the caller's consent


def test_recipe_metric_script_is_not_run(llamas, tmp_path):
    marker = tmp_path / "ran"
    script = tmp_path / "evil_metric.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('x')\nimport evaluate\n")
    for metric in (str(script), "someone/metric"):
        recipe = write_recipe(tmp_path / "r.yaml", llamas,
                              ordering={"metric": metric, "dataset": {"path": str(tmp_path)}})
        with pytest.raises(RecipeError, match=r"ordering\.metric: .* would run code"):
            AMEMerger.from_recipe(recipe, device_map="cpu")
    assert not marker.exists()
    ok = write_recipe(tmp_path / "r2.yaml", llamas, ordering={"metric": "accuracy", "dataset": {"path": str(tmp_path)}})
    assert load_recipe(ok).ordering["metric"] == "accuracy"  # evaluate's own names stay allowed


def test_recipe_amplification_callable_is_not_imported(llamas, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", llamas, merge={"amplification": "os:_exit"})
    assert main(["merge", str(recipe), "--out", str(tmp_path / "o"), "--no-progress"]) == 2  # the process is alive
    assert "merge.amplification: 'os:_exit' would import and call" in capsys.readouterr().err
    fine = write_recipe(tmp_path / "r2.yaml", llamas, merge={"amplification": "hf_ame.schedules:amplification"})
    assert callable(load_recipe(fine, trust_remote_code=True).merge.amplification)


def test_recipe_hub_repo_id_is_validated_before_any_work(llamas, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", llamas, hub={"repo_id": "../../etc"})
    with pytest.raises(RecipeError, match=r"hub\.repo_id: .*'\.\./\.\./etc'"):
        load_recipe(recipe)


# ------------------------------------------------------------------ files validated as safetensors does

def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    new = header if isinstance(header, bytes) else json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _overlap(h):
    names = [k for k in h if k != "__metadata__"]
    a, b = sorted(names, key=lambda k: h[k]["data_offsets"][0])[:2]
    size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
    h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + size]  # on top of a's bytes
    return h


@pytest.mark.parametrize("edit,match", [
    (_overlap, r"tensor '.*' overlaps the previous tensor"),
    (lambda h: list(h), r"a JSON list, not an object"),
    (lambda h: {k: ({kk: vv for kk, vv in v.items() if kk != "shape"} if k != "__metadata__" else v) for k, v in h.items()},
     r"needs dtype, shape and data_offsets"),
    (lambda h: b"[" * 100000 + b"]" * 100000, r"corrupt safetensors header \(RecursionError"),
    (lambda h: {**h, "extra": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, r"tensor 'extra' has shape \[-1\]"),
], ids=["overlap", "json-list", "no-shape", "deep-nesting", "negative-shape"])
def test_bad_headers_are_refused_naming_the_file(llamas, tmp_path, capsys, edit, match):
    f = Path(llamas[1]) / "model.safetensors"
    _rewrite_header(f, edit)
    with pytest.raises(CheckpointError, match=match) as err:
        Checkpoint(llamas[1])
    assert str(f) in str(err.value)
    assert main(["merge", *llamas, "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu"]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path)


def test_truncated_file_is_refused_before_reading(llamas, tmp_path):
    f = Path(llamas[2]) / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"truncated or padded file"):
        merge_checkpoints(llamas, tmp_path / "o", AMEConfig(), stream="tensor", progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("which", [0, 1])
def test_missing_config_is_refused_up_front(llamas, tmp_path, which):
    (Path(llamas[which]) / "config.json").unlink()
    with pytest.raises(ValueError, match=rf"model '.*ft-{which}' has no config\.json"):
        merge_checkpoints(llamas, tmp_path / "o", AMEConfig.soup(), progress=False)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ atomic outputs, nothing lost or left

def test_card_failure_leaves_no_target_and_keeps_the_old_output(llamas, tmp_path, monkeypatch):
    merger = AMEMerger.from_pretrained(llamas, device_map="cpu")
    old = merger.merge(AMEConfig.soup(), output_dir=tmp_path / "o", progress=False).output_dir
    before = tree_sha(old)

    def full_disk(self, repo_id=None):
        raise OSError(28, "No space left on device", str(self.output_dir / "README.md"))

    monkeypatch.setattr(MergeResult, "write_card", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        merger.merge(output_dir=tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()  # never a target with weights and no card
    with pytest.raises(OSError, match="No space left on device"):
        merger.merge(output_dir=tmp_path / "o", overwrite=True, progress=False)
    assert tree_sha(tmp_path / "o") == before  # --overwrite: the old output is intact
    assert not leftovers(tmp_path)


def test_full_disk_names_the_file(llamas, tmp_path, monkeypatch, capsys):
    import builtins

    import hf_ame.writer as writer

    monkeypatch.setattr(writer, "open", lambda path, mode="r": builtins.open("/dev/full", mode), raising=False)
    assert main(["merge", *llamas, "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "model.safetensors" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path)


def test_output_that_is_or_contains_an_input_is_refused(llamas, tmp_path):
    shas = [tree_sha(p) for p in llamas]
    merger = AMEMerger.from_pretrained(llamas, device_map="cpu")
    with pytest.raises(OutputExistsError, match=r"is the input"):
        merger.merge(output_dir=llamas[1], overwrite=True, progress=False)
    with pytest.raises(OutputExistsError, match=r"contains the input"):
        merger.merge(output_dir=Path(llamas[0]).parent, overwrite=True, progress=False)
    with pytest.raises(OutputExistsError, match=r"is the input"):
        merge_checkpoints(llamas, llamas[2], AMEConfig.soup(), overwrite=True, progress=False)
    assert [tree_sha(p) for p in llamas] == shas


def test_concurrent_overwrites_are_serialised(llamas, tmp_path):
    merger = AMEMerger.from_pretrained(llamas, device_map="cpu")
    expected = {}
    for seed in (1, 2):
        out = merger.merge(AMEConfig(lr=1e-2, epochs=3, seed=seed), output_dir=tmp_path / f"seed{seed}", progress=False)
        expected[seed] = tree_sha(out.output_dir)["model.safetensors"]
    for trial in range(3):
        errors = []

        def run(seed):
            try:
                merger.merge(AMEConfig(lr=1e-2, epochs=3, seed=seed), output_dir=tmp_path / "shared", overwrite=True,
                             progress=False)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(s,)) for s in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        seed = yaml.safe_load((tmp_path / "shared/ame_recipe.yaml").read_text())["merge"]["seed"]
        assert tree_sha(tmp_path / "shared")["model.safetensors"] == expected[seed]  # weights match card and recipe
        assert not leftovers(tmp_path)


def test_stale_staging_folders_are_named_and_removed(llamas, tmp_path):
    for name in (".o.hf_ame-tmp-deadbeef", ".o.hf_ame-old-cafebabe", "..o.hf_ame-tmp-deadbeef.hf_ame-tmp-0badf00d"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    with pytest.warns(UserWarning, match=r"removing 3 folder\(s\) left by an interrupted write .*hf_ame-tmp-deadbeef"):
        merge_checkpoints(llamas, tmp_path / "o", AMEConfig.soup(), progress=False)
    assert leftovers(tmp_path) == [] and (tmp_path / "o/model.safetensors").exists()


def test_loser_of_a_race_removes_its_staging_folder(llamas, tmp_path, monkeypatch):
    merger = AMEMerger.from_pretrained(llamas, device_map="cpu")
    real = MergeResult.write_card

    def someone_else_writes_the_target(self, repo_id=None):
        (tmp_path / "o").mkdir()
        (tmp_path / "o" / "theirs.txt").write_text("not ours")
        return real(self, repo_id)

    monkeypatch.setattr(MergeResult, "write_card", someone_else_writes_the_target)
    with pytest.raises(OutputExistsError, match="already exists"):
        merger.merge(AMEConfig.soup(), output_dir=tmp_path / "o", progress=False)
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["theirs.txt"] and not leftovers(tmp_path)


def test_overwrite_on_a_symlink_replaces_the_link_only(llamas, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("mine")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    merge_checkpoints(llamas, tmp_path / "link", AMEConfig.soup(), overwrite=True, progress=False)
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "link/model.safetensors").exists()
    assert (real / "keep.txt").read_text() == "mine" and not leftovers(tmp_path)


def test_debug_shows_the_traceback(llamas, tmp_path):
    with pytest.raises(OutputExistsError):
        main(["--debug", "merge", *llamas, "--out", llamas[0], "--overwrite", "--no-progress"])
    shutil.rmtree(tmp_path, ignore_errors=True)


# ------------------------------------------------------------------ temporary outputs (merge() without output_dir)

def _temp_entries() -> set:
    import tempfile

    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("hf_ame")}


def test_temporary_merge_outlives_its_result_until_cleanup_or_exit(llamas, tmp_path):
    """``path = merger.merge().output_dir`` then ``from_pretrained(path)``: the folder outlives the
    result (it used to die with it, and transformers then said "Repo id must be in the form ...");
    it is removed by ``cleanup()`` or when the interpreter exits."""
    import gc
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    merger = AMEMerger.from_pretrained(llamas, device_map="cpu")
    before = _temp_entries()
    path = merger.merge(AMEConfig.soup(), progress=False).output_dir
    gc.collect()
    assert AutoModelForCausalLM.from_pretrained(path) is not None
    result = merger.merge(AMEConfig.soup(), progress=False)
    root = result.output_dir.parent
    assert result.is_temporary and (result.output_dir / "model.safetensors").exists()
    result.cleanup()
    assert not root.exists() and not result.is_temporary
    code = ("import sys; from hf_ame import AMEConfig, AMEMerger; "
            "r = AMEMerger.from_pretrained(sys.argv[1:], device_map='cpu').merge(AMEConfig.soup(), progress=False); "
            "print(r.output_dir)")
    out = subprocess.run([sys.executable, "-c", code, *llamas], capture_output=True, text=True, check=True).stdout
    from pathlib import Path

    assert not Path(out.strip().splitlines()[-1]).exists()  # removed at the interpreter's exit
    assert path.exists() and _temp_entries() - before == {path.parent.name}  # ours, until this process exits


def test_save_pretrained_moves_a_temporary_merge(llamas, tmp_path):
    merger = AMEMerger.from_pretrained(llamas, device_map="cpu")
    before = _temp_entries()
    result = merger.merge(AMEConfig(lr=1e-2), progress=False)
    expected = tree_sha(result.output_dir)
    root = result.output_dir.parent
    assert result.save_pretrained(tmp_path / "kept") == tmp_path / "kept"
    assert result.output_dir == tmp_path / "kept" and not result.is_temporary and not root.exists()
    assert tree_sha(tmp_path / "kept") == expected and _temp_entries() == before
    # re-sharded on the way out: the temporary single-file weights are not carried along
    other = merger.merge(AMEConfig(lr=1e-2), progress=False)
    other.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    names = {p.name for p in (tmp_path / "sharded").iterdir()}
    assert "model.safetensors.index.json" in names and "model.safetensors" not in names
    assert _temp_entries() == before
    # a merge in the user's own folder is copied, and stays where it was
    mine = merger.merge(AMEConfig.soup(), output_dir=tmp_path / "mine", progress=False)
    mine.save_pretrained(tmp_path / "copy")
    assert tree_sha(tmp_path / "mine") == tree_sha(tmp_path / "copy") and mine.output_dir == tmp_path / "mine"


def test_failed_temporary_merge_leaves_nothing(llamas, monkeypatch):
    merger = AMEMerger.from_pretrained(llamas, device_map="cpu")
    before = _temp_entries()
    monkeypatch.setattr(MergeResult, "write_card", lambda self, repo_id=None: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        merger.merge(AMEConfig.soup(), progress=False)
    assert _temp_entries() == before


def test_merge_then_push_leaves_no_temporary_folder(llamas, online):
    import gc

    hub = online
    merger = AMEMerger.from_pretrained(llamas, device_map="cpu")
    before = _temp_entries()
    result = merger.merge(AMEConfig.soup(), progress=False)
    result.push_to_hub("me/llama-soup", endpoint=hub.endpoint)
    assert result.output_dir.exists()  # the local result stays usable after a push, until cleanup() or exit
    result.cleanup()
    gc.collect()
    assert _temp_entries() == before
    assert "model.safetensors" in hub.state.repos["me/llama-soup"].commits[hub.state.repos["me/llama-soup"].branches["main"]]


def test_a_writer_waiting_for_the_lock_rechecks_before_working(llamas, tmp_path):
    from hf_ame.output import staged_output, target_lock

    out = tmp_path / "o"
    started = threading.Event()
    outcome = []

    def second_writer():
        started.set()
        try:
            with staged_output(out, overwrite=False):
                outcome.append("worked")
        except OutputExistsError:
            outcome.append("refused before working")

    with target_lock(out):  # the first writer holds the target
        t = threading.Thread(target=second_writer)
        t.start()
        started.wait()
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"first writer's result")
    t.join()
    assert outcome == ["refused before working"] and not leftovers(tmp_path)
