"""Issue 34: the grain of a merge's parallelism and the work it skips. Streamed blocks are merged by
``torch.get_num_threads()`` workers with one intra-op thread each and written by them at their
offsets, whole tensors of methods merged side by side (same bytes as one thread, the user's thread
count restored); plain SGD steps of lr 1 never build a torch optimizer (whose
constructor imports torch._dynamo); a stateless run stops at a fixed point with the same bytes."""
import subprocess
import sys

import pytest
import torch

from conftest import read_state
from hf_ame import AMEConfig, merge_checkpoints
from hf_ame.algorithm import AMEStepper, plan_steps, soup
from hf_ame.testing import make_family
from hf_ame.threads import merge_threads, run_in_order


def _family(root, n=3):
    """n bf16 tiny Llamas; merged with block_size 1024, each tensor of theirs is several blocks."""
    return make_family("llama", root, n, dtype=torch.bfloat16)


@pytest.mark.parametrize("cfg", [AMEConfig.soup(), AMEConfig(optimizer="adamw", lr=1e-3, epochs=2, seed=1)],
                         ids=["soup", "adamw"])
def test_block_workers_give_the_bytes_of_one_thread_and_restore_the_users_threads(tmp_path, cfg):
    paths = _family(tmp_path)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        merge_checkpoints(paths, tmp_path / "two", cfg, progress=False, block_size=1024)
        assert torch.get_num_threads() == 2  # restored after the merge
        torch.set_num_threads(1)  # the user's choice: no workers at all
        merge_checkpoints(paths, tmp_path / "one", cfg, progress=False, block_size=1024)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    two, one = read_state(tmp_path / "two"), read_state(tmp_path / "one")
    assert all(torch.equal(two[k], one[k]) for k in one)


def test_merge_threads_run_work_with_one_intra_op_thread_and_raise_the_first_error():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen = []
        with merge_threads() as pool:
            assert pool is not None and torch.get_num_threads() == 1
            run_in_order(pool, lambda k: seen.append((k, torch.get_num_threads())), 9)
            assert sorted(seen) == [(k, 1) for k in range(9)]

            def fail(k):
                if k in (3, 5):
                    raise ValueError(f"block {k}")
            with pytest.raises(ValueError, match="block 3"):
                run_in_order(pool, fail, 9)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        with merge_threads() as pool:
            assert pool is None
    finally:
        torch.set_num_threads(before)


