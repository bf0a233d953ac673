"""A mixture of 4 experts of ~300 MB each, through mergekit-moe 0.1.5 and through `hf-ame moe`.

    .venv/bin/python benchmarks/moe.py [--reps 2] [--modes hidden cheap_embed random]

Four perturbed copies of one Llama (hidden 1024, intermediate 2816, 8 layers, vocabulary 32000,
bfloat16: 160M parameters, 320 MB each, saved once under benchmarks/.data/moe-llama) become the
experts of a Mixtral; the base is the first of them (as in most frankenMoE configs). The same YAML
file runs in its own process through `mergekit-moe CONFIG OUT` and `hf-ame moe CONFIG --out OUT`:
wall time (start-up included) and peak RSS (wait4, from a small launcher process), best of
``--reps``, the two tools interleaved; then every tensor of the two outputs is compared (mergekit's
fused per-layer experts split per expert). Inputs are in the page cache for both (a warm-up read).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from methods import run_timed  # benchmarks/methods.py: a small launcher measures peak RSS

import yaml

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
LLAMA = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"], dtype="bfloat16")
PROMPTS = [["Write a Python function that sorts a list", "Fix this bug in my code"],
           ["Solve the equation 3x + 5 = 20", "What is the derivative of x squared"],
           ["Write a short poem about the sea", "Tell me a story about a dragon"],
           ["Translate this sentence into French", "What does this German word mean"]]

def build_models() -> list:
    """The 4 experts (seeded perturbations of one init, std 0.01) with a word-level tokenizer; built once."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = HERE / ".data" / "moe-llama"
    paths = [root / f"expert-{i}" for i in range(4)]
    if all((p / "config.json").exists() for p in paths):
        return paths
    words = sorted({w for ps in PROMPTS for p in ps for w in p.split()})
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_word_tokenizer(Tokenizer, models, pre_tokenizers,
                                                                                vocab),
                                               unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(torch.bfloat16)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(paths):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for k, t in model.state_dict().items():
                t.copy_(init[k] + (torch.randn(t.shape, generator=g) * 0.01).to(t.dtype))
        model.save_pretrained(p)
        tok.save_pretrained(str(p))
    return paths


def _word_tokenizer(Tokenizer, models, pre_tokenizers, vocab):
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def moe_config(paths: list, mode: str) -> dict:
    return {"base_model": str(paths[0]), "gate_mode": mode, "dtype": "bfloat16", "experts_per_token": 2,
            "experts": [{"source_model": str(p), "positive_prompts": PROMPTS[i]} for i, p in enumerate(paths)]}


def compare(ours: Path, theirs: Path) -> tuple:
    """(tensors compared, tensors that differ): mergekit's fused experts split per expert, one tensor at a time."""
    from safetensors import safe_open

    def index(folder: Path) -> dict:
        f = folder / "model.safetensors.index.json"
        if f.exists():
            return {k: folder / v for k, v in json.loads(f.read_text())["weight_map"].items()}
        with safe_open(str(folder / "model.safetensors"), "pt") as h:
            return {k: folder / "model.safetensors" for k in h.keys()}

    ours_map, n, bad = index(ours), 0, 0
    for name, file in index(theirs).items():
        with safe_open(str(file), "pt") as h:
            t = h.get_tensor(name)
        for key, want in _split(name, t).items():
            with safe_open(str(ours_map[key]), "pt") as h:
                got = h.get_tensor(key)
            n, bad = n + 1, bad + int(not (got.dtype == want.dtype and got.equal(want)))
    return n, bad


def _split(name: str, t) -> dict:
    """mergekit's tensor under hf_ame's Mixtral names."""
    layer = name.rsplit(".mlp.", 1)[0]
    if name.endswith("mlp.experts.gate_up_proj"):
        half = t.shape[1] // 2
        return {**{f"{layer}.block_sparse_moe.experts.{e}.w1.weight": t[e, :half] for e in range(t.shape[0])},
                **{f"{layer}.block_sparse_moe.experts.{e}.w3.weight": t[e, half:] for e in range(t.shape[0])}}
    if name.endswith("mlp.experts.down_proj"):
        return {f"{layer}.block_sparse_moe.experts.{e}.w2.weight": t[e] for e in range(t.shape[0])}
    return {name.replace(".mlp.gate.", ".block_sparse_moe.gate."): t}


def bench(paths: list, mode: str, reps: int, tmp: Path) -> dict:
    """Best (time, peak RSS) of each tool over ``reps`` interleaved runs, the plan's estimate, the comparison."""
    cfg_file = tmp / f"moe-{mode}.yml"
    cfg_file.write_text(yaml.safe_dump(moe_config(paths, mode), sort_keys=False))
    bin_dir = Path(sys.executable).parent
    runs = {"mergekit-moe": [str(bin_dir / "mergekit-moe"), str(cfg_file), str(tmp / "mk"), "--quiet",
                             "--random-seed", "0"],
            "hf_ame": [str(bin_dir / "hf-ame"), "moe", str(cfg_file), "--out", str(tmp / "ours"), "--no-progress"]}
    best: dict = {}
    for rep in range(reps):
        for tool, cmd in runs.items():
            shutil.rmtree(tmp / ("mk" if tool == "mergekit-moe" else "ours"), ignore_errors=True)
            seconds, rss = run_timed(cmd)
            old = best.get(tool, (float("inf"), float("inf")))
            best[tool] = (min(old[0], seconds), min(old[1], rss))
            print(f"  [{mode}] rep {rep + 1} {tool}: {seconds:.2f}s, peak RSS {rss:.0f} MiB", flush=True)
    sys.path.insert(0, str(HERE.parent))
    from hf_ame import plan_moe

    plan = plan_moe(cfg_file, tmp / "planned")
    n, bad = compare(tmp / "ours", tmp / "mk")
    return {"best": best, "estimate": plan.peak_memory / 2**20, "router": plan.router_bytes / 2**20,
            "copies": plan.copy_memory / 2**20, "compared": n, "differ": bad,
            "output": sum(f.stat().st_size for f in (tmp / "ours").glob("*.safetensors")) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["hidden", "cheap_embed"])
    args = ap.parse_args()
    paths = build_models()
    size = sum(f.stat().st_size for f in paths[0].glob("*.safetensors")) / 2**20
    print(f"4 experts of {size:.0f} MiB each (bfloat16 Llama, 8 layers)", flush=True)
    for p in paths:  # into the page cache for both tools
        for f in p.glob("*.safetensors"):
            f.read_bytes()
    rows = []
    for mode in args.modes:
        with tempfile.TemporaryDirectory(prefix="hf_ame-moe-", dir=HERE / ".data") as tmp:
            r = bench(paths, mode, args.reps, Path(tmp))
        mk, ours = r["best"]["mergekit-moe"], r["best"]["hf_ame"]
        rows.append(f"| {mode} | {r['output']:.0f} MiB | {mk[0]:.2f} | {ours[0]:.2f} | {mk[1]:.0f} MiB "
                    f"| {ours[1]:.0f} MiB | {r['estimate']:.0f} MiB (router {r['router']:.0f}, "
                    f"copies {r['copies']:.0f}) "
                    f"| {r['compared']} compared, {r['differ']} differ |")
    print("\n| gate_mode | output | mergekit-moe s | hf_ame s | mergekit-moe peak RSS | hf_ame peak RSS "
          "| hf_ame plan estimate | tensors |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
