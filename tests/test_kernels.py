"""The fused Triton kernels against the torch path.

On CPU they run under Triton's interpreter (TRITON_INTERPRET=1, set per test); on the GPU machine
the same tests also run compiled on CUDA tensors. Tolerance: the kernels use torch's formulas
(IEEE division and square root), so results agree with torch's (CPU) path to float32 rounding:
soups of 16-bit inputs bit for bit, fp32 soups within 1e-7; 3-epoch optimizer merges (lr 1e-2,
weights of scale 0.04) within atol 1e-7 + rtol 1e-6 under the interpreter (seen: <= 8e-9) and
atol 2e-6 compiled for CUDA, where the compiler contracts a * b + c into FMAs (seen on an H200:
<= 5.8e-7, i.e. 6e-5 of one step of lr 1e-2).
"""
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton): fused kernels untested")

from hf_ame import kernels  # noqa: E402
from hf_ame.algorithm import initial_merge, plan_steps, resolve_pivot, soup  # noqa: E402
from hf_ame.blocks import merge_block, merge_tensor  # noqa: E402
from hf_ame.config import AMEConfig  # noqa: E402
from hf_ame.engine import merge_checkpoints  # noqa: E402

from conftest import read_state  # noqa: E402

pytestmark = pytest.mark.triton

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# triton 3.6's interpreter fails on runtime loop bounds with numpy 2.5 ("only 0-dimensional
# arrays can be converted to Python scalars"); 3.9's runs them
OLD_INTERPRETER = tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7)


def tolerance(device):
    return dict(atol=1e-7, rtol=1e-6) if device.type == "cpu" else dict(atol=2e-6, rtol=1e-5)


@pytest.fixture(params=DEVICES, ids=lambda d: "interpreter" if d == "cpu" else "cuda")
def device(request, monkeypatch):
    if request.param == "cpu":
        if OLD_INTERPRETER:
            pytest.skip(f"triton {triton.__version__}'s interpreter cannot run these kernels; use triton >= 3.7")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("HF_AME_FUSED", raising=False)
    return torch.device(request.param)


