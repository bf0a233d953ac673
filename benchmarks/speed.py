"""Speed and memory of a merge against the I/O floor and mergekit, on a quiet and a busy machine, in ONE run.

    bash scripts/setup.sh && .venv/bin/pip install -e ".[bench]"     # mergekit, once
    .venv/bin/python benchmarks/speed.py [--ns 2 4 8] [--reps 2] [--scale small|medium|default|large] [--busy]

Builds N perturbed copies of one causal LM (Llama architecture, bf16 safetensors, sharded like Hub
models) under benchmarks/.data, then runs every method in its own subprocess, interleaved
(rep 1: all methods, rep 2: all methods, ...), recording wall time and the child's peak RSS
(wait4). Inputs sit in the page cache for every method alike (the floor reads them too). Prints the
best time per method, ratios to the floor, to mergekit and to the soup, and checks that hf_ame's
soup and mergekit's linear merge agree within bf16 rounding. ``--busy``: each method is also timed
beside a competing torch process on every core (started before the child, killed after it), as
when a merge runs next to a fine-tune (issue 34).

Methods: floor (read every input byte once + write one model's bytes), hf_ame soup (default
"auto" stream, on CPU: one cache block of every ingredient at a time, read with preadv), hf_ame
soup with stream="tensor" (the N memory-mapped copies of a tensor, merged in cache blocks),
hf_ame AdamW-AME 1, 3 and 10 epochs, the robust preset (AMEConfig.robust(): 20 Huber steps), TIES
one-shot (the first copy as base), mergekit linear (if installed: pip install mergekit==0.1.5),
naive (from_pretrained all N models, average, save_pretrained; only when named in --methods).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / ".data"
SCALES = {  # ~245M parameters ("default"), ~162M ("medium": 4 x 324 MB bf16, issue 34's case), ~30M ("small"),
    # ~923M ("large": 4 x 1.8 GB bf16, issue 34's larger case)
    "large": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=32,
                  num_key_value_heads=4, vocab_size=32000),
    "medium": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12,
                   num_key_value_heads=4, vocab_size=40000),
    "default": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                    num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=16000),
}


def build(scale: str, n: int) -> list:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = DATA / f"llama-{scale}"
    paths = [root / f"ft-{i}" for i in range(n)]
    if all((p / "model.safetensors.index.json").exists() for p in paths):
        return paths
    cfg = LlamaConfig(**SCALES[scale], max_position_embeddings=2048, tie_word_embeddings=False,
                      architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"[build] {sum(v.numel() for v in init.values()) / 1e6:.0f}M parameters, bf16, {n} copies", flush=True)
    for i, p in enumerate(paths):
        if (p / "model.safetensors.index.json").exists():
            continue
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for k, t in model.state_dict().items():
                t.copy_(init[k] + (torch.randn(t.shape, generator=g) * 0.01).to(torch.bfloat16))
        model.save_pretrained(p, max_shard_size="200MB")
    return paths


# Each child does its imports, then times only the work, and reports its own peak RSS (VmHWM,
# reset at exec, so the parent's memory never counts) and its children's (mergekit's workers).
# RSS also counts the page-cache pages of memory-mapped inputs (safetensors maps its files: clean,
# shared, dropped under memory pressure), so a thread also samples RssAnon every 5 ms: the memory
# a process really allocates.
_HEADER = r"""
import threading as _th, time as _time
_ANON = [0.0]
def _sample():
    while True:
        for _l in open("/proc/self/status"):
            if _l.startswith("RssAnon:"):
                _ANON[0] = max(_ANON[0], int(_l.split()[1]) / 1024)
        _time.sleep(0.005)
_th.Thread(target=_sample, daemon=True).start()
"""
_FOOTER = r"""
import json, resource
hwm = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        hwm = int(line.split()[1]) / 1024
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print("RESULT " + json.dumps({"t": _T1 - _T0, "rss": max(hwm, kids), "anon": _ANON[0]}))
"""

def _merge_child(config: str, extra: str = "", first: int = 1) -> str:
    """A child that times one ``merge_checkpoints`` of its arguments (inputs from ``sys.argv[first]``,
    the output last) with the config expression ``config`` and keyword text ``extra``."""
    return (f"\nimport sys, time\nfrom hf_ame import AMEConfig, merge_checkpoints\n_T0 = time.perf_counter()\n"
            f"merge_checkpoints(sys.argv[{first}:-1], sys.argv[-1], {config}, progress=False, "
            f"max_shard_size=\"2GB\"{extra})\n_T1 = time.perf_counter()\n")


CHILD = {
    "floor": r"""
import sys, os, time
paths, out = sys.argv[1:-1], sys.argv[-1]
_T0 = time.perf_counter()
buf = bytearray(16 << 20); mv = memoryview(buf); model_bytes = 0
for i, p in enumerate(paths):
    for f in sorted(os.listdir(p)):
        if f.endswith(".safetensors"):
            with open(os.path.join(p, f), "rb", buffering=0) as fh:
                while True:
                    n = fh.readinto(mv)
                    if not n: break
                    if i == 0: model_bytes += n
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "blob"), "wb", buffering=0) as fh:
    left = model_bytes
    while left > 0:
        n = min(left, len(buf)); fh.write(mv[:n]); left -= n
