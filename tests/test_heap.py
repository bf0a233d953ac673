"""Issue 34: glibc's heap during a merge (:mod:`hf_ame.heap`): block-sized buffers come from the heap
and stay mapped, so a block's buffers are not faulted in anew; a user's own malloc settings are kept."""
import os
import subprocess
import sys

import pytest

_FAULTS = r"""
import resource, threading, torch
from hf_ame.heap import block_heap
torch.set_num_threads(1)
def block():  # an AdamW block's buffers on a merge worker: merge, pseudogradient, two moments, output
    ts = [torch.ones(2**18) for _ in range(5)]  # 1 MiB each, freed at once
    return sum(float(t[::4096].sum()) for t in ts)
def faults(k=100):
    out = []
    def run():
        for _ in range(10):
            block()
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(k):
            block()
        out.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / k)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]
outside = faults()
with block_heap():
    inside = faults()
print(outside, inside)
"""


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    return {**env, **extra}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc parameters (Linux)")
def test_a_merges_block_buffers_are_not_faulted_in_anew():
    res = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, timeout=300, env=_clean_env())
    assert res.returncode == 0, res.stderr
    outside, inside = map(float, res.stdout.split())
    print("page faults per block outside / inside:", outside, inside)  # seen: 95.7 / 2.6, every run
    assert outside > 50 and inside < 0.1 * outside
    # the user's own setting is kept: nothing changes
    res = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, timeout=300,
                         env=_clean_env(MALLOC_TRIM_THRESHOLD_="131072"))
    outside, inside = map(float, res.stdout.split())  # seen: 1285 / 1285
    assert outside > 50 and inside > 0.5 * outside


def test_nested_merges_set_and_restore_once(monkeypatch):
    from hf_ame import heap

    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param.value, value.value))

        def malloc_trim(self, pad):
            calls.append(("trim", pad.value))

    monkeypatch.setattr(heap, "_glibc", lambda: Libc())
    with heap.block_heap():
        with heap.block_heap():  # a greedy soup's merge inside a merge, or two UI jobs at once
            pass
        assert calls == [(-3, 4 << 20), (-1, 64 << 20)]  # set once, still in force
    assert calls[2:] == [(-3, 32 << 20), (-1, 64 << 20), ("trim", 0)]
    monkeypatch.undo()
    assert heap._glibc() is not None  # Linux with glibc, as CI
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert heap._glibc() is None
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072")
    assert heap._glibc() is None
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")  # another parameter: the thresholds are ours
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert heap._glibc() is not None
    monkeypatch.setattr(heap.sys, "platform", "win32")  # (ctypes.CDLL(None) raises TypeError there)
    assert heap._glibc() is None
