"""Merge methods: quality on the digits class-exclusion set, and speed/memory against mergekit.

    bash scripts/setup.sh      # mergekit is in the test extra
    .venv/bin/python benchmarks/methods.py quality [--seeds 0 1 2] [--models 6]
    .venv/bin/python benchmarks/methods.py speed [--reps 2]
    .venv/bin/python benchmarks/methods.py robust [--outliers 1]

quality: for each seed, 6 ViT fine-tunes of one pretrained model that each never see half of the
classes (examples/digits.py), with that pretrained model (and the head init) as base. Each method
alone (one shot, its parameter chosen on the validation split from a small grid) and composed with
AdamW-AME (all ingredients in each step, from the base; method parameter, lr and epochs chosen on
validation); the uniform soup, the best single ingredient and plain AdamW-AME (soup pivot) for
reference. Test accuracy, mean and spread over seeds.

speed: a base and 3 fine-tunes of a ~75M-parameter Llama (float32, ~300 MB each, under
benchmarks/.data), each method one shot by `hf-ame merge` and by `mergekit-yaml`, each run in its own
process (wall time including start-up, peak RSS from wait4), interleaved, best of ``--reps``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))  # digits.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GRIDS = {  # each method's own parameter, chosen on validation
    "task_arithmetic": [{"weight": w} for w in (1 / 6, 0.3, 0.5)],
    "ties": [{"density": d, "weight": 1.0} for d in (0.2, 0.5, 0.8)],
    "dare_linear": [{"density": d, "weight": 1 / 6} for d in (0.3, 0.5, 0.8)],
    "dare_ties": [{"density": d, "weight": 1 / 6} for d in (0.3, 0.5, 0.8)],  # normalize is off (mergekit's default)
    "breadcrumbs_ties": [{"density": d, "gamma": 0.01, "weight": 1 / 6} for d in (0.5, 0.8, 0.9)],
    "model_stock": [{}],
}
AME_GRID = [dict(optimizer="adamw", lr=lr, epochs=e) for lr, e in itertools.product((1e-4, 1e-3), (1, 5))]
# composed: every ingredient in each step (the sign election sees them all), from the base
METHOD_AME_GRID = [dict(optimizer="adamw", lr=lr, epochs=e, batch_size=None) for lr, e in itertools.product((1e-3, 1e-2), (3, 10))]


def quality(seeds, n_models: int) -> dict:
    import warnings

    from digits import DigitsSetup, accuracy, build_digits_ingredients, digits_base, load_digits_splits
    from hf_ame import AMEConfig, AMEMerger

    warnings.simplefilter("ignore")
    rows: dict = {}
    for seed in seeds:
        setup = DigitsSetup(n_models=n_models, seed=seed)
        paths = build_digits_ingredients(HERE / ".data" / "digits", setup, verbose=False)
        base = digits_base(paths)
        splits = load_digits_splits(seed)
        val = lambda p: accuracy(p, *splits["validation"])  # noqa: E731
        test = lambda p: accuracy(p, *splits["test"])  # noqa: E731
        merger = AMEMerger.from_pretrained([str(p) for p in paths], base_model=str(base), device_map="cpu")
        work = Path(tempfile.mkdtemp(prefix="hf_ame-methods-"))
        try:
            def best(name, configs):
                trials = []
                for i, kw in enumerate(configs):
                    out = work / f"{name}-{i}"
                    t0 = time.perf_counter()
                    merger.merge(**kw, output_dir=out, write_card=False, progress=False)
                    trials.append((val(out), -i, kw, out, time.perf_counter() - t0))
                v, _, kw, out, sec = max(trials, key=lambda t: (t[0], t[1]))
                rows.setdefault(name, []).append({"seed": seed, "val": v, "test": test(out), "chosen": kw, "seconds": sec})

            rows.setdefault("best ingredient", []).append({"seed": seed, "test": max(test(p) for p in paths)})
            best("uniform soup", [dict(config=AMEConfig.soup())])
            best("AdamW-AME", AME_GRID)
            for method, grid in GRIDS.items():
                best(f"{method}", [dict(method=method, **g) for g in grid])
                best(f"{method} + AdamW-AME", [dict(method=method, **g, **a) for g in grid for a in METHOD_AME_GRID])
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"[quality] seed {seed} done", flush=True)
    return rows


def robust(seeds, n_models: int, outliers: int) -> dict:
    """Soup vs AMEConfig.robust() on the digits fine-tunes, clean and with ``outliers`` extra
    ingredients whose weights are a fine-tune's times 10 (a diverged or corrupt upload)."""
    import warnings

    import torch
    from safetensors.torch import load_file, save_file

    from digits import DigitsSetup, accuracy, build_digits_ingredients, load_digits_splits
    from hf_ame import AMEConfig, merge_checkpoints

    warnings.simplefilter("ignore")
    rows: dict = {}
    for seed in seeds:
        paths = build_digits_ingredients(HERE / ".data" / "digits", DigitsSetup(n_models=n_models, seed=seed), verbose=False)
        test = lambda p: accuracy(p, *load_digits_splits(seed)["test"])  # noqa: E731
        work = Path(tempfile.mkdtemp(prefix="hf_ame-robust-"))
        try:
            bad = []
            for k in range(outliers):  # ingredient k's weights x 10
                d = work / f"outlier-{k}"
                shutil.copytree(paths[k], d)
                state = load_file(d / "model.safetensors")
                save_file({n: (t * 10 if t.is_floating_point() else t) for n, t in state.items()}, d / "model.safetensors",
                          metadata={"format": "pt"})
                bad.append(d)
            for label, ings in (("clean", paths), (f"+{outliers} outliers x10", paths + bad)):
                for name, cfg in (("uniform soup", AMEConfig.soup()), ("AMEConfig.robust()", AMEConfig.robust())):
                    out = work / f"{label}-{name}".replace(" ", "_")
                    merge_checkpoints(ings, out, cfg, progress=False)
                    rows.setdefault(f"{name}, {label}", []).append({"seed": seed, "test": test(out)})
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"[robust] seed {seed} done", flush=True)
    return rows