def test_one_shot_methods_never_import_torch_dynamo(tmp_path):
    """A one-shot method is one SGD step of lr 1: w - g, the optimizer's own update, without building
    torch.optim.SGD (its constructor imports torch._dynamo: about a second per process)."""
    paths = _family(tmp_path)
    code = ("import sys\nfrom hf_ame import AMEConfig, merge_checkpoints\n"
            f"merge_checkpoints({[str(p) for p in paths[1:]]!r}, {str(tmp_path / 'o')!r}, "
            "AMEConfig.one_shot('ties', density=0.5), base=" + repr(str(paths[0])) + ", progress=False)\n"
            f"for i, cfg in enumerate([AMEConfig.robust(), AMEConfig.soup()]):\n"
            f"    merge_checkpoints({[str(p) for p in paths]!r}, {str(tmp_path)!r} + f'/r{{i}}', cfg, progress=False)\n"
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo')\n"
            f"merge_checkpoints({[str(p) for p in paths]!r}, {str(tmp_path / 'a')!r}, AMEConfig(optimizer='adamw'), "
            "progress=False)\nprint('dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-3:] == ["no", "dynamo", "dynamo"], out  # loaded for the optimizer (before the workers)
    from hf_ame.algorithm import needs_optimizer

    assert not needs_optimizer(AMEConfig.robust(), plan_steps(3, AMEConfig.robust()))
    assert needs_optimizer(AMEConfig(optimizer="sgd", lr=0.5), plan_steps(3, AMEConfig(optimizer="sgd", lr=0.5)))
    assert needs_optimizer(AMEConfig(optimizer="adamw"), plan_steps(3, AMEConfig(optimizer="adamw")))
    gen = torch.Generator().manual_seed(0)  # the update it replaces: torch's SGD step, lr 1, any kernel
    w0, g = torch.randn(100_003, generator=gen), torch.randn(100_003, generator=gen) * 1e-3
    for kernel in ({"fused": True}, {"foreach": True}, {"foreach": False}):
        w = w0.clone().requires_grad_(True)
        w.grad = g.clone()
        torch.optim.SGD([w], lr=1.0, **kernel).step()
        assert torch.equal(w.detach(), w0 - g), kernel


def test_a_stateless_run_stops_at_a_fixed_point_with_the_same_bytes():
    """robust(tol=0) on bf16 copies whose float32 mean is exact: step 1 changes nothing, so the 19
    steps after it are skipped; every step run one by one gives the same bits."""
    gen = torch.Generator().manual_seed(0)
    xs = [(torch.randn(5000, generator=gen) * 0.01 + 1).to(torch.bfloat16) for _ in range(4)]
    cfg = AMEConfig.robust(tol=0.0)
    steps = plan_steps(4, cfg)
    early = AMEStepper([soup(xs)], cfg, ["w"])
    calls = []
    real = early.step
    early.step = lambda s, ing: (calls.append(s.t), real(s, ing))[1]
    got = early.run(steps, [xs])[0]
    full = AMEStepper([soup(xs)], cfg, ["w"])
    for s in steps:
        full.step(s, [xs])
    assert torch.equal(got, full.weights[0]) and len(calls) == 1 < len(steps)
    # a far-off ingredient: no fixed point for a while; tol=0 runs every step, tol=1e-6 stops
    # once a step moves the merge by under 1e-6 of its norm, within about that of the full run
    xs[3] = xs[3] * 40
    full = AMEStepper([soup(xs)], cfg, ["w"]).run(steps, [xs])[0]
    quick = AMEStepper([soup(xs)], AMEConfig.robust(), ["w"]).run(steps, [xs])[0]
    assert float((quick - full).norm() / full.norm()) < 1e-5
    assert not torch.equal(full, soup(xs))  # the far-off model's pull was capped


@pytest.mark.parametrize("cfg", [AMEConfig.one_shot("ties", density=0.5), AMEConfig.robust(),
                                 AMEConfig.one_shot("iso_cts", scaling=1.2, common_space_fraction=0.5),
                                 AMEConfig(optimizer="adamw", lr=1e-3, method="dare_ties", method_kwargs={"density": 0.6}, seed=3,
                                           pivot="base")],
                         ids=["ties", "robust", "iso_cts-svd", "adamw-dare_ties"])
def test_whole_tensors_merged_side_by_side_give_the_bytes_of_one_thread(tmp_path, cfg):
    """Tensors a method merges whole go to the workers, several at once, written in plan order: the
    same bytes, report and unchanged list (in plan order) as one thread; the plan says which. (An SVD
    gave other bytes on a worker until each worker set its own OpenMP/MKL count to 1.)"""
    from hf_ame import plan_merge

    base, *fts = make_family("llama", tmp_path, 4, dtype=torch.float32, noise=0.01)  # float32: no rounding hides
    fts[0] = base  # an ingredient equal to the base: a tensor left unchanged by TIES-like trims is possible
    kw = dict(base=base) if cfg.pivot == "base" else {}
    before = torch.get_num_threads()
    reports = {}
    try:
        for width in (2, 1):
            torch.set_num_threads(width)
            plan = plan_merge(fts, tmp_path / f"p{width}", cfg, **kw)
            side = [t.name for t in plan.tensors if t.side_by_side]
            assert (len(side) > 1) == (width == 2), side  # one thread: nothing beside anything
            reports[width] = merge_checkpoints(fts, tmp_path / f"w{width}", cfg, progress=False, **kw)
    finally:
        torch.set_num_threads(before)
    two, one = read_state(tmp_path / "w2"), read_state(tmp_path / "w1")
    assert list(two) == list(one) and all(torch.equal(two[k], one[k]) for k in one)
    for field in ("merged_tensors", "copied_tensors", "parameters", "unchanged", "bytes_written"):
        assert getattr(reports[2], field) == getattr(reports[1], field), field


def test_a_failure_beside_other_tensors_names_its_tensor_and_writes_nothing(tmp_path):
    """A non-finite copy in a tensor merged on a worker: the error names that tensor (the first in
    plan order), the workers finish, no output folder is left."""
    import safetensors.torch as st

    from hf_ame.errors import NonFiniteWeightsError

    paths = make_family("llama", tmp_path, 3, dtype=torch.float32)
    shard = next(paths[1].glob("*.safetensors"))
    state = st.load_file(shard)
    bad = sorted(k for k in state if k.endswith("mlp.up_proj.weight"))[0]
    state[bad][0, 0] = float("inf")
    st.save_file(state, shard, metadata={"format": "pt"})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(NonFiniteWeightsError, match=bad.replace(".", r"\.")):
            merge_checkpoints(paths, tmp_path / "out", AMEConfig.one_shot("ties", density=0.5), base=paths[0],
                              progress=False)
    finally:
        torch.set_num_threads(before)
    assert not (tmp_path / "out").exists()


def test_huber_skips_its_second_pass_on_a_clean_set_with_the_same_bytes():
    """The robust step reads each copy once more only when some model is capped; the result is the
    one of the two-pass form bit for bit, capped or not."""
    import statistics

    from hf_ame.methods import MethodContext, get_method

    def two_pass(ctx):  # the form before issue 34
        p = ctx.pivot
        r = [float(torch.linalg.vector_norm(ctx.get(i).sub_(p))) for i in range(ctx.n)]
        cap = 1.5 * max(statistics.median(r), 1e-12)
        w = [1.0 if ri <= cap else cap / ri for ri in r]
        acc = torch.zeros_like(p)
        for i in range(ctx.n):
            acc.add_(ctx.get(i).sub_(p), alpha=w[i])
        return acc.div_(sum(w)).neg_()

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(300, generator=g) for _ in range(5)]
    for far in (False, True):
        ys = [x.clone() for x in xs]
        if far:
            ys[2] = ys[2] * 50  # a diverged model: capped
        reads = []

        def get(i, ys=ys):
            reads.append(i)
            return ys[i].clone()
        params = {"__method__": "huber", "delta": 1.5, "eps": 1e-12, "tol": 0.0}
        ctx = MethodContext(pivot=sum(ys) / 5, get=get, indices=range(5), params=params, seed=0, key="t", step=1)
        got = get_method("huber").fn(ctx)
        assert len(reads) == (10 if far else 5)
        assert torch.equal(got, two_pass(MethodContext(pivot=sum(ys) / 5, get=lambda i, ys=ys: ys[i].clone(),
                                                        indices=range(5), params=params, seed=0, key="t", step=1)))


