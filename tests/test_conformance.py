"""Conformance with mergekit 0.1.5 in the dtypes people publish (issue 27): every mergekit method x
``dtype`` in {float32, bfloat16, float16} x ingredients stored in {float32, bfloat16}, on a base and
three fine-tunes whose task vectors are ~1% of the weights (as real fine-tunes'), each run from a
mergekit config file through :meth:`AMEMerger.from_recipe` (the path a published config takes).

Deterministic methods: in float32 within 1e-6 of mergekit. In half precision both read the inputs
rounded to that dtype; mergekit then rounds again in some methods' arithmetic (TIES, Model Stock,
Karcher...), hf_ame computes in float32 and rounds once. So the measure is each one's distance from
the exact merge (mergekit in float32), relative to the exact merge's task vector: hf_ame's must be
at most mergekit's half-precision distance x 1.05 + 0.01 ("within mergekit's own rounding").
mergekit's output is compared rounded to the configured dtype (its ramplus_tl writes float32 whatever
``dtype`` says). Random methods (DARE, DELLA) draw differently: compared by the kept fraction, the
task vector's norm and its cosine to mergekit's, against how far mergekit is from itself across seeds.
"""
from pathlib import Path

import pytest
import torch
import yaml

from hf_ame import AMEMerger
from hf_ame.testing import build_model

from conftest import read_state

import mergekit.merge as mergekit_merge  # noqa: E402 - in the test extra: the reference implementation
from mergekit.config import MergeConfiguration  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
STORED = ("float32", "bfloat16")
RELATIVE = 0.01  # task vector std / mean |weight|, per tensor: real fine-tunes move weights by ~0.1-1%

# method -> (fine-tunes, parameters (a list: one value per model), base role: "base" | "input" | None)
METHODS = {
    "linear": (3, {"weight": [0.5, 0.3, 0.2]}, None),
    "task_arithmetic": (3, {"weight": [0.5, 0.3, 0.8], "lambda": 0.9}, "base"),
    "ties": (3, {"weight": [1.0, 0.6, 0.8], "density": 0.5}, "base"),
    "breadcrumbs": (3, {"weight": 0.7, "density": 0.8, "gamma": 0.05}, "base"),
    "breadcrumbs_ties": (3, {"weight": 1.0, "density": 0.7, "gamma": 0.02}, "base"),
    "model_stock": (3, {}, "base"),
    "slerp": (1, {"t": 0.3}, "base"),
    "nuslerp": (2, {"weight": [0.3, 0.7]}, "base"),
    "multislerp": (3, {"weight": [0.2, 0.3, 0.5]}, "base"),
    "karcher": (3, {}, "input"),
    "sce": (3, {"select_topk": 0.5}, "base"),
    "ram": (3, {}, "base"),
    "ramplus_tl": (3, {"r": 0.3, "alpha": 0.5}, "base"),
    "nearswap": (1, {"t": 0.0005}, "base"),
    "arcee_fusion": (1, {}, "base"),
    "dare_linear": (3, {"weight": [1.0, 0.6, 0.8], "density": 0.6}, "base"),
    "dare_ties": (3, {"weight": [1.0, 0.6, 0.8], "density": 0.6}, "base"),
    "della": (3, {"weight": [1.0, 0.6, 0.8], "density": 0.6, "epsilon": 0.1}, "base"),
    "della_linear": (3, {"weight": [1.0, 0.6, 0.8], "density": 0.6, "epsilon": 0.1}, "base"),
}
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}
PER_MODEL = ("weight", "density", "gamma", "epsilon")


def save_family(root: Path, stored: str):
    """A base and 3 fine-tunes: base + (0.6 shared + 0.8 own) Gaussian task vectors of std
    RELATIVE x mean |w| per tensor (signs agree in part, as fine-tunes of one task do)."""
    model = build_model("llama", 5, hidden_size=64, intermediate_size=128, vocab_size=512, num_hidden_layers=3,
                        tie_word_embeddings=False)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    shared = {k: torch.randn(v.shape, generator=gen) for k, v in base.items()}
    paths = []
    for i in range(4):
        with torch.no_grad():
            for k, p in model.state_dict().items():
                d = torch.zeros_like(p) if i == 0 else 0.6 * shared[k] + 0.8 * torch.randn(p.shape, generator=gen)
                p.copy_(base[k] + d * RELATIVE * base[k].abs().mean())
        path = root / ("base" if i == 0 else f"ft-{i}")
        model.to(getattr(torch, stored)).save_pretrained(path)
        model.float()
        paths.append(path)
    return paths[0], paths[1:]