def print_quality(rows: dict) -> None:
    print(f"\n{'merge':<32} {'test acc (mean +- sd over seeds)':<34} chosen on validation (seed 0)")
    for name, rs in rows.items():
        accs = [r["test"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        chosen = rs[0].get("chosen")
        chosen = "" if chosen is None else ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in chosen.items() if k != "config")
        print(f"{name:<32} {statistics.mean(accs):.4f} +- {sd:.4f}{'':<19} {chosen}")


# ------------------------------------------------------------------------------------------------ speed
LLAMA = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12, num_key_value_heads=4,
             vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
SPEED = {"task_arithmetic": {"weight": 0.5}, "ties": {"density": 0.5, "weight": 1.0},
         "dare_ties": {"density": 0.5, "weight": 1.0}, "breadcrumbs": {"density": 0.8, "gamma": 0.01, "weight": 0.5},
         "model_stock": {}, "slerp": {"t": 0.5}}


def build_llama() -> list:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = HERE / ".data" / "methods-llama"
    paths = [root / f"m-{i}" for i in range(4)]
    if all((p / "config.json").exists() for p in paths):
        return paths
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(paths):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for k, t in model.state_dict().items():
                t.copy_(init[k] + (torch.randn(t.shape, generator=g) * 0.01 if i else 0))
        model.save_pretrained(p)
    return paths


# Started by a small python process, not by this one: Linux counts a forked child's copy of its
# parent's pages in the child's ru_maxrss (kept across exec), so a child forked from a benchmark that
# holds loaded tensors reports at least the benchmark's own RSS.
_LAUNCHER = ("import os, subprocess, sys\n"
             "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
             "_, status, usage = os.wait4(p.pid, 0)\n"
             "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)\n")


def run_timed(cmd: list) -> tuple:
    """Run ``cmd`` in its own process: (wall seconds, peak RSS in MiB from wait4, measured by a small
    launcher process); raises with its stderr on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    rc, maxrss = (int(x) for x in proc.stdout.split()[-2:])
    if rc != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr[-2000:]}")
    return seconds, maxrss / 1024


def speed(reps: int) -> dict:
    import yaml

    paths = build_llama()
    base, fts = paths[0], paths[1:]
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
    print(f"[speed] base + 3 fine-tunes of {size:.0f} MiB each (float32)", flush=True)
    bin_dir = Path(sys.executable).parent
    res: dict = {}
    for rep in range(reps):
        for method, params in SPEED.items():
            models = fts[:1] if method == "slerp" else fts
            with tempfile.TemporaryDirectory(prefix="hf_ame-mspeed-") as tmp:
                args = [str(bin_dir / "hf-ame"), "merge", *map(str, models), "--base-model", str(base), "--method", method,
                        "--out", f"{tmp}/ours", "--device", "cpu", "--no-progress"]
                for k, v in params.items():
                    args += ["--param", f"{k}={v}"]
                per = ("weight", "density", "gamma")
                entries = [{"model": str(m), "parameters": {k: v for k, v in params.items() if k in per}} for m in models]
                if method == "slerp":
                    entries.append({"model": str(base)})
                cfg = {"merge_method": method, "base_model": str(base), "dtype": "float32", "models": entries}
                if any(k not in per for k in params):
                    cfg["parameters"] = {k: v for k, v in params.items() if k not in per}
                Path(f"{tmp}/mk.yml").write_text(yaml.safe_dump(cfg))
                mk = [str(bin_dir / "mergekit-yaml"), f"{tmp}/mk.yml", f"{tmp}/mk", "--no-copy-tokenizer", "--quiet"]
                for who, cmd in (("hf_ame", args), ("mergekit", mk)):
                    sec, rss = run_timed(cmd)
                    res.setdefault(method, {}).setdefault(who, []).append((sec, rss))
                    print(f"  rep {rep + 1} {method:<16} {who:<9} {sec:6.2f}s  peak RSS {rss:6.0f} MiB", flush=True)
    return res


def print_speed(res: dict) -> None:
    print(f"\n{'method':<16} {'hf_ame s':>9} {'mergekit s':>11} {'ratio':>6} {'hf_ame RSS':>11} {'mergekit RSS':>13}")
    for method, d in res.items():
        (hs, hr), (ms, mr) = min(d["hf_ame"]), min(d["mergekit"])
        hr, mr = max(r for _, r in d["hf_ame"]), max(r for _, r in d["mergekit"])
        print(f"{method:<16} {hs:9.2f} {ms:11.2f} {hs / ms:6.2f} {hr:9.0f} MiB {mr:9.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["quality", "speed", "robust"])
    ap.add_argument("--outliers", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", type=int, default=6)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    if a.part == "robust":
        rows = robust(a.seeds, a.models, a.outliers)
        print_quality(rows)
    elif a.part == "quality":
        rows = quality(a.seeds, a.models)
        print_quality(rows)
        (HERE / ".data").mkdir(exist_ok=True)
        (HERE / ".data" / "methods_quality.json").write_text(json.dumps(rows, indent=1, default=str))
    else:
        res = speed(a.reps)
        print_speed(res)
        (HERE / ".data" / "methods_speed.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
