"""The CLI, the API and recipes agree (issue 29): the same merge asked for three ways gives the same
bytes and the same written recipe; a flag given with a recipe replaces the recipe's value and the
written recipe records it."""
import hashlib

import pytest
import yaml

from hf_ame import AMEConfig, AMEMerger
from hf_ame.cli import main
from hf_ame.testing import make_family


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    paths = make_family("llama", tmp_path_factory.mktemp("agree"), 4, seed=4, noise=0.01)
    return str(paths[0]), [str(p) for p in paths[1:]]


def digest(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def written(folder) -> dict:
    r = yaml.safe_load((folder / "ame_recipe.yaml").read_text())
    return {k: r.get(k) for k in ("models", "base_model", "merge", "output")}


CASES = {  # merge() keyword arguments, the same as CLI flags, the same as a recipe's merge section
    "one_shot": ({"method": "ties", "density": 0.5}, ["--method", "ties", "--param", "density=0.5"]),
    "composed": ({"method": "ties", "density": 0.5, "optimizer": "adamw", "lr": 0.002, "epochs": 2},
                 ["--method", "ties", "--param", "density=0.5", "--optimizer", "adamw", "--lr", "0.002", "--epochs", "2"]),
    "composed_no_base_role": ({"method": "linear", "optimizer": "sgd", "lr": 0.5},
                              ["--method", "linear", "--optimizer", "sgd", "--lr", "0.5"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_api_cli_and_recipe_give_the_same_merge(fam, tmp_path, case):
    base, fts = fam
    kwargs, flags = CASES[case]
    api = AMEMerger.from_pretrained(fts, base_model=base).merge(output_dir=tmp_path / "api", progress=False, **kwargs)
    assert main(["merge", *fts, "--base-model", base, *flags, "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"hf_ame": 1, "models": fts, "base_model": base, "merge": kwargs}))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "rec"), "--no-progress"]) == 0
    assert digest(api.output_dir) == digest(tmp_path / "cli") == digest(tmp_path / "rec")
    assert written(api.output_dir) == written(tmp_path / "cli") == written(tmp_path / "rec")
    if case == "one_shot":  # a method alone is its one-shot merge in all three
        assert written(api.output_dir)["merge"]["optimizer"] == "sgd"


def test_flags_given_with_a_recipe_replace_its_values_and_are_recorded(fam, tmp_path):
    """Before, `hf-ame merge recipe.yaml --optimizer adamw --lr 0.5` ignored both flags silently."""
    base, fts = fam
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"hf_ame": 1, "models": fts, "base_model": base,
                                      "merge": {"method": "ties", "density": 0.5}}))
    flags = ["--optimizer", "adamw", "--lr", "0.002", "--epochs", "2", "--dtype", "bfloat16", "--param", "density=0.7"]
    assert main(["merge", str(recipe), *flags, "--out", str(tmp_path / "rec"), "--no-progress"]) == 0
    got = written(tmp_path / "rec")
    assert (got["merge"]["optimizer"], got["merge"]["lr"], got["merge"]["epochs"]) == ("adamw", 0.002, 2)
    assert got["merge"]["method_kwargs"]["density"] == 0.7 and got["output"]["dtype"] == "bfloat16"
    # the recipe's config (a one-shot TIES) with those fields replaced, the rest kept
    cfg = AMEConfig.one_shot("ties", density=0.5).replace(optimizer="adamw", lr=0.002, epochs=2, density=0.7)
    api = AMEMerger.from_pretrained(fts, base_model=base, dtype="bfloat16").merge(
        cfg, output_dir=tmp_path / "api", progress=False)
    assert digest(api.output_dir) == digest(tmp_path / "rec")
    # the written recipe re-runs to the same bytes, with no flag
    assert main(["merge", str(tmp_path / "rec" / "ame_recipe.yaml"), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    assert digest(tmp_path / "again") == digest(tmp_path / "rec")


def test_alignment_choices_are_declared_once_for_api_cli_and_recipes():
    """Issue 29: AlignOptions names the choices from_pretrained takes; hf-ame merge's flags are generated
    from its fields and a recipe's output section accepts and hands over each of them."""
    import dataclasses
    import inspect

    from hf_ame.cli import build_parser
    from hf_ame.options import AlignOptions
    from hf_ame.recipe import Recipe

    names = AlignOptions.names()
    assert set(names) <= set(inspect.signature(AMEMerger.from_pretrained).parameters)
    args = build_parser().parse_args(["merge", "a", "b", "--out", "o", "--layout", "in_memory", "--heads", "union",
                                      "--pad-to-multiple-of", "8"])
    assert (args.layout, args.heads, args.pad_to_multiple_of) == ("in_memory", "union", 8)
    assert set(AlignOptions.flag_names()) == set(names) - {"tokens"}  # a mapping: recipes only
    assert all(f.default is None for f in dataclasses.fields(AlignOptions))
    recipe = Recipe.from_dict({"hf_ame": 1, "models": [{"id": "a"}, {"id": "b"}],
                               "output": {"layout": "in_memory", "heads": "union", "config_source": "first"}})
    assert recipe.output["layout"] == "in_memory" and recipe.output["heads"] == "union"
