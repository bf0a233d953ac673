"""Merge methods (issue 13): mergekit's task-vector methods, SLERP and Model Stock as pseudogradient
transforms. One-shot, each equals mergekit 0.1.5 on the same checkpoints; composed with AME they
stream like any merge; bad parameters fail before any weight is read."""
import os
from pathlib import Path

import pytest
import torch
import yaml

import hf_ame
from hf_ame import AMEConfig, AMEMerger, ConfigError, merge_checkpoints, plan_merge
from hf_ame.checkpoints import Checkpoint
from hf_ame.methods import list_methods
from hf_ame.testing import make_family

from conftest import read_state

import mergekit.merge as mergekit_merge  # noqa: E402 - in the test extra: the reference implementation
from mergekit.config import MergeConfiguration  # noqa: E402


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A base and 3 fine-tunes (float32; 512 x 64 embeddings: trimming and ranks matter)."""
    root = tmp_path_factory.mktemp("methods")
    paths = make_family("llama", root, 4, seed=7, noise=0.02, hidden_size=64, intermediate_size=128, vocab_size=512)
    return paths[0], paths[1:]


def run_mergekit(method, base, models, params, out):
    """mergekit 0.1.5's merge of ``models`` from ``base`` (slerp: the base listed as its other input)."""
    return run_mergekit_config(method, list(models) + ([base] if method == "slerp" else []), params, out, base)


