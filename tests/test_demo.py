"""The class-exclusion pipeline of the demo and the quality benchmark, small enough for CI."""

from conftest import DIGITS_SETUP_KW
from hf_ame import AMEConfig


def test_merge_beats_every_ingredient_in_class_exclusion(digits_cache, tmp_path):
    from huggingface_hub import metadata_load

    from demo import class_exclusion
    from digits import DigitsSetup

    ame = AMEConfig(optimizer="adamw", epochs=2, batch_size=2, optimizer_kwargs={"weight_decay": 0.0})
    r = class_exclusion(DigitsSetup(**DIGITS_SETUP_KW), str(digits_cache), out=str(tmp_path / "ame"),
                        space={"lr": [1e-5, 1e-4]}, ame=ame, verbose=False, score_cache=False)
    print({k: r[k] for k in ("best_ingredient", "soup", "greedy_soup", "ame")})
    # each ingredient never saw half of the classes: it cannot exceed ~0.5; the merges can
    assert max(a for _, a in r["ingredients"]) == r["best_ingredient"] < 0.6
    assert r["soup"] > r["best_ingredient"]
    assert r["ame"] > r["best_ingredient"]
    assert r["greedy_soup"] >= r["best_ingredient"] - 0.02  # greedy is chosen on validation, reported on test
    assert len(r["sweep"]) == 2 and r["ame_val"] >= r["soup_val"]  # the search never keeps less than the soup
    assert r["kept_soup"] or r["ame_config"].lr in (1e-5, 1e-4)
    assert "## Validation search" in (tmp_path / "ame" / "README.md").read_text()
    meta = metadata_load(tmp_path / "ame" / "README.md")
    assert meta["base_model_relation"] == "merge" and "soup" in r and (tmp_path / "ame" / "ame_recipe.yaml").exists()