def _family(n, shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    return [(base + torch.randn(shape, generator=g) * 0.002).to(dtype).to(device) for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_fused_soup_matches_torch(device, dtype, n):
    xs = _family(n, (3, 1371), dtype, device)  # not a multiple of the kernel's block
    got = kernels.fused_soup(xs)
    ref = soup([x.cpu() for x in xs])
    if dtype == torch.float32:
        torch.testing.assert_close(got.cpu(), ref, atol=1e-7, rtol=0)
    else:
        assert torch.equal(got.cpu(), ref)  # fp32 sums of 16-bit values are exact: same bits
    # written directly in a 16-bit output dtype: torch's rounding of the float32 mean
    assert torch.equal(kernels.fused_soup(xs, torch.bfloat16).cpu(), ref.to(torch.bfloat16))


def test_identical_ingredients_soup_exactly(device):
    x = _family(1, (4099,), torch.float32, device)[0]
    assert torch.equal(kernels.fused_soup([x, x.clone(), x.clone()]), x)


CASES = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ("sgd", {"momentum": 0.5, "dampening": 0.2, "maximize": True}),
    ("adam", {"weight_decay": 0.01}),
    ("adam", {"amsgrad": True, "betas": (0.2, 0.2)}),
    ("adamw", {}),
    ("adamw", {"weight_decay": 0.1, "amsgrad": True}),
    ("adagrad", {"lr_decay": 0.1, "weight_decay": 0.01, "initial_accumulator_value": 0.1}),
]


@pytest.mark.parametrize("opt,kw", CASES, ids=[f"{o}-{'-'.join(k) or 'default'}" for o, k in CASES])
@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed-pivot"])
def test_fused_steps_match_torch_optimizers(device, opt, kw, adaptive):
    cfg = AMEConfig(optimizer=opt, lr=1e-2, epochs=3, batch_size=2, optimizer_kwargs=kw, adaptive_pivot=adaptive,
                    lr_schedule="harmonic")
    xs = _family(5, (2, 2100), torch.bfloat16, device, seed=3)  # 5 = two batches of 2 and one of 1 per epoch
    assert kernels.fused_supported(cfg, device, xs)
    steps = plan_steps(len(xs), cfg)
    pivot = resolve_pivot(cfg.pivot, len(xs))
    ref = merge_block([x.cpu() for x in xs], cfg, steps, pivot)  # torch.optim (its fused CPU kernel where it has one)
    got = kernels.fused_merge(xs, initial_merge(xs, pivot), cfg, steps, torch.float32)
    assert (ref - xs[0].cpu().float()).abs().max() > 1e-4  # the merge moved: the comparison means something
    torch.testing.assert_close(got.cpu(), ref, **tolerance(device))
    # the last step writes the output dtype itself
    low = kernels.fused_merge(xs, initial_merge(xs, pivot), cfg, steps, torch.bfloat16).cpu()
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() <= ref.abs().max() * 2**-8


@pytest.mark.parametrize("pivot", ["first", 2], ids=["first", "index"])
def test_merge_tensor_dispatches_to_the_kernels(device, pivot, monkeypatch):
    cfg = AMEConfig(optimizer="adamw", lr=3e-3, epochs=2, pivot=pivot, optimizer_kwargs={"weight_decay": 0.0})
    xs = _family(4, (700,), torch.float32, device, seed=5)
    calls = []
    real = kernels.fused_merge
    monkeypatch.setattr("hf_ame.blocks.fused_merge", lambda *a, **k: calls.append(1) or real(*a, **k))
    steps, pv = plan_steps(4, cfg), resolve_pivot(cfg.pivot, 4)
    got = merge_tensor(xs, cfg, steps, pv, device=device, out_dtype=torch.float32, block_size=None)
    assert calls == [1]
    monkeypatch.setenv("HF_AME_FUSED", "0")  # the torch path
    ref = merge_tensor(xs, cfg, steps, pv, device=device, out_dtype=torch.float32, block_size=None)
    assert calls == [1]
    torch.testing.assert_close(got, ref, **tolerance(device))


def test_unsupported_configs_take_the_torch_path(device, monkeypatch):
    xs = _family(2, (100,), torch.float32, device)
    assert kernels.fused_supported(AMEConfig(optimizer="adam"), device, xs)
    assert not kernels.fused_supported(AMEConfig(optimizer="rmsprop"), device, xs)  # no kernel for it
    assert not kernels.fused_supported(AMEConfig(optimizer="adam", compute_dtype="float64"), device, xs)
    assert not kernels.fused_supported(AMEConfig(optimizer="adam"), device, [xs[0], xs[1].to(torch.bfloat16)])
    assert not kernels.fused_supported(AMEConfig(optimizer="adam"), device, [xs[0], torch.randn(10, 10, device=device).t()])
    assert kernels.fused_supported(AMEConfig(optimizer="adam", optimizer_kwargs={"foreach": False}), device, xs)
    monkeypatch.setenv("HF_AME_FUSED", "0")
    assert not kernels.fused_supported(AMEConfig(optimizer="adam"), device, xs)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernels.fused_supported(AMEConfig(optimizer="adam"), torch.device("cpu"), [torch.zeros(4)])


def test_registry_flags_the_fused_optimizers():
    from hf_ame.optimizers import list_optimizers

    flagged = {e.name for e in list_optimizers() if e.fused_kernel}
    assert flagged == {"sgd", "adam", "adamw", "adagrad"}


@pytest.mark.parametrize("cfg", [AMEConfig(optimizer="adamw", lr=1e-2, epochs=2, batch_size=2), AMEConfig.soup()],
                         ids=["adamw", "soup"])
def test_engine_merge_through_kernels_equals_torch_path(device, families, tmp_path, cfg, monkeypatch):
    paths = families["llama"]
    rep = merge_checkpoints(paths, tmp_path / "fused", cfg, progress=False, device_map=str(device), stream="tensor",
                            block_size=None)
    monkeypatch.setenv("HF_AME_FUSED", "0")
    merge_checkpoints(paths, tmp_path / "torch", cfg, progress=False, device_map=str(device), stream="tensor",
                      block_size=None)
    a, b = read_state(tmp_path / "fused"), read_state(tmp_path / "torch")
    assert a.keys() == b.keys() and rep.merged_tensors > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tolerance(device))