@pytest.fixture(scope="module", params=STORED)
def family(request, tmp_path_factory):
    return request.param, save_family(tmp_path_factory.mktemp(f"conf-{request.param}"), request.param)


def config(method: str, dtype: str, base: Path, fts) -> dict:
    n, params, role = METHODS[method]
    models = list(fts[:n]) + ([base] if role == "input" else [])
    entries = []
    for i, m in enumerate(models):
        mine = {k: (v[i] if isinstance(v, list) else v) for k, v in params.items() if k in PER_MODEL}
        entries.append({"model": str(m), **({"parameters": mine} if mine else {})})
    if method == "slerp":  # mergekit's slerp lists the base among its two models
        entries.append({"model": str(base)})
    cfg = {"merge_method": method, "dtype": dtype, "models": entries}
    if role == "base":
        cfg["base_model"] = str(base)
    shared = {k: v for k, v in params.items() if k not in PER_MODEL}
    if shared:
        cfg["parameters"] = shared
    return cfg


def run_mergekit(cfg: dict, out: Path, seed: int = 0) -> dict:
    mergekit_merge.run_merge(MergeConfiguration.model_validate(cfg), str(out),
                             mergekit_merge.MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False,
                                                         random_seed=seed))
    return read_state(out)


def run_ours(cfg: dict, tmp: Path, name: str = "ours") -> dict:
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return read_state(AMEMerger.from_recipe(path, device_map="cpu").merge(output_dir=tmp / name, progress=False).output_dir)


def task_norm(state: dict, base: dict) -> float:
    return float(sum(((state[k].double() - base[k].double()) ** 2).sum() for k in base) ** 0.5)


def compare(got: dict, want: dict, base: dict) -> dict:
    """Relative difference to the merge's task vector, the bit-equal share, the largest difference."""
    diff = float(sum(((got[k].double() - want[k].double()) ** 2).sum() for k in want) ** 0.5)
    equal = sum(int((got[k] == want[k]).sum()) for k in want) / sum(want[k].numel() for k in want)
    return {"rel": diff / task_norm(want, base), "equal": equal,
            "max": max(float((got[k].double() - want[k].double()).abs().max()) for k in want),
            "moved": task_norm(got, base) / task_norm(want, base)}


def rounded(state: dict, dtype: str) -> dict:
    return {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in state.items()}


def kept(state: dict, base: dict) -> float:
    """The share of elements the merge moved from the base."""
    return sum(int((state[k] != base[k].to(state[k].dtype)).sum()) for k in base) / sum(v.numel() for v in base.values())


def cosine(a: dict, b: dict, base: dict) -> float:
    dot = sum(float(((a[k].double() - base[k].double()) * (b[k].double() - base[k].double())).sum()) for k in base)
    return dot / task_norm(a, base) / task_norm(b, base)


@pytest.mark.parametrize("method", sorted(set(METHODS) - RANDOM))
def test_deterministic_methods_in_every_dtype(family, tmp_path, method):
    stored, (base, fts) = family
    b = read_state(base)
    exact = run_mergekit(config(method, "float32", base, fts), tmp_path / "mk-float32")
    for dtype in DTYPES:
        cfg = config(method, dtype, base, fts)
        got = run_ours(cfg, tmp_path, f"ours-{dtype}")
        assert {str(v.dtype) for v in got.values()} == {f"torch.{dtype}"}
        if dtype == "float32":
            assert max(float((got[k] - exact[k]).abs().max()) for k in exact) <= 1e-6, (method, stored)
            continue
        mk = rounded(run_mergekit(cfg, tmp_path / f"mk-{dtype}"), dtype)
        ours_err, mk_err = compare(got, exact, b)["rel"], compare(mk, exact, b)["rel"]
        assert ours_err <= 1.05 * mk_err + 0.01, (method, stored, dtype, ours_err, mk_err)
        assert kept(got, b) >= 0.5 * min(kept(exact, b), kept(mk, b)) > 0  # never the base returned