CASES = {
    "task_arithmetic": {"weight": [0.5, 0.3, 0.8], "lambda": 0.9},
    "ties": {"weight": [1.0, 0.6, 0.8], "density": 0.5},
    "ties_normalize_off": {"weight": 0.7, "density": [0.3, 0.6, 0.9], "normalize": False},
    "breadcrumbs": {"weight": 0.7, "density": 0.8, "gamma": 0.05},
    "breadcrumbs_ties": {"weight": 1.0, "density": 0.7, "gamma": 0.02},
    "model_stock": {},
    "slerp": {"t": 0.3},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_shot_equals_mergekit(fam, tmp_path, case):
    method = case.replace("_normalize_off", "")
    params = CASES[case]
    base, fts = fam
    models = fts[:1] if method == "slerp" else fts
    want = run_mergekit(method, base, models, params, tmp_path / "mergekit")
    got = read_state(merge_checkpoints(models, tmp_path / "ours", AMEConfig.one_shot(method, **params)
                                       .replace(pivot=str(base)), progress=False).output_dir)
    base_state = read_state(base)
    assert set(got) == set(want)
    for k in want:
        assert (got[k] - want[k]).abs().max() <= 1e-6, k
    moved = max((got[k] - base_state[k]).abs().max().item() for k in got)
    assert moved > 0.02  # the merge really moved away from the base


def test_dare_keeps_density_and_the_l1_norm_and_is_reproducible(fam, tmp_path):
    base, fts = fam
    cfg = AMEConfig.one_shot("dare_linear", density=0.3).replace(pivot=str(base), seed=5)
    a = read_state(merge_checkpoints(fts[:1], tmp_path / "a", cfg, progress=False).output_dir)
    b = read_state(merge_checkpoints(fts[:1], tmp_path / "b", cfg, progress=False).output_dir)
    c = read_state(merge_checkpoints(fts[:1], tmp_path / "c", cfg.replace(seed=6), progress=False).output_dir)
    mk = run_mergekit("dare_linear", base, fts[:1], {"weight": 1.0, "density": 0.3}, tmp_path / "mk")
    b0, x = read_state(base), read_state(fts[0])
    name = "model.embed_tokens.weight"  # 32768 entries
    for state in (a, mk):
        d = state[name] - b0[name]
        kept = (d != 0).float().mean().item()
        assert abs(kept - 0.3) < 0.02, kept
        # rescaled to the task vector's own L1 norm (mergekit's DARE rescale)
        assert torch.allclose(d.abs().sum(), (x[name] - b0[name]).abs().sum(), rtol=1e-4)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed: the same drops
    assert not torch.equal(a[name], c[name])


def test_methods_compose_with_ame_and_stream(fam, tmp_path):
    """TIES + AdamW, 2 epochs, batches of 2: the rows reader (one copy at a time, read twice per
    step) gives the bytes of the tensor reader (all copies in memory); the pure function agrees."""
    base, fts = fam
    cfg = AMEConfig(optimizer="adamw", lr=1e-2, epochs=2, batch_size=2, pivot=str(base), method="ties",
                    method_kwargs={"density": 0.5})
    rows = merge_checkpoints(fts, tmp_path / "rows", cfg, progress=False, stream="ingredient")
    whole = merge_checkpoints(fts, tmp_path / "whole", cfg, progress=False, stream="tensor")
    r, w = read_state(rows.output_dir), read_state(whole.output_dir)
    assert all(torch.equal(r[k], w[k]) for k in r)
    plan = plan_merge(fts, tmp_path / "p", cfg, stream="ingredient")
    assert rows.bytes_read == plan.bytes_to_read  # every step's batch read twice, the base once
    assert {t.transform for t in plan.tensors} == {"ties"} and {t.reader for t in plan.tensors} == {"rows"}
    one = Checkpoint(base).tensors
    # per epoch, steps [a, b] and [c], each read twice: a b a b c (c's second pass reuses its copy)
    assert rows.bytes_read == sum(i.nbytes for i in one.values()) * (1 + 5 * cfg.epochs)
    name = "model.layers.0.mlp.up_proj.weight"
    pure = hf_ame.ame_merge([read_state(p)[name] for p in fts], cfg.replace(pivot="base"), base=read_state(base)[name])
    assert torch.allclose(pure, r[name], atol=1e-6)
    assert (r[name] - read_state(base)[name]).abs().max() > 1e-3


def test_bad_parameters_fail_before_any_weight_is_read(fam, tmp_path, monkeypatch):
    base, fts = fam

    def refuse(*a, **k):
        raise AssertionError("read a weight")

    monkeypatch.setattr(Checkpoint, "get_tensor", refuse)
    monkeypatch.setattr(Checkpoint, "read_flat", refuse)
    with pytest.raises(ConfigError, match=r"method_kwargs\.density: expected a number in \(0, 1\]"):
        AMEConfig.one_shot("ties", density=1.5)
    with pytest.raises(ConfigError, match="method_kwargs.densty: not a parameter of 'ties'"):
        AMEConfig.one_shot("ties", densty=0.5).validate()
    with pytest.raises(ConfigError, match="method: unknown method 'tie'"):
        AMEConfig(method="tie").validate()
    with pytest.raises(ConfigError, match="'slerp' merges exactly 1 model"):
        merge_checkpoints(fts, tmp_path / "o", AMEConfig.one_shot("slerp").replace(pivot=str(base)), progress=False)
    with pytest.raises(ConfigError, match="'model_stock' merges at least 2"):
        merge_checkpoints(fts[:1], tmp_path / "o", AMEConfig.one_shot("model_stock").replace(pivot=str(base)),
                          progress=False)
    with pytest.raises(ConfigError, match="'ties' measures task vectors from a base model"):
        merge_checkpoints(fts, tmp_path / "o", AMEConfig(method="ties"), progress=False)
    with pytest.raises(ConfigError, match=r"method_kwargs\.weight: 2 values for 3 ingredients"):
        merge_checkpoints(fts, tmp_path / "o", AMEConfig.one_shot("ties", weight=[1, 1]).replace(pivot=str(base)),
                          progress=False)
    merger = AMEMerger.from_pretrained([str(p) for p in fts], device_map="cpu")
    with pytest.raises(ConfigError, match="base_model"):
        merger.merge(method="ties", density=0.5, output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_merger_method_alone_composed_recipe_and_card(fam, tmp_path):
    base, fts = fam
    merger = AMEMerger.from_pretrained([str(p) for p in fts], base_model=str(base), device_map="cpu")
    alone = merger.merge(method="ties", density=0.5, weight=[1.0, 0.6, 0.8], output_dir=tmp_path / "alone", progress=False)
    assert alone.config.optimizer == "sgd" and alone.config.batch_size is None  # the one-shot settings
    want = run_mergekit("ties", base, fts, {"weight": [1.0, 0.6, 0.8], "density": 0.5}, tmp_path / "mk")
    got = read_state(alone.output_dir)
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    recipe = yaml.safe_load((alone.output_dir / "ame_recipe.yaml").read_text())
    assert recipe["merge"]["method"] == "ties" and recipe["merge"]["method_kwargs"]["density"] == 0.5
    card = (alone.output_dir / "README.md").read_text()
    assert "ties" in card and "density" in card
    again = AMEMerger.from_recipe(alone.output_dir / "ame_recipe.yaml").merge(output_dir=tmp_path / "again", progress=False)
    assert all(torch.equal(got[k], read_state(again.output_dir)[k]) for k in got)
    composed = merger.merge(method="dare_ties", density=0.6, optimizer="adam", lr=1e-3, epochs=2,
                            output_dir=tmp_path / "composed", progress=False)
    assert composed.config.optimizer == "adam" and composed.config.method == "dare_ties"
    assert composed.report.steps == 6  # batch 1, 3 ingredients, 2 epochs


def test_flat_recipe_keys_like_mergekit(fam, tmp_path):
    base, fts = fam
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"hf_ame": 1, "models": [str(p) for p in fts], "base_model": str(base),
                                    "merge": {"method": "ties", "density": 0.5, "lambda": 0.8, "optimizer": "sgd",
                                              "lr": 1.0, "lr_schedule": "constant", "batch_size": None,
                                              "adaptive_pivot": False, "pivot": "base", "epochs": 1}}))
    result = AMEMerger.from_recipe(path).merge(output_dir=tmp_path / "o", progress=False)
    want = run_mergekit("ties", base, fts, {"weight": 1.0, "density": 0.5, "lambda": 0.8}, tmp_path / "mk")
    got = read_state(result.output_dir)
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6