def test_blocks_written_by_workers_make_the_file_a_whole_write_makes(tmp_path):
    """Issue 34: merge workers write their blocks at their offsets (os.pwrite), in any order and from
    several threads; the file is byte for byte the one whole writes give, and a part outside its
    tensor is refused by name before anything is written."""
    import concurrent.futures as cf
    import random

    from hf_ame.writer import ShardedWriter, plan_shards

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(1000, generator=g).to(torch.bfloat16), "b": torch.randn(37, 5, generator=g),
               "c": torch.randn(300, generator=g).to(torch.bfloat16)}
    plan = plan_shards([(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], "2KB")
    assert len(plan.files) > 1
    (tmp_path / "whole").mkdir()
    (tmp_path / "parts").mkdir()
    whole = ShardedWriter(tmp_path / "whole", plan)
    for k, v in tensors.items():
        whole.write(k, v)
    whole.finish()
    parts = ShardedWriter(tmp_path / "parts", plan)
    with pytest.raises(ValueError, match="tensor 'c'"):
        parts.write_part("c", 290, tensors["c"][:20])
    jobs = [(k, s, v.reshape(-1)[s:s + 64]) for k, v in tensors.items() for s in range(0, v.numel(), 64)]
    random.Random(0).shuffle(jobs)
    with cf.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda j: parts.write_part(*j), jobs))
    for k in tensors:
        parts.written(k)
    assert parts.finish() == [*plan.files, "model.safetensors.index.json"]
    for f in plan.files:
        assert (tmp_path / "parts" / f).read_bytes() == (tmp_path / "whole" / f).read_bytes()
    assert parts.bytes_written == whole.bytes_written


def test_merge_workers_write_blocks_without_an_output_tensor():
    from hf_ame.algorithm import resolve_pivot
    from hf_ame.blocks import block_bounds, merge_blocks_on

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(5000, generator=g).to(torch.bfloat16) for _ in range(3)]
    cfg = AMEConfig(optimizer="adamw", lr=1e-2, epochs=2)
    steps, bounds = plan_steps(3, cfg), block_bounds(5000, 1024)
    got = torch.empty(5000, dtype=torch.bfloat16)

    def sink(start, block):
        got[start:start + block.numel()] = block
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # two workers, whatever the machine
        with merge_threads() as pool:
            whole = merge_blocks_on(pool, lambda k: [x[slice(*bounds[k])] for x in xs], bounds, (5000,), 3, cfg,
                                    steps, resolve_pivot(cfg.pivot, 3), out_dtype=torch.bfloat16)
            none = merge_blocks_on(pool, lambda k: [x[slice(*bounds[k])] for x in xs], bounds, (5000,), 3, cfg,
                                   steps, resolve_pivot(cfg.pivot, 3), out_dtype=torch.bfloat16, sink=sink)
    finally:
        torch.set_num_threads(before)
    assert none is None and torch.equal(got, whole)
