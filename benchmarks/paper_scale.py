"""AME at the paper's scale (issue 14): 30 ingredients per set, the five unseen-class levels, and
ingredients that went wrong.

    bash scripts/setup.sh && .venv/bin/pip install optuna   # only for --n-trials
    .venv/bin/python benchmarks/paper_scale.py [--levels 0.1 0.5 0.7 0.8 0.9] [--seeds 0 1 2] [--models 30]

1. Class exclusion on scikit-learn digits (examples/digits.py): 30 ViT fine-tunes of one pretrained
   ViT, each never seeing a fraction of the 10 classes. Full test accuracy of the best single
   ingredient, the uniform soup, the greedy soup, AdamW-AME chosen by ``merge(search=...)`` on the
   validation split (trial 0 the soup; lr in {1e-4, 1e-3} x epochs in {1, 3}), ``AMEConfig.robust()``
   (Huber IRLS, no evaluation data), the geometric median (the same steps with method
   ``geometric_median``) and the coordinate-wise median (registered here with ``register_method``:
   a user-defined method is one function).
2. Outliers: the 30 fine-tunes at 50% unseen plus 0, 1, 3 or 6 extra ingredients whose weights
   are a fine-tune's times 10 (a diverged or corrupt upload): soup, robust preset, geometric
   median, coordinate median, AME with search.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List

import torch
from safetensors.torch import load_file, save_file

from hf_ame import AMEConfig, AMEMerger, register_method

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))

from digits import DigitsSetup, accuracy, build_digits_ingredients, digits_dataset, load_digits_splits  # noqa: E402

SPACE = {"lr": [1e-4, 1e-3], "epochs": [1, 3]}
AME = AMEConfig(optimizer="adamw", batch_size=2, shuffle=True, optimizer_kwargs={"weight_decay": 0.0})


def _coordinate_median(ctx) -> torch.Tensor:
    """Pseudogradient p - median_j(x_j), coordinate by coordinate (one SGD step of lr 1: the median)."""
    xs = torch.stack([ctx.get(i) for i in range(ctx.n)])
    return ctx.pivot - xs.median(dim=0).values


register_method("coordinate_median", _coordinate_median, needs_base=False,
                description="the coordinate-wise median of the models (robust statistics)",
                reference="benchmarks/paper_scale.py")


def merges(merger: AMEMerger, val, work: Path, greedy: bool = True) -> Dict[str, Path]:
    """Every merge of one ingredient set: name -> output folder."""
    out: Dict[str, Path] = {}
    # the greedy soup and the search score the same ingredients on the same split: once, in this set's cache
    common = dict(progress=False, write_card=False, score_cache=work / "scores.json")
    merger.merge(AMEConfig.soup(), output_dir=work / "soup", **common)
    out["uniform soup"] = work / "soup"
    if greedy:
        merger.merge(order_by="accuracy", eval_dataset=val, greedy="soup", output_dir=work / "greedy", **common)
        out["greedy soup"] = work / "greedy"
    r = merger.merge(AME, order_by="accuracy", eval_dataset=val, search=SPACE, output_dir=work / "search", **common)
    out["AME with search" + (" (kept the soup)" if r.search["chosen"] == 0 else "")] = work / "search"
    merger.merge(AMEConfig.robust(), output_dir=work / "robust", **common)
    out["AMEConfig.robust()"] = work / "robust"
    merger.merge(AMEConfig.robust().replace(method="geometric_median", method_kwargs={}), output_dir=work / "gm",
                 **common)
    out["geometric median"] = work / "gm"
    merger.merge(method="coordinate_median", output_dir=work / "median", **common)
    out["coordinate median"] = work / "median"
    return out


def _scaled(src: Path, dst: Path, factor: float) -> Path:
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    save_file({k: (v * factor if v.is_floating_point() else v) for k, v in state.items()}, dst / "model.safetensors",
              metadata={"format": "pt"})
    return dst


def run(levels: List[float], seeds: List[int], n: int, outliers: List[int], cache: Path) -> None:
    warnings.simplefilter("ignore")
    table: Dict[float, Dict[str, List[float]]] = {}
    for level in levels:
        for seed in seeds:
            t0 = time.perf_counter()
            paths = build_digits_ingredients(cache, DigitsSetup(n_models=n, unseen_fraction=level, seed=seed), verbose=False)
            x, y = load_digits_splits(seed)["test"]
            val = digits_dataset("validation", seed)
            work = Path(tempfile.mkdtemp(prefix="hf_ame-paper-"))
            try:
                row = table.setdefault(level, {})
                row.setdefault("best ingredient", []).append(max(accuracy(p, x, y) for p in paths))
                for name, folder in merges(AMEMerger.from_pretrained([str(p) for p in paths], device_map="cpu"),
                                           val, work).items():
                    row.setdefault(name.split(" (")[0], []).append(accuracy(folder, x, y))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(f"unseen {level:.0%} seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in row.items())
                  + f" [{time.perf_counter() - t0:.0f}s]", flush=True)
    print(f"\nfull test accuracy, {n} ingredients, mean +- sd over seeds {seeds}")
    print_table("unseen", {f"{level:.0%}": row for level, row in table.items()})
    if outliers:
        outlier_table(seeds, n, outliers, cache)


def outlier_table(seeds: List[int], n: int, outliers: List[int], cache: Path) -> None:
    res: Dict[int, Dict[str, List[float]]] = {}
    for seed in seeds:
        paths = build_digits_ingredients(cache, DigitsSetup(n_models=n, unseen_fraction=0.5, seed=seed), verbose=False)
        x, y = load_digits_splits(seed)["test"]
        val = digits_dataset("validation", seed)
        work = Path(tempfile.mkdtemp(prefix="hf_ame-paper-"))
        try:
            bad = [_scaled(paths[k], work / f"x10-{k}", 10.0) for k in range(max(outliers))]
            for k in outliers:
                ings = [str(p) for p in paths] + [str(b) for b in bad[:k]]
                folders = merges(AMEMerger.from_pretrained(ings, device_map="cpu"), val, work / f"o{k}", greedy=False)
                for name, folder in folders.items():
                    res.setdefault(k, {}).setdefault(name.split(" (")[0], []).append(accuracy(folder, x, y))
                print(f"seed {seed}, {k} outliers: " + ", ".join(f"{m} {v[-1]:.4f}" for m, v in res[k].items()), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{n} fine-tunes (50% unseen) plus K copies of a fine-tune x 10; test accuracy, mean +- sd over seeds {seeds}")
    print_table("outliers", {str(k): row for k, row in res.items()})


def _cell(v: List[float]) -> str:
    if not v:
        return "-"
    return f"{statistics.mean(v):.4f}" + (f" +- {statistics.stdev(v):.4f}" if len(v) > 1 else "")


def print_table(first: str, table: Dict[str, Dict[str, List[float]]], counts: bool = False) -> None:
    """A markdown table: one row per key (its label in column ``first``), one column per merge (the
    first row's), mean +- sd of each cell's values; ``counts`` adds how many values each row has."""
    cols = list(next(iter(table.values())))
    print(f"| {first} | " + ("seeds | " if counts else "") + " | ".join(cols) + " |\n|---:|"
          + "---:|" * (len(cols) + counts))
    for key, row in table.items():
        n = f"{len(row[cols[0]])} | " if counts else ""
        print(f"| {key} | {n}" + " | ".join(_cell(row.get(c, [])) for c in cols) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.1, 0.5, 0.7, 0.8, 0.9])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", type=int, default=30)
    ap.add_argument("--outliers", type=int, nargs="*", default=[0, 1, 3, 6], help="none: skip the outlier table")
    ap.add_argument("--cache", default=str(HERE / ".data" / "digits"))
    a = ap.parse_args()
    t0 = time.perf_counter()
    run(a.levels, a.seeds, a.models, a.outliers, Path(a.cache))
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