def test_registry_lists_every_method_with_mergekit_defaults():
    names = {m.name for m in list_methods()}
    assert {"task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "slerp",
            "model_stock"} <= names
    ties = AMEConfig.one_shot("ties").method_arguments()
    assert ties["normalize"] is True and ties["density"] == 1.0 and ties["lambda"] == 1.0
    assert AMEConfig.one_shot("dare_linear").method_arguments()["rescale"] is True
    assert AMEConfig.one_shot("breadcrumbs").method_arguments()["gamma"] == 0.01
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_cli_method_alone_and_composed(fam, tmp_path, capsys):
    from hf_ame.cli import main

    base, fts = fam
    common = [*map(str, fts), "--base-model", str(base), "--method", "ties", "--param", "density=0.5",
              "--param", "weight=[1.0,0.6,0.8]", "--device", "cpu", "--no-progress"]
    assert main(["merge", *common, "--out", str(tmp_path / "alone")]) == 0
    assert "method ties, 1 sgd step per tensor" in capsys.readouterr().out
    want = run_mergekit("ties", base, fts, {"weight": [1.0, 0.6, 0.8], "density": 0.5}, tmp_path / "mk")
    got = read_state(tmp_path / "alone")
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    assert main(["merge", *common, "--optimizer", "adamw", "--lr", "1e-3", "--epochs", "2", "--out", str(tmp_path / "c")]) == 0
    assert "method ties, 6 adamw steps per tensor" in capsys.readouterr().out
    assert main(["merge", *map(str, fts), "--method", "ties", "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "measures task vectors from a base model" in capsys.readouterr().err


def test_model_stock_one_ingredient_steps_are_plain_steps(fam, tmp_path):
    """With batch_size 1 a Model Stock step has no angle: it is the plain AME step (no NaN)."""
    base, fts = fam
    kw = dict(optimizer="adamw", lr=1e-3, epochs=2, batch_size=1, pivot=str(base))
    a = merge_checkpoints(fts, tmp_path / "a", AMEConfig(method="model_stock", **kw), progress=False)
    b = merge_checkpoints(fts, tmp_path / "b", AMEConfig(**kw), progress=False, stream="tensor")
    sa, sb = read_state(a.output_dir), read_state(b.output_dir)
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_top_k_mask_equals_argsort_with_ties():
    """The k-th value selection keeps exactly what mergekit's argsort(descending=True)[:k] keeps,
    ties at the threshold included (torch orders ties differently by size: the argsort decides)."""
    from hf_ame.sparsify import top_k_mask

    g = torch.Generator().manual_seed(0)
    for n, levels in ((6, 3), (1000, 7), (40000, 50), (40000, 10**9)):
        a = torch.randint(0, levels, (n,), generator=g).float() if levels < 10**9 else torch.rand(n, generator=g)
        for k in (1, n // 3, n // 2, n - 1):
            want = torch.zeros(n, dtype=torch.bool)
            want[torch.argsort(a, descending=True)[:k]] = True
            got = top_k_mask(a, k)
            assert int(got.sum()) == k and torch.equal(got, want), (n, levels, k)


def test_robust_preset_resists_a_far_off_ingredient(tmp_path):
    """AMEConfig.robust() (per-tensor Huber M-estimate by reweighted steps): with one ingredient's
    weights x 10 among 5, it stays near the clean soup where the soup is pulled away; on the clean
    set it is the soup; the geometric median (Weiszfeld steps) also resists, less tightly."""
    from safetensors.torch import load_file, save_file

    paths = make_family("llama", tmp_path / "f", 5, seed=9)
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(paths[0], bad)
    save_file({k: v * 10 for k, v in load_file(bad / "model.safetensors").items()}, bad / "model.safetensors",
              metadata={"format": "pt"})
    soup_clean = read_state(merge_checkpoints(paths, tmp_path / "sc", AMEConfig.soup(), progress=False).output_dir)
    soup_bad = read_state(merge_checkpoints(paths + [bad], tmp_path / "sb", AMEConfig.soup(), progress=False).output_dir)
    robust_bad = read_state(merge_checkpoints(paths + [bad], tmp_path / "rb", AMEConfig.robust(), progress=False).output_dir)
    robust_clean = read_state(merge_checkpoints(paths, tmp_path / "rc", AMEConfig.robust(), progress=False).output_dir)

    def dist(a, b):
        return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5

    spread = dist(read_state(paths[0]), soup_clean)  # how far one fine-tune is from the clean soup
    assert dist(soup_bad, soup_clean) > 5 * spread  # the outlier drags the soup far away
    assert dist(robust_bad, soup_clean) < 0.5 * spread  # the robust merge stays among the clean ones
    assert dist(robust_clean, soup_clean) < 1e-5 * spread  # every ingredient within delta medians: the soup
    gm = AMEConfig.robust().replace(method="geometric_median", method_kwargs={})
    gm_bad = read_state(merge_checkpoints(paths + [bad], tmp_path / "gb", gm, progress=False).output_dir)
    assert dist(gm_bad, soup_clean) < 0.5 * spread


def test_huber_step_on_plain_tensors():
    """One step: distances 1, 1, 2, 40 from p = 0 -> median 1.5, cap 1.5 x 1.5 = 2.25; weights 1, 1, 1,
    2.25 / 40; g = -sum_j w_j x_j / sum_j w_j."""
    from hf_ame.methods import MethodContext, get_method, method_parameters
    xs = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 0.0]), torch.tensor([0.0, 40.0])]
    ctx = MethodContext(torch.zeros(2), lambda i: xs[i].clone(), range(4), method_parameters("huber", {}), 0, "w", 0)
    w = [1.0, 1.0, 1.0, 2.25 / 40]
    want = -sum(wi * x for wi, x in zip(w, xs)) / sum(w)
    assert torch.allclose(get_method("huber").fn(ctx), want, atol=1e-7)


