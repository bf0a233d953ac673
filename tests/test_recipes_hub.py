"""Recipes, the model card, and publishing to a Hub served on 127.0.0.1."""
import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from conftest import read_state
from hf_ame import AMEConfig, AMEMerger
from hf_ame.cli import main
from hf_ame.publish import PushError
from hf_ame.recipe import Recipe, RecipeError, load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
LOCAL_EXAMPLES = ["uniform_soup", "adamw_ame", "adagrad_ame", "greedy_ame", "greedy_soup"]


def _tree_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_example_recipe_parses_and_round_trips(path, examples):
    r = Recipe.from_file(path)
    assert len(r.models) >= 2
    again = Recipe.from_yaml(r.to_yaml())
    assert again.to_dict() == r.to_dict()
    if path.stem in LOCAL_EXAMPLES:
        assert all(Path(m["id"]).is_dir() for m in r.models)  # ${HF_AME_EXAMPLES} expanded


@pytest.mark.parametrize("name", LOCAL_EXAMPLES)
def test_local_example_recipes_run_and_reproduce_bit_for_bit(name, examples, tmp_path):
    merger = AMEMerger.from_recipe(RECIPES / f"{name}.yaml")
    result = merger.merge(output_dir=tmp_path / "first", progress=False, score_cache=False)
    written = Recipe.from_file(tmp_path / "first" / "ame_recipe.yaml")
    assert written.merge == result.config
    again = AMEMerger.from_recipe(tmp_path / "first" / "ame_recipe.yaml").merge(
        output_dir=tmp_path / "second", progress=False, score_cache=False)
    a, b = read_state(tmp_path / "first"), read_state(tmp_path / "second")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    for f in (tmp_path / "first").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "second" / f.name).read_bytes()
    assert again.report.ingredients == result.report.ingredients
    if name.startswith("greedy"):  # the greedy pass is replayed on the same data: all ranked candidates listed
        assert written.ordering["greedy"] == result.greedy and written.ordering["order"] == "given"
        assert [m["id"] for m in written.models] == result.candidates


@pytest.mark.parametrize(
    "doc,message",
    [
        ("models: [a/b, c/d]\nmerge: {lr: fast}", r"^merge.lr: expected a positive number, got 'fast'"),
        ("models: [a/b, c/d]\nmerge: {learning_rate: 1}", r"^merge.learning_rate: unknown field"),
        ("models: [a/b, c/d]\nmerges: {}", r"^recipe.merges: unknown field"),
        ("models: a/b", r"^models: expected a non-empty list"),
        ("models: [a/b, {id: c/d, revision: 3}]", r"^models\[1\].revision: expected a branch, tag or commit sha"),
        ("models: [a/b, {name: c/d}]", r"^models\[1\].name: unknown field"),
        ("models: [a/b, c/d]\nmerge: {optimizer: adamz}", r"^merge.optimizer: unknown optimizer 'adamz'"),
        ("models: [a/b, c/d]\nmerge: {optimizer_kwargs: {betas: [0.9, 1.5]}}", r"^merge.optimizer_kwargs.betas:"),
        ("models: [a/b, c/d]\nordering: {metric: accuracy, dataset: {path: x}, order: random}", r"^ordering.order: expected one of"),
        ("models: [a/b, c/d]\nordering: {metric: accuracy, dataset: {split: test}}", r"^ordering.dataset.path: expected"),
        ("models: [a/b, c/d]\nordering: {metric: accuracy, dataset: {path: x}, top_k: 0}", r"^ordering.top_k: expected an integer >= 1"),
        ("models: [a/b, c/d]\nordering: {metric: accuracy, dataset: {path: x}, greedy: best}", r"^ordering.greedy: expected null, soup or ame"),
        ("models: [a/b, c/d]\noutput: {dtype: int4}", r"^output.dtype: expected one of"),
        ("models: [a/b, c/d]\noutput: {max_shard_size: huge}", r"^output.max_shard_size: expected a size"),
        ("models: [a/b, c/d]\nhub: {repo_id: noslash}", r"^hub.repo_id: expected 'namespace/name'"),
        ("models: [a/b, c/d]\nhub: {private: yes please}", r"^hub.private: expected true or false"),
        ("hf_ame: 2\nmodels: [a/b, c/d]", r"^hf_ame: expected schema version 1, got 2"),
        ("models: [a/b, c/d\n", r"^recipe: not valid YAML"),
    ],
)
def test_bad_recipes_name_the_field(doc, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_yaml(doc)


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="recipe: no such file: nope/recipe.yaml"):
        load_recipe("nope/recipe.yaml")