@pytest.mark.parametrize("method", sorted(RANDOM))
def test_random_methods_in_every_dtype(family, tmp_path, method):
    """DARE / DELLA: hf_ame's draw against mergekit's (seed 0), as close as mergekit's seed 1 is to it."""
    stored, (base, fts) = family
    b = read_state(base)
    for dtype in DTYPES:
        cfg = config(method, dtype, base, fts)
        got = run_ours(cfg, tmp_path, f"ours-{dtype}")
        mk0 = rounded(run_mergekit(cfg, tmp_path / f"mk0-{dtype}", seed=0), dtype)
        mk1 = rounded(run_mergekit(cfg, tmp_path / f"mk1-{dtype}", seed=1), dtype)
        spread = abs(kept(mk1, b) - kept(mk0, b))
        assert abs(kept(got, b) - kept(mk0, b)) <= spread + 0.02, (method, stored, dtype)
        norm_spread = abs(task_norm(mk1, b) / task_norm(mk0, b) - 1)
        assert abs(task_norm(got, b) / task_norm(mk0, b) - 1) <= norm_spread + 0.03, (method, stored, dtype)
        assert cosine(got, mk0, b) >= cosine(mk1, mk0, b) - 0.03, (method, stored, dtype)


def test_half_precision_ties_moves_as_far_as_float32(tmp_path):
    """The issue's smallest case: a base and three bf16 fine-tunes, ties with density 0.5 and weight 1:
    the bfloat16 and float16 merges move from the base by the float32 merge's amount (task-vector
    norms within 2%); before the fix every tensor was the base's, bit for bit."""
    base, fts = save_family(tmp_path / "fam", "bfloat16")
    b = read_state(base)
    cfg = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5, "weight": 1.0},
           "models": [{"model": str(m)} for m in fts]}
    norms = {dtype: task_norm(run_ours({**cfg, "dtype": dtype}, tmp_path, dtype), b) for dtype in DTYPES}
    assert norms["float32"] > 0
    for dtype in ("bfloat16", "float16"):
        assert abs(norms[dtype] / norms["float32"] - 1) < 0.02, norms


def test_a_merge_that_returns_the_base_is_refused_and_partly_unchanged_tensors_are_warned(tmp_path):
    """The guard for any method, any config: merged tensors equal to the base bit for bit while the
    fine-tunes differ are named in a warning and in the card; every tensor so is an error (nothing
    lands) unless allow_unchanged."""
    from hf_ame import UnchangedMergeError

    base, fts = save_family(tmp_path / "fam", "bfloat16")
    models = [{"model": str(m)} for m in fts]
    zero = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "bfloat16", "models": models,
            "parameters": {"weight": 0.0}}
    path = tmp_path / "zero.yml"
    path.write_text(yaml.safe_dump(zero))
    with pytest.raises(UnchangedMergeError, match="equals .*base.* bit for bit"):
        AMEMerger.from_recipe(path).merge(output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="equal the pivot"):
        result = AMEMerger.from_recipe(path).merge(output_dir=tmp_path / "out", progress=False, allow_unchanged=True)
    assert "## Warnings" in (result.output_dir / "README.md").read_text()

    part = dict(zero, parameters={"weight": [{"filter": "mlp", "value": 0.0}, {"value": 1.0}]})
    path.write_text(yaml.safe_dump(part))
    with pytest.warns(UserWarning, match=r"9 of \d+ merged tensor\(s\) equal the pivot .*mlp"):
        result = AMEMerger.from_recipe(path).merge(output_dir=tmp_path / "part", progress=False)
    card = (result.output_dir / "README.md").read_text()
    assert "## Warnings" in card and "model.layers.0.mlp.down_proj.weight" in card
    moved = read_state(result.output_dir)
    b = read_state(base)
    assert not torch.equal(moved["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])