def run_mergekit_config(method, models, params, out, base=None):
    """mergekit 0.1.5 on ``models`` (per-model ``weight`` / ``density`` / ``gamma`` / ``epsilon``: a list
    is one value per model; the rest global)."""
    per = ("weight", "density", "gamma", "epsilon")
    entries = []
    for i, m in enumerate(models):
        mine = {k: (v[i] if isinstance(v, list) else v) for k, v in params.items() if k in per}
        entries.append({"model": str(m), **({"parameters": mine} if mine else {})})
    cfg = {"merge_method": method, "dtype": "float32", "models": entries}
    if base is not None:
        cfg["base_model"] = str(base)
    shared = {k: v for k, v in params.items() if k not in per}
    if shared:
        cfg["parameters"] = shared
    mergekit_merge.run_merge(MergeConfiguration.model_validate(cfg), str(out),
                             mergekit_merge.MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    return read_state(out)


# (method, how many fine-tunes, parameters, with the base model)
MORE = {
    "sce_topk": ("sce", 3, {"select_topk": 0.5}, True),
    "sce": ("sce", 3, {}, True),
    "ram": ("ram", 3, {}, True),
    "ramplus_tl": ("ramplus_tl", 3, {"r": 0.3, "alpha": 0.5}, True),
    "nearswap": ("nearswap", 1, {"t": 0.01}, True),
    "arcee_fusion": ("arcee_fusion", 1, {}, True),
    "nuslerp_base": ("nuslerp", 2, {"weight": [0.3, 0.7]}, True),
    "nuslerp_models": ("nuslerp", 2, {"weight": [0.3, 0.7]}, False),
    "nuslerp_rows": ("nuslerp", 2, {"weight": [0.3, 0.7], "nuslerp_flatten": False, "nuslerp_row_wise": True}, True),
    "multislerp_base": ("multislerp", 3, {"weight": [0.2, 0.3, 0.5]}, True),
    "multislerp_models": ("multislerp", 3, {"weight": [0.2, 0.3, 0.5]}, False),
    "karcher_base": ("karcher", 3, {}, True),
    "karcher_models": ("karcher", 3, {}, False),
}


@pytest.mark.parametrize("case", sorted(MORE))
def test_more_methods_equal_mergekit(fam, tmp_path, case):
    """mergekit 0.1.5's other methods, one shot: within 1e-6 of mergekit's own merge. Methods with an
    optional base use the task vectors when the pivot is the base; Karcher's mergekit contract takes
    the base as one more input."""
    method, n, params, with_base = MORE[case]
    base, fts = fam
    want = run_mergekit_config(method, fts[:n], params, tmp_path / "mk", base if with_base else None)
    models = list(fts[:n]) + ([base] if (with_base and method == "karcher") else [])
    pivot = str(base) if (with_base and method != "karcher") else "first"
    got = read_state(merge_checkpoints(models, tmp_path / "ours", AMEConfig.one_shot(method, **params)
                                       .replace(pivot=pivot), progress=False).output_dir)
    base_state = read_state(base)
    assert set(got) == set(want)
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    assert max((got[k] - base_state[k]).abs().max().item() for k in got) > 0.009  # it moved


def test_della_draws_as_mergekit_and_is_refused_outside_its_range(fam, tmp_path):
    """DELLA's MagPrune: with the same seed, our draw is mergekit's bit for bit (rank-scaled keep
    probabilities per row, L1 rescale); a merge keeps about `density` of the task vector and is
    reproducible; density +- epsilon outside (0, 1) is refused before any weight is read."""
    from mergekit.sparsify import RescaleNorm, della_magprune as mk_della
    from hf_ame.sparsify import della_magprune
    for shape in ((64, 48), (100,)):
        d = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(3)
        want = mk_della(d.clone(), 0.4, 0.1, RescaleNorm.l1)
        got = della_magprune(d.clone(), 0.4, 0.1, torch.Generator().manual_seed(3), True)
        assert torch.equal(got, want)
    base, fts = fam
    cfg = AMEConfig.one_shot("della_linear", density=0.3, epsilon=0.1).replace(pivot=str(base))
    a = read_state(merge_checkpoints(fts[:1], tmp_path / "a", cfg, progress=False).output_dir)
    b = read_state(merge_checkpoints(fts[:1], tmp_path / "b", cfg, progress=False).output_dir)
    b0, f0 = read_state(base), read_state(fts[0])
    k = "model.layers.0.mlp.down_proj.weight"
    kept = ((a[k] - b0[k]).abs() > 0).float().mean().item()
    assert abs(kept - 0.3) < 0.02 and all(torch.equal(a[n], b[n]) for n in a)
    assert abs((a[k] - b0[k]).abs().sum() / (f0[k] - b0[k]).abs().sum() - 1) < 1e-4  # L1 rescale
    with pytest.raises(ConfigError, match=r"method_kwargs.epsilon: DELLA .* density 0.1 with epsilon 0.15"):
        AMEConfig.one_shot("della", density=0.1)


def test_registry_matches_mergekit_methods_and_defaults():
    """Every merge method of mergekit 0.1.5 (passthrough is `slices`) is registered under its name with
    mergekit's parameter names and defaults (a required mergekit parameter has a default here)."""
    from mergekit.merge_methods.registry import registered_methods
    ours = {m.name: m for m in list_methods()}
    for m in registered_methods():
        spec = m.spec
        if spec.name == "passthrough":
            continue
        assert spec.name in ours, spec.name
        theirs = {p.name: p.default for p in spec.parameters}
        mine = ours[spec.name].defaults
        assert set(theirs) <= set(mine), (spec.name, set(theirs) - set(mine))
        for k, v in theirs.items():
            if isinstance(v, (bool, int, float)):
                assert mine[k] == v, (spec.name, k)


@pytest.mark.parametrize("method", ["sce", "ram", "ramplus_tl", "nearswap", "arcee_fusion", "nuslerp", "multislerp",
                                    "karcher", "della", "della_linear"])
def test_more_methods_compose_with_adamw(fam, tmp_path, method):
    """Each method shapes AdamW-AME's pseudogradients from the base (2 epochs, every ingredient in each
    step): a finite merge, between the base and the one-shot merge's reach, different from both."""
    base, fts = fam
    lo, hi = hf_ame.methods.get_method(method).models
    models = fts[:hi or 3]
    cfg = AMEConfig(optimizer="adamw", lr=1e-3, epochs=2, batch_size=None, method=method, pivot=str(base))
    got = read_state(merge_checkpoints(models, tmp_path / "ame", cfg, progress=False).output_dir)
    one = read_state(merge_checkpoints(models, tmp_path / "one", AMEConfig.one_shot(method).replace(pivot=str(base)),
                                       progress=False).output_dir)
    b = read_state(base)
    assert all(torch.isfinite(v).all() for v in got.values())
    step = max((got[k] - b[k]).abs().max().item() for k in got)
    assert 0 < step <= 2e-3 + 1e-6  # AdamW moves each coordinate by at most about lr per step
    assert any(not torch.equal(got[k], one[k]) for k in got)
    if lo > 1:
        with pytest.raises(ConfigError, match=f"batch_size: expected None .*'{method}' merges"):
            AMEConfig(optimizer="adamw", batch_size=1, method=method).validate()


# ---------------------------------------------------------------------------------------------- declarations
def test_every_method_declares_each_parameter_and_its_base_role():
    """One declaration per method: each default has a Param (and no name twice), each Param's default
    passes its own check, the defaults together pass the method's own check, the base role is one of
    three and needs_base / optional_base / per_model are read from the declarations."""
    from hf_ame.method_params import BASE_ROLES, Param
    from hf_ame.methods import method_parameters
    entries = list_methods()
    assert len(entries) >= 24
    for e in entries:
        names = [p.name for p in e.params]
        assert all(isinstance(p, Param) for p in e.params), e.name
        assert len(names) == len(set(names)) and list(e.defaults) == names, e.name
        for p in e.params:
            assert p.kind in ("number", "bool"), (e.name, p.name)
            assert p.kind != "bool" or isinstance(p.default, bool), (e.name, p.name)
            p.check(p.default, f"{e.name}.{p.name}")  # raises ConfigError if the default is not allowed
        assert e.base in BASE_ROLES, e.name
        assert e.needs_base == (e.base == "required") and e.optional_base == (e.base == "optional"), e.name
        assert e.per_model == tuple(p.name for p in e.params if p.per_model), e.name
        params = method_parameters(e.name, {})
        assert {k: v for k, v in params.items() if k != "__method__"} == dict(e.defaults), e.name
    roles = {e.name: e.base for e in entries}
    assert roles["linear"] == roles["karcher"] == roles["huber"] == "unused"
    assert roles["nuslerp"] == roles["multislerp"] == "optional"
    assert roles["ties"] == roles["nearswap"] == roles["tsv"] == "required"


@pytest.mark.parametrize("method, name, ok, refused, message", [
    # nearswap's t is a distance; slerp's an interpolation factor
    ("nearswap", "t", 2.0, -0.1, r"a distance >= 0 \(or one per ingredient\), got -0\.1"),
    ("slerp", "t", 1.0, 2.0, r"a number in \[0, 1\] \(or one per ingredient\), got 2\.0"),
    # ram's epsilon is a threshold of any size; DELLA's a spread of probabilities
    ("ram", "epsilon", 1.5, -1.0, r"a number >= 0 \(or one per ingredient\), got -1\.0"),
    ("ramplus_tl", "epsilon", 1.5, -1.0, r"a number >= 0 \(or one per ingredient\), got -1\.0"),
    ("della_linear", "epsilon", 0.0, 1.5, r"a number in \[0, 1\) \(or one per ingredient\), got 1\.5"),
    # multislerp's eps may be 0; the robust centres' must be positive
    ("multislerp", "eps", 0.0, -1e-9, r"a number >= 0, got -1e-09"),
    ("geometric_median", "eps", 1e-3, 0.0, r"a positive number, got 0\.0"),
])
def test_a_method_specific_range_is_enforced_by_its_own_declaration(method, name, ok, refused, message):
    from hf_ame.methods import method_parameters
    assert method_parameters(method, {name: ok})[name] == ok
    with pytest.raises(ConfigError, match=rf"^method_kwargs\.{name}: expected {message}$"):
        method_parameters(method, {name: refused})
    with pytest.raises(ConfigError, match=rf"^method_kwargs\.{name}: expected {message}$"):  # in a gradient too
        method_parameters(method, {name: {"gradient": [ok, refused]}})


def test_nearswap_t_2_accepted_where_slerp_t_2_is_refused_as_before():
    from hf_ame.methods import method_parameters, parameter_help
    assert method_parameters("nearswap", {"t": 2.0})["t"] == 2.0
    refused = r"^method_kwargs\.t: expected a number in \[0, 1\] \(or one per ingredient\), got 2\.0$"
    with pytest.raises(ConfigError, match=refused):
        method_parameters("slerp", {"t": 2.0})
    with pytest.raises(ConfigError, match=refused):  # a gradient's values are checked by the same declaration
        method_parameters("slerp", {"t": {"gradient": [0.1, 2.0]}})
    assert parameter_help("nearswap", "t") == "a distance >= 0, or one per ingredient [..]; or {gradient: [..]} / " \
                                              "{filters: [..]}"
    assert parameter_help("slerp", "t").startswith("a number in [0, 1], or one per ingredient")
    assert parameter_help("ties", "normalize") == "true or false"
    assert parameter_help("karcher", "max_iter").startswith("a whole number from 1 to ")


def test_a_third_party_method_registered_with_defaults_still_works(monkeypatch):
    """The older form, register_method(defaults=..., needs_base=...): each default takes the shared
    declaration of its name, else true/false or a finite number by its type; per-ingredient lists
    follow the declarations (rows.subset_config); the new params= / base= form sits beside it."""
    import hf_ame.methods as methods
    from hf_ame.method_params import Param
    from hf_ame.methods import get_method, method_parameters, register_method
    from hf_ame.rows import subset_config
    monkeypatch.setattr(methods, "_METHODS", {e.name: e for e in list_methods()})  # unregistered afterwards
    entry = register_method("Third_Party", lambda ctx: ctx.pivot * 0,
                            defaults={"density": 0.5, "c": 3.0, "flag": True, "normalize": False}, needs_base=False)
    assert get_method("third_party") is entry and entry.base == "unused" and not entry.needs_base
    assert dict(entry.defaults) == {"density": 0.5, "c": 3.0, "flag": True, "normalize": False}
    assert entry.per_model == ("density",)
    assert method_parameters("third_party", {"density": [0.2, 0.9], "c": -7})["c"] == -7
    for k, v, msg in [("density", 1.5, r"a number in \(0, 1\] \(or one per ingredient\), got 1\.5"),
                      ("c", "x", "a finite number, got 'x'"), ("flag", 1, "true or false, got 1"),
                      ("normalize", "yes", "true or false, got 'yes'")]:
        with pytest.raises(ConfigError, match=rf"^method_kwargs\.{k}: expected {msg}$"):
            method_parameters("third_party", {k: v})
    with pytest.raises(ValueError, match="already registered"):
        register_method("third_party", entry.fn)
    assert register_method("opt_base", entry.fn, optional_base=True, needs_base=False).base == "optional"
    assert register_method("old_default", entry.fn).base == "required"
    with pytest.raises(ValueError, match="not both"):
        register_method("both", entry.fn, base="unused", needs_base=False)
    with pytest.raises(ValueError, match="base must be one of"):
        register_method("bad_role", entry.fn, base="sometimes")
    with pytest.raises(ValueError, match="declared twice"):
        register_method("twice", entry.fn, params=(Param("c", 1.0),), defaults={"c": 2.0})
    # per_model from the declarations: a per-ingredient "c" is cut to a row group's members, "t" is not
    register_method("per_c", entry.fn, params=(Param("c", 1.0, per_model=True), Param("t", 0.5)), base="unused")
    cfg = AMEConfig(method="per_c", method_kwargs={"c": [1.0, 2.0, 3.0], "t": 0.5})
    assert subset_config(cfg, [0, 2]).method_kwargs == {"c": [1.0, 3.0], "t": 0.5}
