"""merge(search=...) (issue 14): trial 0 is the exact soup, the kept merge never scores below it,
every trial is on the result, the card and the recipe, and the recipe reproduces the bytes."""
import pytest
import torch
import yaml

from conftest import read_state
from hf_ame import AMEConfig, AMEMerger, ConfigError
from hf_ame.search import Search


def test_grid_search_keeps_the_best_and_never_loses_to_the_soup(digits, tmp_path):
    paths, val, _ = digits
    merger = AMEMerger.from_pretrained(paths, device_map="cpu")
    space = {"lr": [1e-4, 1e-2], "epochs": [1, 3]}
    r = merger.merge(optimizer="adamw", order_by="accuracy", eval_dataset=val, search=space, output_dir=tmp_path / "s",
                     compare_soup=True, progress=False)
    trials = r.search["trials"]
    assert [t["trial"] for t in trials] == [0, 1, 2, 3, 4] and trials[0]["params"] == "uniform soup"
    assert [t["params"] for t in trials[1:]] == [{"lr": 1e-4, "epochs": 1}, {"lr": 1e-4, "epochs": 3},
                                                 {"lr": 1e-2, "epochs": 1}, {"lr": 1e-2, "epochs": 3}]
    soup_score = trials[0]["score"]
    assert soup_score == pytest.approx(r.scores["soup"])  # trial 0 is the exact soup
    chosen = trials[r.search["chosen"]]
    assert chosen["score"] == max(t["score"] for t in trials) >= soup_score
    assert r.scores["merged"] == pytest.approx(chosen["score"])
    if r.search["chosen"]:
        assert r.config.lr == chosen["params"]["lr"] and r.config.epochs == chosen["params"]["epochs"]
    card = (tmp_path / "s" / "README.md").read_text()
    assert "## Validation search" in card and "uniform soup" in card
    svg = (tmp_path / "s" / "ame_scores.svg").read_text()
    assert "search trial 0: soup" in svg and "AME trial 4: lr=0.01, epochs=3" in svg
    recipe = yaml.safe_load((tmp_path / "s" / "ame_recipe.yaml").read_text())
    assert recipe["provenance"]["search"]["space"] == {"lr": [1e-4, 1e-2], "epochs": [1, 3]}
    # the written recipe reproduces the kept merge, byte for byte (the pinned config, no new search)
    again = AMEMerger.from_recipe(tmp_path / "s" / "ame_recipe.yaml", device_map="cpu").merge(
        output_dir=tmp_path / "again", progress=False)
    a, b = read_state(tmp_path / "s"), read_state(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.config.to_dict() == r.config.to_dict()
    assert not list(tmp_path.parent.glob("hf_ame-search-*"))
    assert recipe["provenance"]["search"]["merged"] == "in memory"  # small models: held once, no trial files


def test_in_memory_and_streamed_trials_agree(digits, tmp_path):
    """The same search, trials held in memory (small models) and streamed from the files (a memory
    budget too small to hold them): the same scores, the same kept bytes."""
    paths, val, _ = digits
    merger = AMEMerger.from_pretrained(paths, device_map="cpu")
    kw = dict(optimizer="adamw", order_by="accuracy", eval_dataset=val, search={"lr": [1e-3, 1e-2], "epochs": [2]},
              progress=False, write_card=False)
    held = merger.merge(output_dir=tmp_path / "held", **kw)
    streamed = merger.merge(output_dir=tmp_path / "streamed", memory_budget=1, **kw)
    assert held.search["merged"] == "in memory" and streamed.search["merged"] == "streamed"
    assert [t["score"] for t in held.search["trials"]] == [t["score"] for t in streamed.search["trials"]]
    a, b = read_state(tmp_path / "held"), read_state(tmp_path / "streamed")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_optuna_search_and_bad_spaces(digits, tmp_path):
    paths, val, _ = digits
    merger = AMEMerger.from_pretrained(paths[:2], device_map="cpu")
    r = merger.merge(optimizer="adamw", order_by="accuracy", eval_dataset=val, n_trials=2, progress=False,
                     search={"lr": {"low": 1e-5, "high": 1e-2, "log": True}, "epochs": [1, 2]}, output_dir=tmp_path / "o")
    assert len(r.search["trials"]) == 3 and all(t["score"] is not None for t in r.search["trials"])
    lrs = [t["params"]["lr"] for t in r.search["trials"][1:]]
    assert all(1e-5 <= lr <= 1e-2 for lr in lrs)
    with pytest.raises(ConfigError, match="search need a metric"):
        merger.merge(search={"lr": [1e-3]})
    with pytest.raises(ConfigError, match="search.lrr: not an AMEConfig field"):
        merger.merge(order_by="accuracy", eval_dataset=val, search={"lrr": [1e-3]})
    with pytest.raises(ConfigError, match="search.lr: a range needs n_trials"):
        merger.merge(order_by="accuracy", eval_dataset=val, search={"lr": {"low": 1e-4, "high": 1e-2}})


def test_search_bookkeeping_on_plain_numbers():
    s = Search(AMEConfig(optimizer="adamw"), {"lr": [1.0, 2.0]}, greater_is_better=False)
    for trial, score in zip(s, [0.5, 0.5, 0.4]):
        s.tell(score)
    assert s.best.number == 2 and s.trials[0].config.to_dict() == AMEConfig.soup().to_dict()
    s = Search(AMEConfig(optimizer="adamw"), {"lr": [1.0]})
    for trial, score in zip(s, [0.5, 0.5]):
        s.tell(score)
    assert s.best.number == 0  # a tie keeps the soup


def test_cli_search_file(digits, tmp_path):
    from hf_ame.cli import main

    paths, val, _ = digits
    val.save_to_disk(str(tmp_path / "val"))
    spec = tmp_path / "space.yaml"
    spec.write_text(yaml.safe_dump({"space": {"lr": [1e-3]}, "metric": "accuracy",
                                    "dataset": {"path": str(tmp_path / "val")}}))
    assert main(["merge", *paths[:2], "--optimizer", "adamw", "--search", str(spec), "--out", str(tmp_path / "cli"),
                 "--no-progress"]) == 0
    recipe = yaml.safe_load((tmp_path / "cli" / "ame_recipe.yaml").read_text())
    assert [t["trial"] for t in recipe["provenance"]["search"]["trials"]] == [0, 1]