def test_large_batches_read_their_inputs_through_a_table(device):
    # batches of more than 4 inputs: addresses and batch indices come from one table on the device
    cfg = AMEConfig(optimizer="adamw", lr=1e-2, epochs=2, batch_size=5, optimizer_kwargs={"weight_decay": 0.01})
    xs = _family(7, (3000,), torch.float16, device, seed=9)  # batches of 5 and 2
    steps, pivot = plan_steps(7, cfg), resolve_pivot(cfg.pivot, 7)
    ref = merge_block([x.cpu() for x in xs], cfg, steps, pivot)
    got = kernels.fused_merge(xs, kernels.fused_soup(xs), cfg, steps, torch.float32)
    torch.testing.assert_close(got.cpu(), ref, **tolerance(device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_tensors_in_one_launch_give_the_bits_of_one_launch_each(device, dtype):
    """fused_soup_many / fused_merge_many (issue 34: small tensors are launch-bound one by one): one
    launch per soup and per step over tensors of any sizes, the same arithmetic as one launch each."""
    shapes = [(2048,), (3, 1371), (0,), (5000,), (1,)]  # a norm, odd sizes, an empty tensor, one element
    groups = [_family(3, shape, dtype, device, seed=k) for k, shape in enumerate(shapes)]
    for out_dtype in (torch.float32, torch.bfloat16):
        many = kernels.fused_soup_many(groups, out_dtype)
        assert [m.shape for m in many] == [g[0].shape for g in groups] and many[0].dtype == out_dtype
        # (the one-tensor launch is not asked for the empty tensor: the interpreter refuses its null address)
        assert all(torch.equal(m, kernels.fused_soup(g, out_dtype)) for m, g in zip(many, groups) if m.numel())
    for opt, kw, adaptive in [("adamw", {"weight_decay": 0.1, "amsgrad": True}, True),
                              ("sgd", {"momentum": 0.5, "nesterov": True}, False), ("adagrad", {}, True)]:
        cfg = AMEConfig(optimizer=opt, lr=1e-2, epochs=3, batch_size=2, optimizer_kwargs=kw, adaptive_pivot=adaptive)
        steps = plan_steps(3, cfg)
        inits = kernels.fused_soup_many(groups)
        many = kernels.fused_merge_many(groups, [w.clone() for w in inits], cfg, steps, torch.bfloat16)
        one = [kernels.fused_merge(g, w.clone(), cfg, steps, torch.bfloat16) for g, w in zip(groups, inits) if w.numel()]
        assert all(torch.equal(a, b) for a, b in zip([m for m in many if m.numel()], one)), opt
        assert (many[1].float() - groups[1][0].float()).abs().max() > 0  # the steps moved the merge


@pytest.mark.parametrize("cfg", [AMEConfig(optimizer="adamw", lr=1e-2, epochs=2, batch_size=2), AMEConfig.soup()],
                         ids=["adamw", "soup"])
def test_small_tensors_are_merged_together_one_launch_per_step(device, families, tmp_path, cfg, monkeypatch):
    """The plan groups consecutive small tensors (hf_ame.groups); the executor merges a group with one
    launch per soup and per step: the bytes of one launch per tensor, far fewer launches."""
    from hf_ame import groups, plan_merge

    paths, kw = families["llama"], dict(device_map=str(device), stream="tensor", block_size=None)
    plan = plan_merge(paths, tmp_path / "p", cfg, **kw)
    floating = [t for t in plan.tensors if t.transform in ("soup", "ame")]
    grouped = [t for t in floating if t.group >= 0]
    assert len(grouped) == len(floating) > 2 and len({t.group for t in grouped}) == 1  # tiny tensors: one group
    assert plan.to_dict()["tensors"][0]["group"] == plan.tensors[0].group
    launches = []
    real = kernels._launch
    monkeypatch.setattr(kernels, "_launch", lambda *a, **k: (launches.append(a[0].__name__), real(*a, **k))[1])
    rep = merge_checkpoints(paths, tmp_path / "together", cfg, progress=False, **kw)
    per_tensor = 1 if cfg.epochs == 1 and plan.exact_soup else 1 + len(plan.steps)  # the soup (pivot), each step
    assert len(launches) == per_tensor and rep.merged_tensors == len(floating)
    monkeypatch.setattr(groups, "GROUP_MAX_ELEMENTS", 0)  # nothing grouped: one launch per tensor and step
    launches.clear()
    merge_checkpoints(paths, tmp_path / "alone", cfg, progress=False, **kw)
    assert len(launches) == per_tensor * len(floating)
    # the norms grouped, the matrices between them alone: the group is merged when its last norm is read
    monkeypatch.setattr(groups, "GROUP_MAX_ELEMENTS", min(t.numel for t in floating))
    mixed = plan_merge(paths, tmp_path / "p", cfg, **kw).tensors
    small = [k for k, t in enumerate(mixed) if t.group >= 0]
    assert len(small) > 2 and any(mixed[k].group < 0 for k in range(small[0], small[-1]))
    merge_checkpoints(paths, tmp_path / "mixed", cfg, progress=False, **kw)
    a, b, c = read_state(tmp_path / "together"), read_state(tmp_path / "alone"), read_state(tmp_path / "mixed")
    assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
