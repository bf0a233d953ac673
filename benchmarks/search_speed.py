"""Search trials held in memory against streamed trials, in ONE run (issue 14).

    bash scripts/setup.sh
    .venv/bin/python benchmarks/search_speed.py [--models 30] [--reps 2]

``merge(search=...)`` on paper_scale.py's digits ViT fine-tunes (50% unseen, seed 0; built once and
cached under benchmarks/.data/digits) with paper_scale.py's space (the soup + AdamW lr {1e-4, 1e-3}
x epochs {1, 3}, scored on the validation split). Each rep runs both paths back to back: in memory
(the default when every ingredient fits in ``memory_budget``, 2 GiB) and streamed from the files
(``memory_budget=1`` byte forces it). Prints each wall time, the best per path, the ratio, and checks
that both kept the same trial with the same scores and bit-equal weights. Times are the trials'
phase (``result.timings["merge"]``: every trial merged and scored, the kept one written); the
ingredients are scored once, into a score cache both paths share.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from safetensors.torch import load_file

from hf_ame import AMEMerger

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

import paper_scale  # noqa: E402 - SPACE and AME
from digits import DigitsSetup, build_digits_ingredients, digits_dataset  # noqa: E402

PATHS = {"in memory": None, "streamed": 1}  # name -> memory_budget


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=30)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--cache", default=str(HERE / ".data" / "digits"))
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    paths = build_digits_ingredients(a.cache, DigitsSetup(n_models=a.models, unseen_fraction=0.5, seed=0), verbose=False)
    merger = AMEMerger.from_pretrained([str(p) for p in paths], device_map="cpu")
    val = digits_dataset("validation", 0)
    work = Path(tempfile.mkdtemp(prefix="hf_ame-search-speed-"))
    times = {name: [] for name in PATHS}
    results = {}
    try:
        for rep in range(a.reps):
            for name, budget in PATHS.items():
                out = work / f"{name.replace(' ', '-')}-{rep}"
                t0 = time.perf_counter()
                r = merger.merge(paper_scale.AME, order_by="accuracy", eval_dataset=val, search=paper_scale.SPACE,
                                 memory_budget=budget, output_dir=out, progress=False, write_card=False,
                                 score_cache=work / "scores.json")
                times[name].append(r.timings["merge"])
                assert r.search["merged"] == name, r.search["merged"]
                results[name] = (r.search["chosen"], [t["score"] for t in r.search["trials"]],
                                 load_file(out / "model.safetensors"))
                print(f"rep {rep} {name}: trials {times[name][-1]:.1f}s (merge() {time.perf_counter() - t0:.1f}s),"
                      f" kept trial {r.search['chosen']}", flush=True)
        (ca, sa, wa), (cb, sb, wb) = results.values()
        same = ca == cb and sa == sb and wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {name: min(t) for name, t in times.items()}
    print(f"\n{a.models} ingredients, {len(sa)} trials (merged and scored), best of {a.reps}: "
          + ", ".join(f"{n} {t:.1f}s" for n, t in best.items())
          + f"; streamed / in memory = {best['streamed'] / best['in memory']:.2f}x")
    print(f"same kept trial, scores and bit-equal weights: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