_T1 = time.perf_counter()
""",
    "hf_ame soup": _merge_child("AMEConfig.soup()"),
    "hf_ame soup, tensor": _merge_child("AMEConfig.soup()", ', stream="tensor"'),
    "hf_ame AdamW 1 ep": _merge_child('AMEConfig(optimizer="adamw", lr=1e-4, epochs=1)'),
    "hf_ame AdamW 10 ep": _merge_child('AMEConfig(optimizer="adamw", lr=1e-4, epochs=10)'),
    "hf_ame AdamW 3 ep": _merge_child('AMEConfig(optimizer="adamw", lr=1e-4, epochs=3)'),
    "hf_ame robust": _merge_child("AMEConfig.robust()"),
    "hf_ame ties": _merge_child('AMEConfig.one_shot("ties", density=0.5)', ", base=sys.argv[1]", first=2),
    "mergekit linear": r"""
import sys, os, time
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
paths, out = sys.argv[1:-1], sys.argv[-1]
cfg = MergeConfiguration.model_validate({"merge_method": "linear", "dtype": "bfloat16", "parameters": {"normalize": True},
       "models": [{"model": os.path.abspath(p), "parameters": {"weight": 1.0}} for p in paths]})
_T0 = time.perf_counter()
run_merge(cfg, out, options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False, out_shard_size=10**9))
_T1 = time.perf_counter()
""",
    "naive from_pretrained": r"""
