"""sha256 of every output file of a grid of merges: run before and after a refactor, compare.

    .venv/bin/python benchmarks/fingerprint.py OUT.json [--data DIR]

The grid covers the executor's paths on CPU: exact soup, AdamW/Adagrad/SGD-momentum AME with each
pivot (soup, first, index, base), both stream modes, whole tensors (block_size=None), a bf16 output,
mixed fp32/bf16 ingredients, sharded inputs and outputs, .bin inputs, a LoRA-free BERT and a ViT, and
the greedy soup / greedy AME of ``AMEMerger`` (scored by a deterministic callable), a validation
search, a one-shot and an AME-composed method, the robust preset, and a mergekit config in bfloat16. Only public
entry points are used, so the same script runs on any commit since the public API settled.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def digest(folder: Path) -> dict:
    """sha256 of each file a merge wrote (the card and recipe embed timings and paths: skipped)."""
    skip = {"README.md", "ame_recipe.yaml", "ame_scores.svg"}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(folder.iterdir()) if p.is_file() and p.name not in skip}


def families(root: Path) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hf_ame.testing import make_family

    fam = {
        "llama": make_family("llama", root / "llama", 4, seed=3),
        "llama_sharded": make_family("llama", root / "llama_sh", 3, seed=4, max_shard_size="20KB"),
        "bert": make_family("bert", root / "bert", 3, seed=5),
        "vit": make_family("vit", root / "vit", 3, seed=6, dtype=torch.bfloat16),
    }
    base = make_family("llama", root / "llama_base", 1, seed=3, identical=True)[0]
    fam["llama_base"] = base
    mixed = root / "mixed"
    if not mixed.exists():  # ft-1 of the llama family stored in bf16
        m = AutoModelForCausalLM.from_pretrained(fam["llama"][1]).to(torch.bfloat16)
        m.save_pretrained(mixed / "ft-1-bf16")
    fam["mixed"] = [fam["llama"][0], mixed / "ft-1-bf16", fam["llama"][2]]
    binf = root / "bin"
    if not binf.exists():  # pytorch_model.bin folders (transformers 5 saves safetensors only)
        for i, p in enumerate(fam["llama"][:3]):
            (binf / f"ft-{i}").mkdir(parents=True)
            shutil.copy(p / "config.json", binf / f"ft-{i}" / "config.json")
            torch.save(load_file(p / "model.safetensors"), binf / f"ft-{i}" / "pytorch_model.bin")
    fam["bin"] = [binf / f"ft-{i}" for i in range(3)]
    return fam


def grid(fam: dict):
    from hf_ame import AMEConfig

    L = fam["llama"]
    yield "soup", L, AMEConfig.soup(), {}
    yield "soup_bf16_out", L, AMEConfig.soup(), {"dtype": "bfloat16"}
    yield "adamw_soup_pivot", L, AMEConfig(optimizer="adamw", lr=1e-3, epochs=2), {}
    yield "adamw_tensor_mode", L, AMEConfig(optimizer="adamw", lr=1e-3, epochs=2), {"stream": "tensor"}
    yield "adamw_whole", L, AMEConfig(optimizer="adamw", lr=1e-3, epochs=2), {"stream": "tensor", "block_size": None}
    yield "adagrad_first", L, AMEConfig(optimizer="adagrad", lr=0.05, pivot="first", batch_size=2), {}
    yield "sgd_mom_index", L, AMEConfig(optimizer="sgd", lr=0.5, optimizer_kwargs={"momentum": 0.9}, pivot=2,
                                        shuffle=True, seed=7, epochs=3), {}
    yield "adam_base", L, AMEConfig(optimizer="adam", lr=1e-3, pivot=str(fam["llama_base"])), {}
    yield "adamw_base_ingredient", L, AMEConfig(optimizer="adamw", lr=1e-3, pivot=str(fam["llama_base"])), {"stream": "ingredient", "block_size": None}
    yield "rmsprop", L, AMEConfig(optimizer="rmsprop", lr=1e-3), {}
    yield "mixed_dtypes_soup", fam["mixed"], AMEConfig.soup(), {}
    yield "mixed_dtypes_adamw", fam["mixed"], AMEConfig(optimizer="adamw", lr=1e-3), {}
    yield "sharded_in_out", fam["llama_sharded"], AMEConfig(optimizer="adamw", lr=1e-3), {"max_shard_size": "30KB"}
    yield "bin_inputs", fam["bin"], AMEConfig(optimizer="adamw", lr=1e-3), {}
    yield "bin_soup", fam["bin"], AMEConfig.soup(), {}
    yield "bert", fam["bert"], AMEConfig(optimizer="adamw", lr=1e-3, epochs=2), {}
    yield "vit_bf16", fam["vit"], AMEConfig(optimizer="adamw", lr=1e-3), {}
    yield "vit_bf16_soup", fam["vit"], AMEConfig.soup(), {}


def greedy(fam: dict, out: Path) -> dict:
    """Greedy soup and greedy AME through AMEMerger, scored by a fixed function of the weights."""
    import torch

    from hf_ame import AMEMerger

    def score(model, dataset) -> float:  # deterministic: closeness of lm_head to a fixed target
        w = model.get_output_embeddings().weight.detach().float()
        g = torch.Generator().manual_seed(0)
        return -float((w - torch.randn(w.shape, generator=g) * 0.02).pow(2).sum())

    from datasets import Dataset

    ds = Dataset.from_dict({"x": [0]})
    res = {}
    merger = AMEMerger.from_pretrained([str(p) for p in fam["llama"]], device_map="cpu")
    for mode in ("soup", "ame"):
        r = merger.merge(optimizer="adamw", lr=1e-3, order_by=score, eval_dataset=ds, greedy=mode,
                         output_dir=out / f"greedy_{mode}", progress=False, score_cache=False)
        res[f"greedy_{mode}"] = digest(r.output_dir)
    r = merger.merge(optimizer="adamw", lr=1e-3, output_dir=out / "merger_adamw", progress=False)
    res["merger_adamw"] = digest(r.output_dir)
    r = merger.merge(optimizer="adamw", lr=1e-3, order_by=score, eval_dataset=ds, search={"lr": [1e-4, 1e-3]},
                     output_dir=out / "search", progress=False, score_cache=False)
    res["search"] = digest(r.output_dir)
    res.update(methods(fam, out))
    return res


def methods(fam: dict, out: Path) -> dict:
    """A one-shot method, a method composed with AME, the robust preset, and a mergekit config in bfloat16."""
    import yaml

    from hf_ame import AMEConfig, AMEMerger

    lls, base = [str(p) for p in fam["llama"]], str(fam["llama_base"])
    merger = AMEMerger.from_pretrained(lls, base_model=base, device_map="cpu")
    res = {}
    for name, cfg in (("ties_one_shot", AMEConfig.one_shot("ties", density=0.5)),
                      ("ties_adamw", AMEConfig(optimizer="adamw", lr=1e-3, method="ties", pivot="base",
                                               method_kwargs={"density": 0.5})),
                      ("robust", AMEConfig.robust()), ("robust_tol0", AMEConfig.robust(epochs=3, tol=0.0))):
        res[name] = digest(merger.merge(cfg, output_dir=out / name, progress=False).output_dir)
    mk = out / "mergekit.yml"
    mk.write_text(yaml.safe_dump({"merge_method": "dare_ties", "base_model": base, "dtype": "bfloat16",
                                  "parameters": {"density": 0.6, "weight": [0.5, 1.0]},
                                  "models": [{"model": m} for m in lls]}))
    res["mergekit_dare_ties_bf16"] = digest(AMEMerger.from_recipe(mk, device_map="cpu").merge(
        output_dir=out / "mergekit", progress=False).output_dir)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / ".data" / "fingerprint")
    a = ap.parse_args()
    from hf_ame import merge_checkpoints

    fam = families(a.data)
    res = {}
    with tempfile.TemporaryDirectory(prefix="hf_ame-fp-") as tmp:
        for name, ings, cfg, kw in grid(fam):
            r = merge_checkpoints(ings, Path(tmp) / name, cfg, progress=False, **kw)
            res[name] = {"files": digest(r.output_dir), "bytes_read": r.bytes_read, "bytes_written": r.bytes_written}
            print(name, r.bytes_read, r.bytes_written, file=sys.stderr)
        res.update(greedy(fam, Path(tmp)))
    a.out.write_text(json.dumps(res, indent=1, sort_keys=True))
    print(f"{len(res)} merges -> {a.out}")


if __name__ == "__main__":
    main()