def _card_checks(folder, hub_ids, merged_score):
    from huggingface_hub import ModelCard, metadata_load

    card = ModelCard.load(folder / "README.md")
    meta = metadata_load(folder / "README.md")
    assert card.data.to_dict() == meta
    assert meta["base_model"] == hub_ids
    assert meta["base_model_relation"] == "merge" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-classification"
    assert {"merge", "hf-ame", "ame-adamw"} <= set(meta["tags"])
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0]["type"] == "accuracy" and result["metrics"][0]["value"] == pytest.approx(merged_score)
    assert result["dataset"]["split"] == "validation"
    body = card.text
    assert "| order | model | revision | dtype | accuracy | used |" in body
    for hid in hub_ids:
        assert f"[{hid}](https://huggingface.co/{hid})" in body
    assert "```yaml\nhf_ame: 1" in body and "hf-ame merge" in body
    svg = ET.parse(folder / "ame_scores.svg").getroot()
    assert svg.tag.endswith("svg") and len([e for e in svg.iter() if e.tag.endswith("rect")]) >= 3
    return meta


def test_push_to_hub_one_commit_with_card(examples, tmp_path, online, monkeypatch):
    hub = online
    paths = [examples / f"vit-digits-ft-{i}" for i in range(4)]
    shas = [hub.state.add_folder(f"org/vit-digits-ft-{i}", p) for i, p in enumerate(paths)]
    merger = AMEMerger.from_pretrained([f"org/vit-digits-ft-{i}" for i in range(4)], cache_dir=tmp_path / "cache",
                                       endpoint=hub.endpoint)
    result = merger.merge(AMEConfig(optimizer="adamw", lr=1e-4, epochs=2, batch_size=2), order_by="accuracy",
                          eval_dataset={"path": str(examples / "digits-validation"), "split": "validation"}, top_k=3,
                          compare_soup=True, output_dir=tmp_path / "out", score_cache=False, progress=False)
    kept_ids = [f"org/vit-digits-ft-{i}" for i in range(4) if result.ingredients[i].kept]
    _card_checks(tmp_path / "out", kept_ids, result.scores["merged"])
    before = len(hub.state.requests)
    info = result.push_to_hub("me/vit-ame", private=True, endpoint=hub.endpoint)
    reqs = hub.state.requests[before:]
    commits = [r for r in reqs if r["path"].startswith("/api/models/me/vit-ame/commit/")]
    assert len(commits) == 1 and info.oid == hub.state.repos["me/vit-ame"].branches["main"]
    created = [r for r in reqs if r["path"] == "/api/repos/create"]
    assert created[0]["json"].get("visibility") == "private" and hub.state.repos["me/vit-ame"].private
    files = hub.state.repos["me/vit-ame"].commits[info.oid]
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "ame_recipe.yaml",
            "ame_scores.svg"} <= set(files)
    assert files["model.safetensors"] == (tmp_path / "out/model.safetensors").read_bytes()
    pushed_readme = tmp_path / "pushed" / "README.md"
    pushed_readme.parent.mkdir()
    pushed_readme.write_bytes(files["README.md"])
    from huggingface_hub import metadata_load

    meta = metadata_load(pushed_readme)
    assert meta["base_model"] == kept_ids and meta["model-index"][0]["name"] == "vit-ame"
    pinned = yaml.safe_load(files["ame_recipe.yaml"])
    assert [m["revision"] for m in pinned["models"]] == [shas[int(m["id"][-1])] for m in pinned["models"]]
    assert pinned["hub"]["repo_id"] == "me/vit-ame"

    # revision (a new branch) and create_pr are passed through; each push is one commit
    n = len(hub.state.repos["me/vit-ame"].commit_log)
    info2 = result.push_to_hub("me/vit-ame", revision="dev", commit_message="to dev", endpoint=hub.endpoint)
    assert hub.state.repos["me/vit-ame"].branches["dev"] == info2.oid
    pr = result.push_to_hub("me/vit-ame", create_pr=True, endpoint=hub.endpoint)
    assert pr.pr_url and "refs/pr/1" in hub.state.repos["me/vit-ame"].branches
    assert len(hub.state.repos["me/vit-ame"].commit_log) == n + 2
    last = [r for r in hub.state.requests if "/commit/" in r["path"]][-1]
    assert last["commit"]["create_pr"] is True

    # the recipe travels: from_recipe reads ame_recipe.yaml from the repo and reproduces the weights
    again = AMEMerger.from_recipe("me/vit-ame", endpoint=hub.endpoint, cache_dir=tmp_path / "cache2").merge(
        output_dir=tmp_path / "again", progress=False, score_cache=False)
    assert (tmp_path / "again/model.safetensors").read_bytes() == (tmp_path / "out/model.safetensors").read_bytes()
    assert [i.sha for i in again.ingredients] == [shas[int(i.id[-1])] for i in again.ingredients]


