"""The class-exclusion pipeline of the demo and the quality benchmark, small enough for CI."""

from conftest import DIGITS_SETUP_KW
from hf_ame import AMEConfig


def test_merge_beats_every_ingredient_in_class_exclusion(digits_cache, tmp_path):
    from huggingface_hub import metadata_load

    from demo import class_exclusion
    from digits import DigitsSetup

    sweep = [AMEConfig(optimizer="adamw", lr=lr, epochs=2, batch_size=2, optimizer_kwargs={"weight_decay": 0.0})
             for lr in (1e-5, 1e-4)]
    r = class_exclusion(DigitsSetup(**DIGITS_SETUP_KW), str(digits_cache), out=str(tmp_path / "ame"), sweep=sweep,
                        verbose=False, score_cache=False)
    print({k: r[k] for k in ("best_ingredient", "soup", "greedy_soup", "ame")})
    # each ingredient never saw half of the classes: it cannot exceed ~0.5; the merges can
    assert max(a for _, a in r["ingredients"]) == r["best_ingredient"] < 0.6
    assert r["soup"] > r["best_ingredient"]
    assert r["ame"] > r["best_ingredient"]
    assert r["greedy_soup"] >= r["best_ingredient"] - 0.02  # greedy is chosen on validation, reported on test
    assert r["ame_config"] in sweep and len(r["sweep"]) == 2
    meta = metadata_load(tmp_path / "ame" / "README.md")
    assert meta["base_model_relation"] == "merge" and "soup" in r and (tmp_path / "ame" / "ame_recipe.yaml").exists()
