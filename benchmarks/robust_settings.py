"""Which robust setting (issue 14): the settings tried for ``AMEConfig.robust()``, on paper_scale.py's
outlier sets.

    .venv/bin/python benchmarks/robust_settings.py --seeds 0 1     # about 3.5 min per seed here

30 digits ViT fine-tunes at 50% unseen classes (benchmarks/paper_scale.py's, cached in the same
folder) plus K in {0, 1, 3, 6} copies of fine-tunes whose weights are x 10. Test accuracy of the
soup, the geometric median (Weiszfeld steps), Huber IRLS steps with delta 1.5 / 2 / 3 (the method
``huber``), Huber with 5 steps, a hard rejection (weight 0 beyond 3 median distances, registered
here) and the coordinate-wise median (paper_scale.py's). Every robust row: 20 steps from the soup
unless named.
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

import torch

from hf_ame import AMEConfig, AMEMerger, register_method

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

import paper_scale  # noqa: E402 - registers coordinate_median
from digits import DigitsSetup, accuracy, build_digits_ingredients, load_digits_splits  # noqa: E402


def _reject(ctx) -> torch.Tensor:
    """The mean of the models within ``c`` median distances of the pivot (the others weigh 0)."""
    p = ctx.pivot
    r = [float(torch.linalg.vector_norm(ctx.get(i).sub_(p))) for i in range(ctx.n)]
    keep = [i for i in range(ctx.n) if r[i] <= float(ctx.param("c")) * statistics.median(r)]
    acc = torch.zeros_like(p)
    for i in keep:
        acc.add_(ctx.get(i).sub_(p))
    return acc.div_(len(keep)).neg_()


register_method("reject", _reject, defaults={"c": 3.0}, needs_base=False, passes=2,
                description="mean of the models within c median distances", reference="benchmarks/robust_settings.py")


def settings():
    robust = AMEConfig.robust()
    return {
        "uniform soup": AMEConfig.soup(),
        "geometric median": robust.replace(method="geometric_median", method_kwargs={}),
        "Huber delta 1.5 (preset)": robust,
        "Huber delta 2": AMEConfig.robust(delta=2.0),
        "Huber delta 3": AMEConfig.robust(delta=3.0),
        "Huber delta 1.5, 5 steps": AMEConfig.robust(epochs=5),
        "reject beyond 3 medians": robust.replace(method="reject", method_kwargs={"c": 3.0}),
        "coordinate median": robust.replace(method="coordinate_median", method_kwargs={}, epochs=1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--cache", default=str(HERE / ".data" / "digits"))
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    res = {}
    for seed in a.seeds:
        paths = build_digits_ingredients(Path(a.cache), DigitsSetup(n_models=30, unseen_fraction=0.5, seed=seed),
                                         verbose=False)
        x, y = load_digits_splits(seed)["test"]
        work = Path(tempfile.mkdtemp(prefix="hf_ame-robust-settings-"))
        try:
            bad = [paper_scale._scaled(paths[k], work / f"x10-{k}", 10.0) for k in range(6)]
            for k in (0, 1, 3, 6):
                merger = AMEMerger.from_pretrained([str(p) for p in paths] + [str(b) for b in bad[:k]], device_map="cpu")
                t0 = time.perf_counter()
                for name, cfg in settings().items():
                    out = work / f"{k}-{len(res)}"
                    merger.merge(cfg, output_dir=out, progress=False, write_card=False, score_cache=False)
                    res.setdefault(name, {}).setdefault(k, []).append(accuracy(out, x, y))
                    shutil.rmtree(out)
                print(f"seed {seed}, {k} outliers: " + ", ".join(f"{n} {v[k][-1]:.4f}" for n, v in res.items())
                      + f" [{time.perf_counter() - t0:.0f}s]", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ntest accuracy, seeds {' / '.join(map(str, a.seeds))}\n| setting | clean | 1 outlier | 3 outliers | 6 outliers |"
          "\n|---|---:|---:|---:|---:|")
    for name, row in res.items():
        print(f"| {name} | " + " | ".join(" / ".join(f"{v:.4f}" for v in row[k]) for k in (0, 1, 3, 6)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
