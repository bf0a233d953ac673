"""TSV-M, Iso-C and Iso-CTS (issue 30): one-shot, each equals FusionBench 0.2.33's reference function
on the same task vectors (base + scaling * merged, every tensor within 1e-5); composed with AME the
method's update is what the optimizer integrates; recipes, the CLI and a validation search use them."""
import weakref

import pytest
import torch
import yaml
from safetensors.torch import save_file
from datasets import Dataset

import hf_ame
from hf_ame import AMEConfig, AMEMerger, ConfigError
from hf_ame.methods import MethodContext, get_method
from hf_ame.svd_methods import common_split
from hf_ame.testing import make_family

from conftest import read_state

# the reference implementations (test extra: fusion-bench installed with --no-deps, see scripts/setup.sh)
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts  # noqa: E402
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction  # noqa: E402

TOL = 1e-5


def _decaying(shape, g: torch.Generator) -> torch.Tensor:
    """A task vector with a geometrically decaying spectrum (ratio 0.93), as fine-tunes' are nearly
    low-rank (both papers' premise); 1-D: small noise. Pure noise would have near-equal singular
    values, where which directions a truncation keeps is decided by rounding: Iso-CTS's projection
    U (U^T d), which avoids the reference's rows x rows (U U^T) d, then differs by up to 9e-6."""
    if len(shape) != 2:
        return 0.01 * torch.randn(shape, generator=g)
    k = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], k, generator=g))[0]
    v = torch.linalg.qr(torch.randn(shape[1], k, generator=g))[0]
    return (u * (0.3 * 0.93 ** torch.arange(k, dtype=torch.float32))) @ v.T


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A base and 3 fine-tunes (float32; 2-D tensors 32 x 64 to 512 x 64, and 1-D norms)."""
    root = tmp_path_factory.mktemp("svd")
    paths = make_family("llama", root, 4, seed=11, identical=True, hidden_size=64, intermediate_size=128,
                        vocab_size=512)
    for i, p in enumerate(paths[1:]):
        g = torch.Generator().manual_seed(100 + i)
        state = read_state(p)
        save_file({k: v + _decaying(v.shape, g) for k, v in state.items()}, p / "model.safetensors",
                  metadata={"format": "pt"})
    return paths[0], paths[1:]


def reference(method, task_vectors, **params):
    """FusionBench's merged task vector (CPU; its progress prints go to pytest's capture)."""
    if method == "tsv":
        return compute_and_sum_svd_mem_reduction(task_vectors, accelerator="cpu")
    if method == "iso_c":
        return iso_c(task_vectors, accelerator="cpu")
    return iso_cts(task_vectors, common_space_fraction=params["common_space_fraction"], accelerator="cpu")


CASES = {
    "tsv": {"scaling": 1.0},
    "tsv_scaled": {"scaling": 0.6},
    "iso_c": {"scaling": 1.3},
    "iso_cts": {"scaling": 1.5, "common_space_fraction": 0.8},
    "iso_cts_half": {"scaling": 1.0, "common_space_fraction": 0.5},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_shot_equals_fusion_bench(fam, tmp_path, case):
    """merge(method=...) from the base equals base + scaling * FusionBench's merged task vector."""
    method, params = case.replace("_scaled", "").replace("_half", ""), CASES[case]
    base, fts = fam
    b = read_state(base)
    tvs = [{k: v - b[k] for k, v in read_state(p).items()} for p in fts]
    tau = reference(method, tvs, **params)
    merger = AMEMerger.from_pretrained([str(p) for p in fts], base_model=str(base), device_map="cpu")
    got = read_state(merger.merge(method=method, **params, output_dir=tmp_path / "o", progress=False).output_dir)
    assert set(got) == set(tau)
    for k in tau:
        want = b[k] + params["scaling"] * tau[k]
        assert got[k].dtype == torch.float32
        assert (got[k] - want).abs().max() <= TOL, k
    soup_tv = {k: sum(tv[k] for tv in tvs) / 3 for k in tau}  # a real SVD merge is not the plain mean
    name = "model.layers.0.mlp.up_proj.weight"
    assert (got[name] - b[name] - params["scaling"] * soup_tv[name]).abs().max() > 1e-3


