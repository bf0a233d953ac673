"""The AME algorithm on plain tensors: the spec's exact special cases and its invariants."""
import math

import pytest
import torch

from hf_ame import AMEConfig, ame_merge, ame_merge_many, list_optimizers, register_optimizer
from hf_ame.algorithm import AMEStepper, plan_steps
from hf_ame.algorithm import initial_merge, resolve_pivot
from hf_ame.blocks import can_block, merge_tensor


def _xs(n=6, shape=(7, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 6])
@pytest.mark.parametrize("pivot", ["soup", "first", 3, "base"])
def test_soup_fixed_pivot_is_the_mean_for_any_pivot(batch_size, pivot):
    xs = _xs()
    base = torch.randn(7, 5) * 10
    cfg = AMEConfig(optimizer="sgd", lr=1.0, lr_schedule="constant", amplification=1.0, epochs=1,
                    batch_size=batch_size, adaptive_pivot=False, pivot=pivot if pivot != "base" else "/some/base")
    out = ame_merge(xs, cfg, base=base if pivot == "base" else None)
    torch.testing.assert_close(out, torch.stack(xs).mean(0), atol=1e-5, rtol=1e-5)


def test_soup_with_shuffle_is_still_the_mean():
    xs = _xs(8)
    cfg = AMEConfig(optimizer="gd", lr=1.0, lr_schedule="constant", batch_size=4, adaptive_pivot=False, shuffle=True, seed=7)
    torch.testing.assert_close(ame_merge(xs, cfg), torch.stack(xs).mean(0), atol=1e-5, rtol=1e-5)


def test_adaptive_harmonic_is_the_running_mean():
    xs = _xs(5)
    n = len(xs)
    cfg = AMEConfig(optimizer="sgd", lr=1.0, lr_schedule="harmonic", amplification=float(n), batch_size=1,
                    epochs=1, shuffle=False, adaptive_pivot=True, pivot=2)
    steps = plan_steps(n, cfg)
    stepper = AMEStepper([torch.randn(7, 5) * 100], cfg)  # w_0 = anything
    for t, s in enumerate(steps, start=1):
        stepper.step(s, [xs])
        torch.testing.assert_close(stepper.weights[0], torch.stack(xs[:t]).mean(0), atol=1e-4, rtol=1e-5)


def test_adagrad_with_large_eps_approaches_sgd():
    # torch's Adagrad divides by (sqrt(sum g^2) + eps): with eps >> sqrt(sum g^2), lr = eta * eps
    # makes it SGD at rate eta (spec case 3, with eps outside the square root).
    xs = _xs(6)
    common = dict(lr_schedule="harmonic", epochs=3, batch_size=2, shuffle=True, seed=3, pivot="first")
    sgd = ame_merge(xs, AMEConfig(optimizer="sgd", lr=0.5, **common))
    eps = 1e6
    ada = ame_merge(xs, AMEConfig(optimizer="adagrad", lr=0.5 * eps, optimizer_kwargs={"eps": eps}, **common))
    far = ame_merge(xs, AMEConfig(optimizer="adagrad", lr=0.5, optimizer_kwargs={"eps": 1e-10}, **common))
    assert (ada - sgd).abs().max() < 1e-4
    assert (far - sgd).abs().max() > 1e-2  # the approximation is about eps, not a coincidence


@pytest.mark.parametrize("entry", list_optimizers(), ids=lambda e: e.name)
def test_identical_ingredients_come_back_unchanged(entry):
    w0 = torch.randn(9, 4)
    xs = [w0.clone() for _ in range(4)]
    kwargs = {"weight_decay": 0.0} if "weight_decay" in entry.defaults() else {}
    for pivot in ("soup", "first"):
        cfg = AMEConfig(optimizer=entry.name, lr=0.1, epochs=3, batch_size=2, pivot=pivot, optimizer_kwargs=kwargs)
        torch.testing.assert_close(ame_merge(xs, cfg), w0, atol=1e-6, rtol=0)


def test_many_tensors_together_equal_one_at_a_time():
    groups = [_xs(5, shape, seed=i) for i, shape in enumerate([(3, 4), (10,), (2, 3, 4)])]
    cfg = AMEConfig(optimizer="adamw", lr=0.05, epochs=4, batch_size=2, shuffle=True, seed=11)
    together = ame_merge_many(groups, cfg)
    for xs, t in zip(groups, together):
        assert torch.equal(ame_merge(xs, cfg), t)