import sys, time, torch
from transformers import AutoModelForCausalLM
paths, out = sys.argv[1:-1], sys.argv[-1]
_T0 = time.perf_counter()
models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.bfloat16) for p in paths]
sds = [m.state_dict() for m in models]
avg = {k: torch.stack([sd[k].float() for sd in sds]).mean(0).to(torch.bfloat16) for k in sds[0]}
models[0].load_state_dict(avg)
models[0].save_pretrained(out)
_T1 = time.perf_counter()
""",
}
SLOW = ("naive from_pretrained",)  # not run unless named in --methods


BASELINE = " [baseline]"  # suffix of a method run with --baseline's hf_ame


def run_child(code: str, paths, out: Path, pythonpath: str = "") -> tuple:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if pythonpath:  # another checkout's hf_ame (e.g. a git worktree of an older commit)
        env["PYTHONPATH"] = pythonpath
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path, before PYTHONPATH
    res = subprocess.run([sys.executable, "-c", _HEADER + code + _FOOTER, *map(str, paths), str(out)], env=env,
                         capture_output=True, text=True, cwd=tempfile.gettempdir())
    if res.returncode != 0:
        raise RuntimeError(f"child failed ({res.returncode}): {res.stderr[-2000:]}")
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")][-1]
    r = json.loads(line[7:])
    return r["t"], r["rss"], r["anon"]


def compare_soup_mergekit(a: Path, b: Path) -> str:
    import torch
    from safetensors.torch import load_file

    def load(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    x, y = load(a), load(b)
    if x.keys() != y.keys():
        return f"tensor names differ: {sorted(set(x) ^ set(y))[:5]}"
    worst, differ, total = 0.0, 0, 0
    for k in x:
        d = (x[k].float() - y[k].float()).abs()
        ulp = torch.finfo(torch.bfloat16).eps * x[k].float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
        worst = max(worst, float((d / ulp).max()))
        differ += int((d > 0).sum())
        total += d.numel()
    return f"{len(x)} tensors; {differ / total:.2%} of elements differ; max difference {worst:.2f} bf16 ulp"


# The busy machine of issue 34: another torch job on every core (a merge beside a fine-tune or an
# evaluation), started before a timed child and stopped after it.
_BUSY = """import torch
model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.GELU(), torch.nn.LayerNorm(1024), torch.nn.Linear(1024, 1024))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
while True:  # a small fine-tune: many small operations, each a parallel region on every core
    loss = model(torch.randn(128, 1024)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
"""


BUSY_PROCESSES = 2  # two small fine-tunes beside the merge (each with torch's default threads)


@contextlib.contextmanager
def competitor(on: bool):
    """Competing torch processes on all cores while the block runs (nothing when ``on`` is False)."""
    if not on:
        yield
        return
    procs = [subprocess.Popen([sys.executable, "-c", _BUSY], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(BUSY_PROCESSES)]
    time.sleep(1.5)  # their threads are up and spinning
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def run_all(args, methods, paths_all, work: Path) -> dict:
    """Every (N, mode, method) run, interleaved: rep 1 of everything, then rep 2, ..."""
    results: dict = {}
    modes = ["quiet", "busy"] if args.busy else ["quiet"]
    for n in args.ns:
        paths = paths_all[:n]
        run_child(CHILD["floor"], paths, work / "warm")  # page-cache warm-up, not timed
        shutil.rmtree(work / "warm", ignore_errors=True)
        for rep in range(args.reps):
            for m in methods:
                for mode in modes:
                    out = work / f"{n}-{m.replace(' ', '_')}-{mode}-{rep}"
                    os.sync()  # the previous output's writeback must not land in this timing
                    with competitor(mode == "busy"):
                        wall, rss, anon = run_child(CHILD[m.removesuffix(BASELINE)], paths, out,
                                                    args.baseline if m.endswith(BASELINE) else "")
                    results.setdefault((n, mode, m), []).append((wall, rss, anon))
                    print(f"  N={n} rep {rep + 1} {mode:<5} {m:<24} {wall:7.2f}s  peak RSS {rss:8.0f} MiB  "
                          f"anon {anon:6.0f} MiB", flush=True)
                    if rep < args.reps - 1 or mode != "quiet" or m not in ("hf_ame soup", "mergekit linear"):
                        shutil.rmtree(out, ignore_errors=True)
        if "mergekit linear" in methods and "hf_ame soup" in methods:
            last = args.reps - 1
            print(f"  N={n} soup vs mergekit linear: " + compare_soup_mergekit(
                work / f"{n}-hf_ame_soup-quiet-{last}", work / f"{n}-mergekit_linear-quiet-{last}"))
        for p in work.glob(f"{n}-*"):
            shutil.rmtree(p, ignore_errors=True)
    return results


def report(args, methods, results: dict, model_bytes: int) -> None:
    print()
    print(f"best of {args.reps} interleaved runs; times exclude interpreter start-up and imports; "
          "ratios are within this run and mode (busy: a competing torch process on all cores)")
    print(f"{'N':>2} {'mode':<5} {'method':<34} {'wall s':>8} {'peak RSS MiB':>13} {'anon MiB':>9} {'x floor':>8} "
          f"{'x mergekit':>10} {'x soup':>7}")
    summary = []
    for (n, mode) in sorted({(k[0], k[1]) for k in results}, key=lambda k: (k[0], k[1] != "quiet")):
        best = {m: min(r[0] for r in results[(n, mode, m)]) for m in methods}
        floor, mk, soup = best.get("floor"), best.get("mergekit linear"), best.get("hf_ame soup")  # this checkout's
        for m in methods:
            w, rss = best[m], max(r[1] for r in results[(n, mode, m)])
            anon = max(r[2] for r in results[(n, mode, m)])
            ratios = [f"{w / ref:{width}.2f}" if ref else f"{'-':>{width}}" for ref, width in ((floor, 8), (mk, 10), (soup, 7))]
            print(f"{n:>2} {mode:<5} {m:<34} {w:8.2f} {rss:13.0f} {anon:9.0f} " + " ".join(ratios))
            summary.append({"n": n, "mode": mode, "method": m, "wall_s": w, "peak_rss_mib": rss, "peak_anon_mib": anon,
                            "x_floor": w / floor if floor else None, "x_mergekit": w / mk if mk else None,
                            "x_soup": w / soup if soup else None})
    (DATA / "speed_results.json").write_text(json.dumps(summary, indent=1))
    print(f"\nmodel size {model_bytes / 2**20:.0f} MiB; {os.cpu_count()} CPU cores; results also in "
          f"{DATA / 'speed_results.json'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--scale", choices=list(SCALES), default="default")
    ap.add_argument("--methods", nargs="+", default=[m for m in CHILD if m not in SLOW])
    ap.add_argument("--busy", action="store_true", help="also time every method beside a competing torch process")
    ap.add_argument("--baseline", default="", metavar="DIR",
                    help="also run each hf_ame method with the hf_ame of this checkout (PYTHONPATH=DIR), in the same run")
    args = ap.parse_args()
    # a kill (SIGTERM) unwinds like Ctrl-C: competitors stopped, the scratch folder removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    has_mergekit = shutil.which("mergekit-yaml", path=os.path.dirname(sys.executable)) is not None
    methods = [m for m in args.methods if m != "mergekit linear" or has_mergekit]
    if args.baseline:
        methods += [m + BASELINE for m in methods if m.startswith("hf_ame")]
    if not has_mergekit:
        print("[note] mergekit not installed (pip install mergekit==0.1.5): skipping it")
    paths_all = build(args.scale, max(args.ns))
    model_bytes = sum(f.stat().st_size for f in paths_all[0].glob("*.safetensors"))
    print(f"[model] {model_bytes / 2**20:.0f} MiB of bf16 safetensors per ingredient, "
          f"{len(list(paths_all[0].glob('*.safetensors')))} shards; {os.cpu_count()} CPU cores")
    work = Path(tempfile.mkdtemp(prefix="hf_ame-bench-", dir=DATA))
    try:
        results = run_all(args, methods, paths_all, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, methods, results, model_bytes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
