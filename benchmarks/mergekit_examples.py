"""mergekit's five example configs, through mergekit 0.1.5 and through hf_ame, on the same tiny models.

    .venv/bin/python benchmarks/mergekit_examples.py [--reps 2] [--dtypes float32 float16 bfloat16]

The configs are mergekit's `examples/{linear,ties,gradient-slerp,bio-merge,orcamini-platy-44layer}.yml`
(commit a6e4028 of arcee-ai/mergekit) as written, except: each Hub model is mapped to a local Llama
(8 layers, hidden 256, float32; the 13B models have 40 layers, so layer ranges are scaled by 8/40) and
`dtype` is set to each of ``--dtypes`` in turn (the examples say float16). Each tool runs the YAML
file in its own process (`mergekit-yaml` / `hf-ame merge`); wall time (start-up included) and peak
RSS (wait4), best of ``--reps``; then every output tensor is compared. In half precision the two
round differently (mergekit in some methods' arithmetic, hf_ame once at the end), so besides the
largest difference each one's distance from mergekit's float32 merge is printed, relative to that
merge's distance from the first model (``err``: hf_ame's, ``mk err``: mergekit's).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

from methods import run_timed  # benchmarks/methods.py: one process, wall time and peak RSS

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXAMPLES = {
    "linear": """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    "ties": """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    "gradient-slerp": """
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""",
    "bio-merge": """
models:
  - model: mistralai/Mistral-7B-Instruct-v0.2
    parameters:
      density: 0.5
      weight: 0.5
  - model: BioMistral/BioMistral-7B
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: false
  int8_mask: true
dtype: float16
""",
    "orcamini-platy-44layer": """
slices:
  - sources:
    - model: psmathur/orca_mini_v3_13b
      layer_range: [0, 24]
  - sources:
    - model: garage-bAInd/Platypus2-13B
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
""",
}
LAYERS = 8
TINY = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=4,
            vocab_size=8000, max_position_embeddings=512, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])


def build(names) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = HERE / ".data" / "mergekit-examples"
    out = {}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(sorted(names)):
        path = root / name.replace("/", "--")
        if not (path / "config.json").exists():
            g = torch.Generator().manual_seed(i + 1)
            with torch.no_grad():
                for k, t in model.state_dict().items():
                    t.copy_(init[k] + torch.randn(t.shape, generator=g) * 0.02)
            model.save_pretrained(path)
        out[name] = str(path)
    return out


def localise(cfg, paths: dict, dtype: str = "float32"):
    """Map model names to the local folders, scale layer ranges to LAYERS, dtype -> ``dtype``."""
    if isinstance(cfg, dict):
        out = {}
        for k, v in cfg.items():
            if k in ("model", "base_model") and isinstance(v, str):
                out[k] = paths[v]
            elif k == "layer_range":
                out[k] = [x * LAYERS // 40 for x in v]
            elif k in ("dtype", "out_dtype"):
                out[k] = dtype
            else:
                out[k] = localise(v, paths, dtype)
        return out
    if isinstance(cfg, list):
        return [localise(v, paths, dtype) for v in cfg]
    return cfg


def names_in(cfg) -> set:
    if isinstance(cfg, dict):
        return {v for k, v in cfg.items() if k in ("model", "base_model") and isinstance(v, str)} | \
            set().union(*(names_in(v) for v in cfg.values()))
    if isinstance(cfg, list):
        return set().union(*(names_in(v) for v in cfg)) if cfg else set()
    return set()


def read(folder) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def relative(a: dict, b: dict, ref: dict) -> float:
    """|a - b| over |b - ref| (Frobenius, all tensors): a's error relative to b's distance from ref."""
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b if k in a)
    den = sum(float(((b[k].double() - ref[k].double()) ** 2).sum()) for k in b if k in ref)
    return (num / den) ** 0.5 if den else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    a = ap.parse_args()
    configs = {k: yaml.safe_load(v) for k, v in EXAMPLES.items()}
    paths = build(set().union(*(names_in(c) for c in configs.values())))
    first = read(sorted(paths.values())[0])
    bin_dir = Path(sys.executable).parent
    rows, exact = [], {}
    with tempfile.TemporaryDirectory(prefix="hf_ame-mkex-") as tmp:
        for dtype in a.dtypes:
            for name, cfg in configs.items():
                path = Path(tmp) / f"{name}-{dtype}.yml"
                path.write_text(yaml.safe_dump(localise(cfg, paths, dtype), sort_keys=False))
                times = {"mergekit": [], "hf_ame": []}
                for rep in range(a.reps):
                    for who in ("mergekit", "hf_ame"):
                        out = Path(tmp) / f"{name}-{dtype}-{who}-{rep}"
                        cmd = ([str(bin_dir / "mergekit-yaml"), str(path), str(out), "--no-copy-tokenizer", "--quiet"]
                               if who == "mergekit" else
                               [str(bin_dir / "hf-ame"), "merge", str(path), "--out", str(out), "--no-progress",
                                "--device", "cpu"])
                        times[who].append(run_timed(cmd))
                mk, ours = read(Path(tmp) / f"{name}-{dtype}-mergekit-0"), read(Path(tmp) / f"{name}-{dtype}-hf_ame-0")
                mk = {k: v.to(ours[k].dtype) if k in ours else v for k, v in mk.items()}  # mergekit may write wider
                if dtype == "float32":
                    exact[name] = mk
                same_names = set(mk) == set(ours)
                diff = max((mk[k].float() - ours[k].float()).abs().max().item() for k in mk if k in ours)
                ref = first if set(first) == set(mk) else None
                err = (relative(ours, exact[name], ref), relative(mk, exact[name], ref)) \
                    if (dtype != "float32" and name in exact and ref is not None) else (None, None)
                (ms, _), (hs, _) = min(times["mergekit"]), min(times["hf_ame"])
                mr, hr = max(r for _, r in times["mergekit"]), max(r for _, r in times["hf_ame"])
                rows.append((name, dtype, same_names, diff, err, ms, hs, mr, hr))
                print(f"[{name} {dtype}] names equal: {same_names}, max |hf_ame - mergekit| = {diff:.3g}"
                      + (f", err {err[0]:.3g} (mk err {err[1]:.3g})" if err[0] is not None else ""), flush=True)
    print(f"\n{'config':<24} {'dtype':<9} {'tensors':>8} {'max abs diff':>13} {'err':>8} {'mk err':>8} "
          f"{'mergekit s':>11} {'hf_ame s':>9} {'mergekit RSS':>13} {'hf_ame RSS':>11}")
    for name, dtype, same, diff, err, ms, hs, mr, hr in rows:
        e = (f"{err[0]:8.3g} {err[1]:8.3g}" if err[0] is not None else f"{'-':>8} {'-':>8}")
        print(f"{name:<24} {dtype:<9} {'same' if same else 'DIFFER':>8} {diff:13.3g} {e} {ms:11.2f} {hs:9.2f} "
              f"{mr:9.0f} MiB {hr:7.0f} MiB")


if __name__ == "__main__":
    main()
