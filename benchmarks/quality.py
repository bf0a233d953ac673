"""Does AME do what the paper claims? Two experiments, offline, on this machine.

    .venv/bin/python benchmarks/quality.py [--levels 0.1 0.5 0.7 0.8 0.9] [--seeds 0 1 2] [--models 6]

1. Class exclusion (the paper's ViT/CIFAR-10 table, on scikit-learn digits): one ViT pretrained on a
   disjoint split, K fine-tunes that each never see a fraction of the classes. Full test accuracy of
   the best single ingredient, the uniform soup, the greedy soup and AdamW-AME whose (lr, epochs)
   are chosen on the validation split only. Mean and spread over seeds.
2. Heavy tails (the paper's Cauchy experiment): 300 two-dimensional "ingredients" drawn from a
   Cauchy (or Gaussian) distribution centred at 0; Adam-AME (lr 0.1, beta1 = beta2 = 0.2, eps 1e-8,
   batch 20, 200 epochs, constant lr, started at (10, 10)), SGD-AME (lr 1, harmonic) and the soup
   (mean); distance of each to the sample median and to the true centre, over trials.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def class_exclusion_table(levels, seeds, models, cache):
    from hf_ame.demo import class_exclusion
    from hf_ame.digits import DigitsSetup

    rows = []
    for level in levels:
        per = {"best": [], "soup": [], "greedy": [], "ame": []}
        for seed in seeds:
            t0 = time.perf_counter()
            r = class_exclusion(DigitsSetup(n_models=models, unseen_fraction=level, seed=seed), cache, verbose=False)
            per["best"].append(r["best_ingredient"])
            per["soup"].append(r["soup"])
            per["greedy"].append(r["greedy_soup"])
            per["ame"].append(r["ame"])
            c = r["ame_config"]
            print(f"  unseen {level:.0%} seed {seed}: best {r['best_ingredient']:.4f} soup {r['soup']:.4f} "
                  f"greedy {r['greedy_soup']:.4f} AME {r['ame']:.4f} (lr {c.lr:g}, {c.epochs} ep; "
                  f"val {r['ame_val']:.4f} vs soup {r['soup_val']:.4f}) [{time.perf_counter() - t0:.0f}s]", flush=True)
        rows.append((level, per))
    return rows


def fmt(xs):
    m = statistics.mean(xs) * 100
    s = statistics.stdev(xs) * 100 if len(xs) > 1 else 0.0
    return f"{m:6.2f} ± {s:4.2f}"


def heavy_tails(trials=20, n=300):
    from hf_ame import AMEConfig, ame_merge

    adam = AMEConfig(optimizer="adam", lr=0.1, lr_schedule="constant", epochs=200, batch_size=20, shuffle=True,
                     pivot="base", optimizer_kwargs={"betas": (0.2, 0.2), "eps": 1e-8})
    sgd = AMEConfig(optimizer="sgd", lr=1.0, lr_schedule="harmonic", epochs=200, batch_size=20, shuffle=True,
                    pivot="base")
    start = torch.tensor([10.0, 10.0])
    out = {}
    for dist in ("cauchy", "gaussian"):
        err = {"Adam-AME": [], "SGD-AME": [], "soup (mean)": []}
        err0 = {k: [] for k in err}
        for t in range(trials):
            g = torch.Generator().manual_seed(t)
            if dist == "cauchy":  # inverse CDF of the standard Cauchy
                pts = torch.tan(torch.pi * (torch.rand(n, 2, generator=g) - 0.5))
            else:
                pts = torch.randn(n, 2, generator=g)
            xs = list(pts)
            med = pts.median(0).values
            res = {"Adam-AME": ame_merge(xs, adam.replace(seed=t), base=start),
                   "SGD-AME": ame_merge(xs, sgd.replace(seed=t), base=start),
                   "soup (mean)": pts.mean(0)}
            for k, v in res.items():
                err[k].append(float((v - med).norm()))
                err0[k].append(float(v.norm()))
        out[dist] = (err, err0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.1, 0.5, 0.7, 0.8, 0.9])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", type=int, default=6)
    ap.add_argument("--cache", default=str(HERE / ".data" / "quality"))
    ap.add_argument("--skip-class-exclusion", action="store_true")
    ap.add_argument("--trials", type=int, default=20)
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = {}
    if not args.skip_class_exclusion:
        print(f"class exclusion: {args.models} ViT ingredients per run, seeds {args.seeds}")
        rows = class_exclusion_table(args.levels, args.seeds, args.models, args.cache)
        print()
        print(f"full test accuracy (%) on digits, mean ± std over {len(args.seeds)} seeds; AME (lr, epochs) chosen on validation")
        print(f"{'unseen classes':>14} | {'best ingredient':>15} | {'uniform soup':>15} | {'greedy soup':>15} | {'AdamW-AME':>15}")
        for level, per in rows:
            print(f"{level:>13.0%} | {fmt(per['best']):>15} | {fmt(per['soup']):>15} | {fmt(per['greedy']):>15} | {fmt(per['ame']):>15}")
        results["class_exclusion"] = [{"unseen": lv, **per} for lv, per in rows]
    print()
    ht = heavy_tails(args.trials)
    print(f"heavy tails: 300 points in 2-D, {args.trials} trials; mean distance to the sample median "
          "(and to the true centre 0)")
    print(f"{'':>12} | {'Adam-AME':>17} | {'SGD-AME':>17} | {'soup (mean)':>17}")
    for dist, (err, err0) in ht.items():
        cells = [f"{statistics.mean(err[k]):7.3f} ({statistics.mean(err0[k]):7.3f})" for k in err]
        print(f"{dist:>12} | " + " | ".join(f"{c:>17}" for c in cells))
    results["heavy_tails"] = {d: {"to_median": e, "to_centre": e0} for d, (e, e0) in ht.items()}
    Path(HERE / ".data").mkdir(exist_ok=True)
    (HERE / ".data" / "quality_results.json").write_text(json.dumps(results, indent=1))
    print(f"\ntotal {time.perf_counter() - t0:.0f}s; results in {HERE / '.data' / 'quality_results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
