"""Issue 34: a method's first step in one pass over cache blocks (:mod:`hf_ame.first_step`). The robust
preset on a clean set reads each copy once and writes the bytes of the whole-tensor merge; where a
model is capped, or the step does not meet its tolerance, the tensor is merged whole as before (named
in the report), the same bytes again; a decision within the margin is left to the whole step."""
import pytest
import torch

from conftest import read_state
from hf_ame import AMEConfig, NonFiniteWeightsError, merge_checkpoints, plan_merge
from hf_ame.first_step import first_step_applies
from hf_ame.methods import get_method
from hf_ame.testing import make_family


def _family(root, n=4, **kw):
    """n bf16 tiny Llamas; with block_size 1024 each large tensor is several blocks."""
    return make_family("llama", root, n, dtype=kw.pop("dtype", torch.bfloat16), **kw)


def _far_off(root):
    return make_family("llama", root, 1, seed=0, noise=0.5, dtype=torch.bfloat16)


CASES = {  # name: (config, a far-off model added, every floating tensor merged whole)
    "clean": (AMEConfig.robust(), False, False),
    "far_off": (AMEConfig.robust(), True, True),
    "last_step_tol0": (AMEConfig.robust(epochs=1, tol=0.0), False, False),  # one step: no tolerance to meet
    "tol0": (AMEConfig.robust(epochs=3, tol=0.0), False, True),  # never "converged": the whole-tensor steps
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_first_step_writes_the_bytes_of_the_whole_tensor_merge(tmp_path, case):
    cfg, far, whole = CASES[case]
    paths = _family(tmp_path / "f") + (_far_off(tmp_path / "b") if far else [])
    plan = plan_merge(paths, tmp_path / "p", cfg, block_size=1024)
    floating = [t.name for t in plan.tensors if t.transform == "huber"]
    assert floating and all(t.first_step and t.reader == "blocks" for t in plan.tensors if t.transform == "huber")
    assert any(t.side_by_side for t in plan.tensors) and any(not t.side_by_side for t in plan.tensors)
    one = merge_checkpoints(paths, tmp_path / "one", cfg, progress=False, block_size=1024)
    ref = merge_checkpoints(paths, tmp_path / "ref", cfg, progress=False, block_size=None)  # whole tensors
    assert not any(t.first_step for t in plan_merge(paths, tmp_path / "p", cfg, block_size=None).tensors)
    a, b = read_state(tmp_path / "one"), read_state(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert one.merged_whole == (floating if whole else [])
    if not whole:  # each copy read once: the whole-tensor merge reads them for the soup and for the step
        assert one.bytes_read == plan.bytes_to_read == sum(t.read_bytes for t in plan.tensors)
        assert ref.bytes_read >= 2 * one.bytes_read - sum(t.read_bytes for t in plan.tensors if t.transform != "huber")


def test_first_step_with_one_thread_and_float32_copies_into_bf16(tmp_path):
    paths = _family(tmp_path / "f", 3, dtype=torch.float32, seed=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # no merge workers: the caller's thread runs the blocks and writes them
        one = merge_checkpoints(paths, tmp_path / "one", AMEConfig.robust(), progress=False, block_size=1024,
                                dtype=torch.bfloat16)
    finally:
        torch.set_num_threads(before)
    merge_checkpoints(paths, tmp_path / "ref", AMEConfig.robust(), progress=False, block_size=None,
                      dtype=torch.bfloat16)
    a, b = read_state(tmp_path / "one"), read_state(tmp_path / "ref")
    assert one.merged_whole == [] and all(torch.equal(a[k], b[k]) for k in a)
    assert {v.dtype for v in a.values() if v.is_floating_point()} == {torch.bfloat16}


def test_a_nan_ingredient_gets_the_whole_tensor_merges_error(tmp_path):
    from safetensors.torch import load_file, save_file

    paths = _family(tmp_path / "f", 3)
    f = paths[1] / "model.safetensors"
    sd = load_file(f)
    name = "model.layers.0.mlp.up_proj.weight"
    sd[name][3, 5] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    errors = []
    for block_size in (1024, None):  # the first step over blocks, whole tensors
        with pytest.raises(NonFiniteWeightsError, match=rf"ft-1.*{name}") as info:
            merge_checkpoints(paths, tmp_path / "out", AMEConfig.robust(), progress=False, block_size=block_size)
        errors.append(str(info.value))
    assert errors[0] == errors[1] and not (tmp_path / "out").exists()


def test_decisions_near_their_thresholds_are_left_to_the_whole_step():
    """huber's keep: every distance under 0.99 x the cap and the step under 0.99 x tol x |p|; closer
    calls (where the sums over blocks and torch's norms could disagree) say not kept."""
    keep = get_method("huber").first_step.keep
    params = {"delta": 1.5, "eps": 1e-12, "tol": 1e-6}.__getitem__
    sq = lambda *v: [x * x for x in v]  # noqa: E731 - the sums are squared norms
    assert keep(sq(1.0, 1.0, 1.2, 1e-8, 1.0), params, False)  # clean and converged
    assert not keep(sq(1.0, 1.0, 1.49, 1e-8, 1.0), params, False)  # 1.49 within 1% of the cap 1.5
    assert not keep(sq(1.0, 1.0, 3.0, 1e-8, 1.0), params, False)  # a model capped
    assert not keep(sq(1.0, 1.0, 1.2, 0.995e-6, 1.0), params, False)  # converged by a hair: the whole step decides
    assert keep(sq(1.0, 1.0, 1.2, 0.5, 1.0), params, True)  # the last step: no tolerance to meet
    assert not keep([float("inf"), 1.0, 1.0, 0.0, 1.0], params, True)
    assert keep(sq(0.0, 0.0, 0.0, 0.0, 0.0), params, False)  # identical copies of a zero tensor: 0 <= 0, as torch


def test_which_merges_take_the_first_step():
    from hf_ame.algorithm import Pivot, plan_steps

    def applies(cfg, n=4):
        return first_step_applies(cfg, plan_steps(n, cfg), Pivot("soup") if cfg.pivot == "soup" else Pivot("base"))

    assert applies(AMEConfig.robust()) and applies(AMEConfig.robust(epochs=1))
    assert not applies(AMEConfig.robust().replace(lr=0.5))  # w - 0.5 g: another step
    assert not applies(AMEConfig.robust().replace(batch_size=2))  # two batches a epoch: later steps differ
    assert not applies(AMEConfig.robust().replace(compute_dtype="bfloat16"))
    assert not applies(AMEConfig.robust().replace(optimizer="adam"))
    assert not applies(AMEConfig.robust().replace(method="geometric_median", method_kwargs={}))  # no FirstStep
    assert not applies(AMEConfig.soup())


def _edit(path, fn):
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    save_file(fn(load_file(f)), f, metadata={"format": "pt"})


def _same(tmp_path, paths, cfg, name):
    """The first step over blocks and the whole-tensor merge: the same tensors, bit for bit."""
    one = merge_checkpoints(paths, tmp_path / f"{name}1", cfg, progress=False, block_size=1024)
    merge_checkpoints(paths, tmp_path / f"{name}2", cfg, progress=False, block_size=None)
    a, b = read_state(tmp_path / f"{name}1"), read_state(tmp_path / f"{name}2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    return one


def test_inputs_that_part_the_two_paths_are_left_to_the_whole_step(tmp_path):
    """Found by attacking the one pass (session 12): (1) a diverged model whose distance overflows
    torch's float32 norm of the whole tensor (inf past 1.84e19: the whole step gives it weight 0)
    while the sum over blocks stays finite; (2) float64 copies, rounded to float32 before the whole
    step subtracts; (3) a tensor of no elements."""
    import math

    paths = make_family("llama", tmp_path / "f", 4, seed=5, hidden_size=64, intermediate_size=128)
    name = "model.layers.0.mlp.up_proj.weight"  # 128 x 64: 8 blocks of 1024
    g = torch.Generator().manual_seed(0)
    for k, p in enumerate(paths):
        x = torch.randn(128, 64, generator=g) * (1.95e19 / math.sqrt(8192)) * (1.25 if k == 3 else 1.0)
        _edit(p, lambda sd, x=x: {**sd, name: x, "model.extra_empty": torch.zeros(0, 64)})
    one = _same(tmp_path, paths, AMEConfig.robust(), "overflow")
    assert one.merged_whole == [name]
    wide = make_family("llama", tmp_path / "w", 3, seed=6, dtype=torch.float64)
    assert _same(tmp_path, wide, AMEConfig.robust(), "float64").merged_whole == []
