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


def test_ame_and_run_flags_are_generated_from_the_declarations():
    """Issue 29: every AMEConfig field with flag metadata and every RunOptions field is one flag of
    hf-ame merge, read back as the API value: AMEConfig's as merge()'s overrides, RunOptions' as
    from_pretrained's and merge()'s keywords (all of which those functions take)."""
    import dataclasses
    import inspect

    from hf_ame.cli import _overrides, build_parser
    from hf_ame.options import RunOptions, given_options

    flags = ["--optimizer", "nadam", "--lr", "0.5", "--lr-schedule", "power", "--lr-power", "-1", "--epochs", "3",
             "--batch-size", "0", "--no-shuffle", "--seed", "7", "--pivot", "2", "--no-adaptive-pivot",
             "--amplification", "linear", "--opt", "weight_decay=0", "--opt", "betas=[0.9,0.99]",
             "--compute-dtype", "bfloat16", "--method", "ties", "--param", "density=0.4",
             "--dtype", "float16", "--max-shard-size", "1MB", "--device", "cpu", "--stream", "tensor",
             "--memory-budget", "1000"]
    args = build_parser().parse_args(["merge", "a", "b", "--out", "o", *flags])
    overrides = _overrides(args)
    assert overrides == {"optimizer": "nadam", "lr": 0.5, "lr_schedule": "power", "lr_power": -1.0, "epochs": 3,
                         "batch_size": None, "shuffle": False, "seed": 7, "pivot": 2, "adaptive_pivot": False,
                         "amplification": "linear", "optimizer_kwargs": {"weight_decay": 0, "betas": [0.9, 0.99]},
                         "compute_dtype": "bfloat16", "method": "ties", "density": 0.4}
    cli_fields = {f.name for f in dataclasses.fields(AMEConfig) if f.metadata.get("cli")}
    assert cli_fields == set(overrides) - {"density"}  # every flagged field read back, and only those
    assert cli_fields == {f.name for f in dataclasses.fields(AMEConfig)} - {"method_kwargs"}  # --param's
    AMEConfig.from_options(**overrides)  # the values read are valid AMEConfig values
    for options in (AMEConfig(), RunOptions()):  # frozen: a value changed is a new object (AMEConfig.replace)
        with pytest.raises(dataclasses.FrozenInstanceError):
            options.seed = 1
    run = RunOptions(**given_options(args, RunOptions))
    assert run.load_kwargs() == {"dtype": "float16", "device_map": "cpu"}
    assert run.run_kwargs() == {"max_shard_size": "1MB", "stream": "tensor", "memory_budget": 1000}
    assert set(run.load_kwargs()) <= set(inspect.signature(AMEMerger.from_pretrained).parameters)
    assert set(run.run_kwargs()) <= set(inspect.signature(AMEMerger.merge).parameters)
    from hf_ame.selection import MergeRequest  # plan() takes merge()'s keywords: the request's, not config fields
    own = set(inspect.signature(AMEMerger.merge).parameters) - {"self", "config", "output_dir", "overwrite", "overrides"}
    assert own == {f.name for f in dataclasses.fields(MergeRequest)} - {"cfg"}
    assert MergeRequest.split({**run.run_kwargs(), "allow_unchanged": True}) == (
        {**run.run_kwargs(), "allow_unchanged": True}, {})
    bare = build_parser().parse_args(["merge", "a", "b", "--out", "o"])
    assert _overrides(bare) == {} and RunOptions(**given_options(bare, RunOptions)) == RunOptions()
    with pytest.raises(ValueError, match="--amplification: expects a number or 'linear', got 'x'"):
        _overrides(build_parser().parse_args(["merge", "a", "b", "--out", "o", "--amplification", "x"]))
