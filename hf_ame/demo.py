"""The main job, offline: fine-tune small ViTs on scikit-learn's digits, merge them, report.

    python -m hf_ame.demo [--out demo_output] [--cache .cache] [--models 6]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_ame.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_output", help="where merged models go (replaced each run)")
    parser.add_argument("--cache", default=".cache", help="where trained ingredients are cached")
    parser.add_argument("--models", type=int, default=6, help="number of fine-tuned ingredients")
    parser.add_argument("--unseen", type=float, default=0.5, help="fraction of classes each fine-tune never sees")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from . import AMEConfig, AMEMerger
    from .digits import DigitsSetup, accuracy, build_digits_ingredients, load_digits_splits

    t0 = time.perf_counter()
    setup = DigitsSetup(n_models=args.models, unseen_fraction=args.unseen, seed=args.seed)
    paths = build_digits_ingredients(args.cache, setup)
    t_build = time.perf_counter() - t0
    splits = load_digits_splits(setup.seed)
    x, y = splits["test"]
    out = Path(args.out)
    rows = [(p.name, accuracy(p, x, y), None) for p in paths]
    runs = {
        "uniform soup": AMEConfig.soup(),
        "AdamW-AME": AMEConfig(optimizer="adamw", lr=1e-3, lr_schedule="harmonic", epochs=5, batch_size=2,
                               shuffle=True, pivot="soup", optimizer_kwargs={"weight_decay": 0.0}),
    }
    merger = AMEMerger.from_pretrained([str(p) for p in paths], device_map="auto")
    merged_rows = []
    for label, cfg in runs.items():
        dest = out / label.lower().replace(" ", "-")
        result = merger.merge(cfg, output_dir=dest, overwrite=True, progress=args.progress)
        merged_rows.append((label, accuracy(result.model, x, y), result.report))

    print()
    print(f"{len(paths)} ViT ingredients fine-tuned on digits, each never seeing "
          f"{int(round(setup.unseen_fraction * 10))} of 10 classes (built/reused in {t_build:.1f}s, cache: {args.cache})")
    print(f"{'model':<24} {'test accuracy':>13}  merge time")
    for name, acc, _ in rows:
        print(f"{name:<24} {acc:>13.4f}")
    for label, acc, rep in merged_rows:
        print(f"{label:<24} {acc:>13.4f}  {rep.seconds:.2f}s  ({rep.tensors} tensors, {rep.parameters / 1e3:.0f}k parameters, "
              f"{rep.steps} steps/tensor) -> {rep.output_dir}")
    best = max(a for _, a, _ in rows)
    print(f"best single ingredient: {best:.4f}; total wall time {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