def test_seeded_shuffle_plan():
    cfg = AMEConfig(epochs=4, batch_size=2, shuffle=True, seed=5)
    a, b = plan_steps(7, cfg), plan_steps(7, cfg)
    assert a == b
    c = plan_steps(7, cfg.replace(seed=6))
    assert [s.batch for s in a] != [s.batch for s in c]
    assert len(a) == 4 * math.ceil(7 / 2)
    for e in range(1, 5):  # each epoch visits every ingredient once
        seen = sorted(j for s in a if s.epoch == e for j in s.batch)
        assert seen == list(range(7))
    assert [s.t for s in a] == list(range(1, len(a) + 1))
    unshuffled = plan_steps(7, cfg.replace(shuffle=False))
    assert [s.batch for s in unshuffled[:4]] == [(0, 1), (2, 3), (4, 5), (6,)]


def test_seed_changes_the_merge_only_with_shuffle():
    xs = _xs(6)
    cfg = AMEConfig(optimizer="adam", lr=0.05, epochs=3, shuffle=True, seed=1)
    assert torch.equal(ame_merge(xs, cfg), ame_merge(xs, cfg))
    assert not torch.equal(ame_merge(xs, cfg), ame_merge(xs, cfg.replace(seed=2)))
    off = cfg.replace(shuffle=False)
    assert torch.equal(ame_merge(xs, off), ame_merge(xs, off.replace(seed=2)))


def test_pseudogradient_normalisation_matches_the_spec():
    # One SGD step, B=2 of N=4, fixed pivot: w1 = w0 - lr * zeta * (w0 - mean(x_a, x_b)) / S, S = 2.
    xs = _xs(4)
    cfg = AMEConfig(optimizer="sgd", lr=0.3, lr_schedule="constant", amplification=2.5, batch_size=2,
                    shuffle=False, adaptive_pivot=False, epochs=1)
    w0 = torch.stack(xs).mean(0)
    steps = plan_steps(4, cfg)
    st = AMEStepper([w0], cfg)
    st.step(steps[0], [xs])
    expect = w0 - 0.3 * 2.5 * (w0 - (xs[0] + xs[1]) / 2) / 2
    torch.testing.assert_close(st.weights[0], expect, atol=1e-6, rtol=1e-6)


def test_linear_and_callable_amplification_and_power_schedule():
    cfg = AMEConfig(amplification="linear", lr_schedule="power", lr=2.0, lr_power=-1.0, batch_size=1, shuffle=False)
    steps = plan_steps(4, cfg)
    assert [s.scale * 4 for s in steps] == pytest.approx([2, 3, 4, 5])
    assert [s.lr for s in steps] == pytest.approx([2.0, 1.0, 2 / 3, 0.5])
    steps = plan_steps(4, cfg.replace(amplification=lambda t: 10 * t))
    assert [s.scale * 4 for s in steps] == pytest.approx([10, 20, 30, 40])


def test_stepper_state_restores_weights_and_optimizer_state():
    xs = _xs(4)
    cfg = AMEConfig(optimizer="adam", lr=0.1, epochs=2, shuffle=False)
    steps = plan_steps(4, cfg)
    a = AMEStepper([xs[0]], cfg)
    a.step(steps[0], [xs])
    snap = a.state_dict()
    a.step(steps[1], [xs])  # a step we then "reject"
    a.load_state_dict(snap)
    for s in steps[2:]:
        a.step(s, [xs])
    b = AMEStepper([xs[0]], cfg)
    for s in [steps[0]] + list(steps[2:]):
        b.step(s, [xs])
    assert torch.equal(a.weights[0], b.weights[0])


def test_resolve_pivot():
    names = ["a", "b", "c"]
    assert resolve_pivot("soup", 3, names) == ("soup", None)
    assert resolve_pivot("first", 3, names) == ("index", 0)
    assert resolve_pivot(-1, 3, names) == ("index", 2)
    assert resolve_pivot("b", 3, names) == ("index", 1)
    assert resolve_pivot("org/base", 3, names) == ("base", None)
    with pytest.raises(ValueError, match="pivot: ingredient index 5 is out of range"):
        resolve_pivot(5, 3, names)
    with pytest.raises(ValueError, match="pivot"):
        initial_merge(_xs(2), ("base", None))


