"""The main job, offline: the AME paper's class-exclusion experiment on real data, end to end.

    python examples/demo.py [--out demo_output] [--cache .cache] [--models 6] [--unseen 0.5]

A small ViT is pretrained on part of scikit-learn's digits, then fine-tuned K times (fresh heads,
different seeds), each copy never seeing some of the classes. The ingredients are ranked by
``evaluate`` accuracy on a validation split, merged through the public API (uniform soup, greedy
soup, AdamW-AME with its learning rate and epochs chosen on the validation split), the AME model is
saved with its model card, and full test accuracies are printed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from digits import DigitsSetup, accuracy, build_digits_ingredients, digits_dataset, load_digits_splits  # examples/digits.py
from hf_ame import AMEConfig, AMEMerger

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__all__ = ["class_exclusion", "compare_merges", "default_ame", "default_space", "main"]


def default_ame() -> AMEConfig:
    """The AdamW-AME settings the search starts from (the paper's knobs, lr and epochs, are searched)."""
    return AMEConfig(optimizer="adamw", lr_schedule="harmonic", batch_size=2, shuffle=True, pivot="soup",
                     adaptive_pivot=True, optimizer_kwargs={"weight_decay": 0.0})


def default_space() -> Dict[str, List[Any]]:
    """The grid searched on the validation split (trial 0, the uniform soup, comes first)."""
    return {"lr": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3], "epochs": [1, 5]}


def compare_merges(paths: Sequence[Any], val, test_accuracy, *, out: Optional[str] = None, ame: Optional[AMEConfig] = None,
                   space: Optional[Dict[str, List[Any]]] = None, progress: bool = False,
                   score_cache: Any = True) -> Dict[str, Any]:
    """Rank ``paths`` by evaluate accuracy on ``val`` (a datasets.Dataset), merge them (uniform soup,
    greedy soup, and ``merge(search=space)`` over ``ame``: the soup and every AME setting scored on
    ``val``, the best kept) and report ``test_accuracy(folder)`` of each. With ``out``, the kept
    merge is written there with its card (the search table in it)."""

    t0 = time.perf_counter()
    merger = AMEMerger.from_pretrained([str(p) for p in paths], device_map="auto")
    work = Path(tempfile.mkdtemp(prefix="hf_ame-demo-"))
    common = dict(order_by="accuracy", eval_dataset=val, score_cache=score_cache, progress=progress)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the offline-metric notice, once per merge
            soup = merger.merge(AMEConfig.soup(), output_dir=work / "soup", write_card=False, **common)
            greedy = merger.merge(greedy="soup", output_dir=work / "greedy", write_card=False, **common)
            t1 = time.perf_counter()
            best = merger.merge(ame or default_ame(), search=space or default_space(), output_dir=out or work / "ame",
                                overwrite=True, write_card=out is not None, **common)
            t_sweep = time.perf_counter() - t1
        trials = best.search["trials"]
        ingredients = [(Path(p).name, test_accuracy(p)) for p in paths]
        return {
            "ingredients": ingredients,
            "val_scores": [i.score for i in soup.ingredients],
            "best_ingredient": max(a for _, a in ingredients),
            "soup": test_accuracy(soup.output_dir),
            "greedy_soup": test_accuracy(greedy.output_dir),
            "greedy_kept": sum(1 for e in greedy.greedy_log if e["accepted"]),
            "ame": test_accuracy(best.output_dir),
            "ame_config": best.config,
            "ame_val": trials[best.search["chosen"]]["score"],
            "kept_soup": best.search["chosen"] == 0,
            "soup_val": trials[0]["score"],
            "sweep": [(t["params"], t["score"]) for t in trials[1:]],
            "output": str(best.output_dir) if out is not None else None,
            "sweep_seconds": t_sweep,
            "merge_seconds": time.perf_counter() - t0,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def class_exclusion(setup, cache: str, *, out: Optional[str] = None, space: Optional[Dict[str, List[Any]]] = None,
                    ame: Optional[AMEConfig] = None, progress: bool = False, verbose: bool = True,
                    score_cache: Any = True) -> Dict[str, Any]:
    """The digits class-exclusion experiment for ``setup`` (see :mod:`digits` (beside this file)). Every choice
    (ranking, greedy soup, the AME search) uses the validation split only; test accuracy is reported."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    paths = build_digits_ingredients(cache, setup, verbose=verbose)
    t_build = time.perf_counter() - t0
    x, y = load_digits_splits(setup.seed)["test"]
    r = compare_merges(paths, digits_dataset("validation", setup.seed), lambda p: accuracy(p, x, y), out=out,
                       ame=ame, space=space, progress=progress, score_cache=score_cache)
    r["build_seconds"] = t_build
    r["seconds"] = time.perf_counter() - t0
    return r


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python examples/demo.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_output/vit-digits-ame", help="where the AME merge and its card go (replaced)")
    parser.add_argument("--cache", default=".cache", help="where trained ingredients are cached")
    parser.add_argument("--models", type=int, default=6, help="number of fine-tuned ingredients")
    parser.add_argument("--unseen", type=float, default=0.5, help="fraction of the 10 classes each fine-tune never sees")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)


    setup = DigitsSetup(n_models=args.models, unseen_fraction=args.unseen, seed=args.seed)
    r = class_exclusion(setup, args.cache, out=args.out, progress=args.progress)
    n_unseen = int(round(setup.unseen_fraction * 10))
    cfg = r["ame_config"]
    print()
    print(f"{len(r['ingredients'])} ViTs fine-tuned on scikit-learn digits, each never seeing {n_unseen} of the 10 classes")
    print(f"(ingredients built or reused in {r['build_seconds']:.1f}s, cache: {args.cache})")
    print()
    print(f"{'model':<34} {'val acc':>8} {'test acc':>9}")
    for (name, acc), v in zip(r["ingredients"], r["val_scores"]):
        print(f"{name:<34} {v:>8.4f} {acc:>9.4f}")
    print("-" * 53)
    print(f"{'best single ingredient':<34} {max(r['val_scores']):>8.4f} {r['best_ingredient']:>9.4f}")
    print(f"{'uniform soup':<34} {r['soup_val']:>8.4f} {r['soup']:>9.4f}")
    print(f"{'greedy soup (' + str(r['greedy_kept']) + ' kept)':<34} {'':>8} {r['greedy_soup']:>9.4f}")
    label = "search kept the soup" if r["kept_soup"] else f"AdamW-AME (lr {cfg.lr:g}, {cfg.epochs} ep)"
    print(f"{label:<34} {r['ame_val']:>8.4f} {r['ame']:>9.4f}")
    print()
    print(f"merge(search=...): the uniform soup and {len(r['sweep'])} AdamW-AME (lr, epochs) settings scored on the "
          f"validation split in {r['sweep_seconds']:.1f}s;")
    helped = [p for p, s in r["sweep"] if s > r["soup_val"]]
    print(f"  {len(helped)} of {len(r['sweep'])} AME settings beat the soup on validation"
          + (f" (best +{r['ame_val'] - r['soup_val']:.4f}); on test the kept merge is {r['ame'] - r['soup']:+.4f} "
             "against the soup" if helped else "; the soup was kept"))
    worse = [f"lr {p['lr']:g} x {p['epochs']} ep" for p, s in r["sweep"] if s < r["soup_val"]]
    print(f"  AME scores below the soup on validation at: {', '.join(worse) or 'none'}")
    print(f"The AME model, its model card and recipe: {r['output']}/ (README.md, ame_recipe.yaml, ame_scores.svg)")
    print(f"Total wall time {r['seconds']:.1f}s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