def test_failed_push_leaves_the_local_folder_intact(digits, tmp_path, online):
    hub = online
    paths, _, _ = digits
    result = AMEMerger.from_pretrained(paths).merge(AMEConfig.soup(), output_dir=tmp_path / "out", progress=False)
    before = _tree_digest(tmp_path / "out")
    hub.state.fail_commits = 1
    with pytest.raises(PushError, match=r"push to 'me/x' failed while trying to upload the files: .*intact at .*out"):
        result.push_to_hub("me/x", endpoint=hub.endpoint)
    after = _tree_digest(tmp_path / "out")
    assert set(after) == set(before) and all(after[k] == before[k] for k in before if k not in ("README.md", "ame_recipe.yaml"))
    assert hub.state.repos["me/x"].commit_log[-1]["message"] == "initial commit"  # nothing landed
    info = result.push_to_hub("me/x", endpoint=hub.endpoint)  # retry works
    assert "model.safetensors" in hub.state.repos["me/x"].commits[info.oid]


def test_cli_recipe_merge_push_and_score(examples, tmp_path, online, monkeypatch, capsys):
    hub = online
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "ENDPOINT", hub.endpoint)
    rc = main(["merge", str(RECIPES / "uniform_soup.yaml"), "--out", str(tmp_path / "o"), "--no-progress", "--push", "me/soup"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "pushed to me/soup" in out.out and "model.safetensors" in hub.state.repos["me/soup"].commits[
        hub.state.repos["me/soup"].branches["main"]]
    rc = main(["push", str(tmp_path / "o"), "me/soup2", "--private"])
    assert rc == 0 and hub.state.repos["me/soup2"].private
    rc = main(["merge", str(RECIPES / "uniform_soup.yaml"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    rc = main(["score", str(examples / "vit-digits-ft-0"), str(examples / "vit-digits-ft-1"), "--metric", "accuracy",
               "--dataset", str(examples / "digits-validation"), "--no-cache", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("accuracy = ") == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [a/b, c/d]\nmerge: {lr: fast}\n")
    rc = main(["merge", str(bad), "--out", str(tmp_path / "never")])
    assert rc == 2 and "merge.lr: expected a positive number, got 'fast'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