def test_compute_dtype_and_low_precision_inputs():
    xs = [x.to(torch.bfloat16) for x in _xs(4)]
    out = ame_merge(xs, AMEConfig.soup())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.stack([x.float() for x in xs]).mean(0), atol=1e-6, rtol=1e-6)
    out64 = ame_merge(xs, AMEConfig.soup().replace(compute_dtype="float64"))
    assert out64.dtype == torch.float64


class _NormalizedSGD(torch.optim.Optimizer):
    """Not coordinate-wise: every step moves by lr along g / ||g|| over the whole tensor."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"] / float(p.grad.norm().clamp_min(1e-12)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("entry", list_optimizers(), ids=lambda e: e.name)
def test_blocks_equal_whole_tensor_bit_for_bit(entry, dtype):
    """The cache-blocked CPU path (several times faster) changes nothing: every built-in optimizer,
    fused and plain kernels, block sizes that do and do not divide the tensor, a ragged last block."""
    torch.manual_seed(0)
    n, numel = 5, 10_007
    base = torch.randn(numel)
    xs = [(base + 0.05 * torch.randn(numel)).to(dtype).reshape(-1, 1) for _ in range(n)]
    assert entry.elementwise and can_block(AMEConfig(optimizer=entry.name))
    variants = [{}] + ([{"fused": False}] if "fused" in entry.defaults() else [])
    for kw in variants:
        for cfg in (AMEConfig(optimizer=entry.name, lr=1e-2, epochs=2, batch_size=2, seed=3, optimizer_kwargs=kw),
                    AMEConfig(optimizer=entry.name, lr=1e-2, epochs=1, pivot="first", adaptive_pivot=False,
                              amplification="linear", optimizer_kwargs=kw)):
            steps, piv = plan_steps(n, cfg), resolve_pivot(cfg.pivot, n)
            whole = merge_tensor(xs, cfg, steps, piv, out_dtype=dtype, block_size=None)
            for bs in (640, 1000, 4096, 777):  # 777 and 1000 are rounded down to 768 and 960
                blocked = merge_tensor(xs, cfg, steps, piv, out_dtype=dtype, block_size=bs)
                assert blocked.shape == whole.shape and blocked.dtype == dtype
                assert torch.equal(blocked, whole), (entry.name, kw, bs)
    # a separate base tensor as pivot is split into the same blocks
    cfg = AMEConfig(optimizer=entry.name, lr=1e-2, epochs=1, pivot="/some/base")
    steps, piv = plan_steps(n, cfg), ("base", None)
    b = torch.randn(numel, 1).to(dtype)
    assert torch.equal(merge_tensor(xs, cfg, steps, piv, base=b, block_size=None),
                       merge_tensor(xs, cfg, steps, piv, base=b, block_size=1024))


def test_exact_soup_blocks_equal_whole():
    xs = [x.to(torch.bfloat16) for x in _xs(n=7, shape=(300, 41), seed=4)]
    cfg = AMEConfig.soup()
    steps = plan_steps(7, cfg)
    whole = merge_tensor(xs, cfg, steps, ("soup", None), exact_soup=True, block_size=None)
    assert torch.equal(whole, merge_tensor(xs, cfg, steps, ("soup", None), exact_soup=True, block_size=1024))
    torch.testing.assert_close(whole, torch.stack([x.float() for x in xs]).mean(0), atol=1e-6, rtol=1e-6)


def test_optimizer_not_declared_elementwise_is_never_split():
    from hf_ame.optimizers import _ALIASES, _REGISTRY

    register_optimizer("normsgd", _NormalizedSGD)
    try:
        cfg = AMEConfig(optimizer="normsgd", lr=0.1, epochs=2)
        assert not can_block(cfg)
        xs = _xs(n=4, shape=(64, 50), seed=2)
        steps, piv = plan_steps(4, cfg), resolve_pivot("soup", 4)
        whole = merge_tensor(xs, cfg, steps, piv, block_size=None)
        assert torch.equal(whole, merge_tensor(xs, cfg, steps, piv, block_size=128))
        # what splitting would have done: each block normalised by its own norm, a different merge
        split = torch.cat([merge_tensor([x.view(-1)[s:s + 128] for x in xs], cfg, steps, piv, block_size=None)
                           for s in range(0, 3200, 128)]).view(64, 50)
        assert not torch.allclose(split, whole, atol=1e-4)
    finally:
        _REGISTRY.pop("normsgd", None)
        _ALIASES.pop("normsgd", None)
    assert not can_block(AMEConfig(optimizer="adam"), torch.device("meta"))  # only CPU work is split