def _pure(method, tensors, base, **params):
    return hf_ame.ame_merge(tensors, AMEConfig.one_shot(method, **params).replace(pivot="base"), base=base)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_other_shapes_as_the_reference(method):
    """3-D, 1-D and 0-D tensors take the mean; a 2-D tensor with fewer rows than tasks follows the
    reference too (TSV-M keeps int(2 / 3) = 0 triplets per task there: its update is 0); so do a
    tensor no fine-tune changed (no SVD taken: the update is 0) and one that only some changed."""
    g = torch.Generator().manual_seed(3)
    shapes = {"conv": (6, 4, 3), "bias": (17,), "scalar": (), "thin": (2, 40), "tall": (50, 7), "frozen": (30, 20),
              "one_frozen": (30, 20)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    for i, ft in enumerate(fts):
        ft["frozen"] = base["frozen"].clone()
        if i == 1:
            ft["one_frozen"] = base["one_frozen"].clone()
    params = {"common_space_fraction": 0.8} if method == "iso_cts" else {}
    tau = reference(method, [{k: ft[k] - base[k] for k in base} for ft in fts], **params)
    for k in shapes:
        got = _pure(method, [ft[k] for ft in fts], base[k], scaling=0.9, **params)
        assert (got - (base[k] + 0.9 * tau[k])).abs().max() <= TOL, k
    assert torch.equal(_pure(method, [ft["frozen"] for ft in fts], base["frozen"]), base["frozen"])
    if method == "tsv":
        assert torch.equal(_pure(method, [ft["thin"] for ft in fts], base["thin"]), base["thin"])


def test_iso_cts_split_rounds_as_the_reference_and_stays_in_range():
    assert common_split(64, 3, 0.8) == (64 - 12, 4)  # int(51.2) = 51 common; round(13 / 3) = 4 per task
    assert common_split(384, 5, 0.8) == (384 - 75, 15)
    assert common_split(2, 3, 0.8) == (2, 0)  # no room for task-specific directions: Iso-C's common space only
    assert common_split(5, 3, 0.0) == (2, 1)  # FusionBench would take a common space of -1 here
    for k in (1, 2, 5, 64, 384):
        for n in (1, 2, 3, 8):
            for f in (0.0, 0.3, 0.8, 1.0):
                common, per_task = common_split(k, n, f)
                assert 0 <= common <= k and per_task >= 0 and common + n * per_task == k


@pytest.mark.parametrize("method,held", [("tsv", 1), ("iso_c", 2), ("iso_cts", 2)])
def test_one_task_vector_at_a_time(method, held):
    """The method never holds more task vectors than ``held`` at once (Iso-C: the sum and the one
    being added), whatever N: each copy is freed before the next is read."""
    g = torch.Generator().manual_seed(0)
    pivot = torch.randn(40, 30, generator=g)
    xs = [pivot + 0.1 * torch.randn(40, 30, generator=g) for _ in range(6)]
    alive, peak = [0], [0]

    def get(i):
        x = xs[i].clone()
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(x, lambda: alive.__setitem__(0, alive[0] - 1))
        return x

    params = AMEConfig.one_shot(method).method_arguments()
    get_method(method).fn(MethodContext(pivot, get, list(range(6)), params, 0, "w", 1, has_base=True))
    assert peak[0] == held


def test_composed_with_ame_the_update_is_integrated(fam, tmp_path):
    """From the base with a fixed pivot and every model in each step, each step's pseudogradient is
    -scaling * tau: SGD (lr 0.5, 2 epochs) lands at base + tau; Adam's first step is lr * sign(tau)."""
    base, fts = fam
    merger = AMEMerger.from_pretrained([str(p) for p in fts], base_model=str(base), device_map="cpu")
    b = read_state(base)
    one = read_state(merger.merge(method="iso_c", output_dir=tmp_path / "one", progress=False).output_dir)
    fixed = dict(method="iso_c", batch_size=None, adaptive_pivot=False, progress=False)
    sgd = merger.merge(optimizer="sgd", lr=0.5, lr_schedule="constant", epochs=2, output_dir=tmp_path / "sgd", **fixed)
    assert sgd.report.steps == 2 and sgd.config.pivot == merger.base.id
    got = read_state(sgd.output_dir)
    assert max((got[k] - one[k]).abs().max().item() for k in got) <= TOL
    adam = read_state(merger.merge(optimizer="adam", lr=1e-3, lr_schedule="constant", epochs=1,
                                   output_dir=tmp_path / "adam", **fixed).output_dir)
    for k in adam:
        tau = one[k] - b[k]
        big = tau.abs() > 1e-4  # Adam's first step is lr * g / (|g| + eps): the sign where |g| >> eps
        assert torch.allclose((adam[k] - b[k])[big], 1e-3 * torch.sign(tau[big]), atol=1e-6), k


def test_recipe_cli_card_and_bad_parameters(fam, tmp_path, capsys):
    from hf_ame.cli import main

    base, fts = fam
    args = [*map(str, fts), "--base-model", str(base), "--method", "iso_cts", "--param", "scaling=1.2",
            "--param", "common_space_fraction=0.5", "--device", "cpu", "--no-progress"]
    assert main(["merge", *args, "--out", str(tmp_path / "cli")]) == 0
    assert "method iso_cts, 1 sgd step per tensor" in capsys.readouterr().out
    merger = AMEMerger.from_pretrained([str(p) for p in fts], base_model=str(base), device_map="cpu")
    api = read_state(merger.merge(method="iso_cts", scaling=1.2, common_space_fraction=0.5, output_dir=tmp_path / "api",
                                  progress=False).output_dir)
    cli = read_state(tmp_path / "cli")
    assert all(torch.equal(api[k], cli[k]) for k in api)
    recipe = yaml.safe_load((tmp_path / "cli" / "ame_recipe.yaml").read_text())
    assert recipe["merge"]["method"] == "iso_cts" and recipe["merge"]["method_kwargs"]["common_space_fraction"] == 0.5
    assert "iso_cts" in (tmp_path / "cli" / "README.md").read_text()
    again = AMEMerger.from_recipe(tmp_path / "cli" / "ame_recipe.yaml").merge(output_dir=tmp_path / "r", progress=False)
    assert all(torch.equal(api[k], read_state(again.output_dir)[k]) for k in api)
    with pytest.raises(ConfigError, match=r"method_kwargs\.common_space_fraction: expected a number in \[0, 1\]"):
        AMEConfig.one_shot("iso_cts", common_space_fraction=1.5)
    with pytest.raises(ConfigError, match="method_kwargs.density: not a parameter of 'tsv'"):
        AMEConfig.one_shot("tsv", density=0.5).validate()
    with pytest.raises(ConfigError, match="method 'iso_c' measures task vectors from it"):
        AMEMerger.from_pretrained([str(p) for p in fts], device_map="cpu").merge(method="iso_c",
                                                                                  output_dir=tmp_path / "x")


def test_search_picks_among_methods_and_scaling(fam, tmp_path):
    """A validation search over {method, scaling} keeps the trial its metric prefers: here the
    metric is closeness to the Iso-CTS merge at scaling 0.5, found among 6 trials and the soup."""
    base, fts = fam
    merger = AMEMerger.from_pretrained([str(p) for p in fts], base_model=str(base), device_map="cpu")
    target = read_state(merger.merge(method="iso_cts", scaling=0.5, output_dir=tmp_path / "t",
                                     progress=False).output_dir)

    def closeness(model, _data):
        return -max((p.detach() - target[n]).abs().max().item() for n, p in model.state_dict().items() if n in target)

    cfg = AMEConfig.one_shot("tsv").replace(pivot="base")
    space = {"method": ["tsv", "iso_c", "iso_cts"], "method_kwargs": [{"scaling": 0.5}, {"scaling": 1.0}]}
    data = Dataset.from_dict({"x": [0]})  # the metric reads weights only
    r = merger.merge(cfg, order_by=closeness, eval_dataset=data, search=space, score_cache=False,
                     output_dir=tmp_path / "s", progress=False)
    assert len(r.search["trials"]) == 7
    chosen = r.search["trials"][r.search["chosen"]]["params"]
    assert chosen == {"method": "iso_cts", "method_kwargs": {"scaling": 0.5}}
    got = read_state(r.output_dir)
    assert max((got[k] - target[k]).abs().max().item() for k in target) <= TOL
