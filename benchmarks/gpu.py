"""GPU merge speed against the HBM floor, fused Triton kernels vs the torch path, in ONE run.

    python benchmarks/gpu.py [--ns 2 8 32] [--reps 3] [--model 1b|small] [--e2e] [--json out.json]

Part 1 (in HBM): N perturbed bf16 copies of a Llama-3.2-1B-shaped model (1.24B parameters, 147
tensors, tied embeddings) are made on the GPU; each method merges every tensor into a bf16 output,
timed with CUDA synchronisation, best of ``--reps`` after a warm-up (Triton compiles then).
Floors: bytes a single pass must move, over the device-to-device copy bandwidth measured at the
start of the same run:
  soup   N inputs read + 1 output written;
  AME    the soup pivot (N inputs read, fp32 w written), then per step the batch's inputs read,
         w read + written (the last step writes the bf16 output instead), optimizer state read +
         written (AdamW: 2 fp32 moments; the first step only writes them).
"fused" is hf_ame.kernels (one kernel per step; up to 4 inputs passed as kernel arguments),
"table" the same kernels reading every input's address from a table on the device; "grouped" the
tensors of at most hf_ame.groups.GROUP_MAX_ELEMENTS elements merged together, one launch per soup and
per step for all of them (hf_ame.kernels.fused_*_many), the others as "fused"; "torch" the same merge
through torch.optim's fused AdamW with the pseudogradient formed by separate torch ops (HF_AME_FUSED=0's path).
Part 2 (--e2e, from disk): 4 copies of a 246M-parameter Llama saved as bf16 safetensors, merged
by merge_checkpoints with device_map "cpu" and "cuda:0", and by AMEMerger(device_map="auto");
time and the CPU-vs-CUDA difference of the written tensors.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_ame import AMEConfig, AMEMerger, kernels, merge_checkpoints  # noqa: E402
from hf_ame.algorithm import plan_steps, resolve_pivot, soup  # noqa: E402
from hf_ame.blocks import merge_block, merge_fused, merge_fused_many  # noqa: E402
from hf_ame.groups import GROUP_MAX_ELEMENTS  # noqa: E402

MODELS = {  # name: (vocab, hidden, intermediate, layers, kv dim)
    "1b": (128256, 2048, 8192, 16, 512),
    "small": (32000, 1024, 2816, 8, 256),
    "tiny": (256, 64, 128, 2, 32),  # --smoke: the script's own check on CPU (TRITON_INTERPRET=1)
}
DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def shapes(model: str) -> List[tuple]:
    vocab, h, inter, layers, kv = MODELS[model]
    out = [(vocab, h), (h,)]
    for _ in range(layers):
        out += [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter), (h,), (h,)]
    return out


def timed(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up: Triton compiles, the allocator grows
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def copy_bandwidth() -> float:
    numel = 2**30 if DEVICE == "cuda" else 2**24  # 4 GiB
    src = torch.empty(numel, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), 5)
    del src, dst
    return 2 * 4 * numel / t


def ame_floor_bytes(numel: int, n: int, steps: int, batch: int) -> int:
    pivot = numel * (2 * n + 4)
    per_step = numel * (2 * batch + 8 + 16)
    return pivot + steps * per_step - numel * 8 - numel * 2  # first step writes moments only; last writes bf16


def part1(args, bw: float) -> List[Dict]:
    rows = []
    shp = shapes(args.model)
    numel = sum(torch.Size(s).numel() for s in shp)
    print(f"[part 1] {args.model}: {numel / 1e9:.3f}B parameters, {len(shp)} tensors, bf16; copy bandwidth "
          f"{bw / 1e12:.2f} TB/s", flush=True)
    for n in args.ns:
        g = torch.Generator(device=DEVICE).manual_seed(0)
        ings = []
        for s in shp:
            base = torch.randn(s, device=DEVICE, generator=g) * 0.02
            ings.append([(base + torch.randn(s, device=DEVICE, generator=g) * 0.002).to(torch.bfloat16)
                         for _ in range(n)])
            del base
        configs = {"soup": None, "adamw 1 ep": AMEConfig(optimizer="adamw", lr=1e-3, epochs=1),
                   "adamw 10 ep": AMEConfig(optimizer="adamw", lr=1e-3, epochs=10)}
        for label, cfg in configs.items():
            small = [xs for xs in ings if xs[0].numel() <= GROUP_MAX_ELEMENTS]
            large = [xs for xs in ings if xs[0].numel() > GROUP_MAX_ELEMENTS]
            if cfg is None:
                fused = lambda: [merge_fused(xs, AMEConfig.soup(), [], ("soup", None), out_dtype=torch.bfloat16,
                                             exact_soup=True) for xs in ings]
                grouped = lambda: merge_fused_many(small, AMEConfig.soup(), [], ("soup", None), out_dtype=torch.bfloat16,
                                                   exact_soup=True) + [merge_fused(
                    xs, AMEConfig.soup(), [], ("soup", None), out_dtype=torch.bfloat16, exact_soup=True) for xs in large]
                plain = lambda: [soup(xs).to(torch.bfloat16) for xs in ings]
                floor = numel * (2 * n + 2)
            else:
                steps, pivot = plan_steps(n, cfg), resolve_pivot(cfg.pivot, n)
                fused = lambda: [merge_fused(xs, cfg, steps, pivot, out_dtype=torch.bfloat16) for xs in ings]
                grouped = lambda: merge_fused_many(small, cfg, steps, pivot, out_dtype=torch.bfloat16) + [
                    merge_fused(xs, cfg, steps, pivot, out_dtype=torch.bfloat16) for xs in large]
                plain = lambda: [merge_block(xs, cfg, steps, pivot, device=xs[0].device).to(torch.bfloat16)
                                 for xs in ings]
                floor = ame_floor_bytes(numel, n, len(steps), cfg.batch_size)
            tf, tt = timed(fused, args.reps), timed(plain, max(1, args.reps - 1))
            kernels.MAX_DIRECT_INPUTS = 0  # the same kernels reading every input address from a table
            ttab = timed(fused, args.reps)
            kernels.MAX_DIRECT_INPUTS = 4
            tgr = timed(grouped, args.reps)
            a, b = fused(), plain()
            ga = dict(zip([id(xs) for xs in small + large], grouped()))
            grouped_same = all(torch.equal(x, ga[id(xs)]) for x, xs in zip(a, ings))
            diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
            differ = sum((x != y).sum().item() for x, y in zip(a, b)) / numel
            del a, b
            fl = floor / bw
            row = dict(n=n, method=label, floor_s=fl, fused_s=tf, fused_table_s=ttab, grouped_s=tgr,
                       grouped_same_bits=grouped_same, small_tensors=len(small), torch_s=tt, fused_x_floor=tf / fl,
                       torch_x_floor=tt / fl, speedup=tt / tf, max_abs_diff=diff, frac_elements_differ=differ)
            rows.append(row)
            print(f"N={n:>2} {label:<12} floor {fl * 1e3:8.1f} ms  fused {tf * 1e3:8.1f} ms ({tf / fl:.2f}x)  "
                  f"table {ttab * 1e3:8.1f} ms ({ttab / fl:.2f}x)  grouped {tgr * 1e3:8.1f} ms ({tgr / fl:.2f}x, "
                  f"{len(small)} small tensors together, same bits: {grouped_same})  "
                  f"torch {tt * 1e3:8.1f} ms ({tt / fl:.2f}x)  fused/torch speedup {tt / tf:.2f}x  "
                  f"max|diff| {diff:.2e} ({differ * 100:.3f}% of bf16 outputs differ)", flush=True)
        del ings
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def build_llama(root: Path, n: int) -> List[Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for k, t in model.state_dict().items():
                t.copy_(init[k] + (torch.randn(t.shape, generator=g) * 0.01).to(torch.bfloat16))
        model.save_pretrained(root / f"ft-{i}", max_shard_size="200MB")
        paths.append(root / f"ft-{i}")
    return paths


def part2(args) -> List[Dict]:
    from safetensors.torch import load_file

    root = Path(tempfile.mkdtemp(prefix="hf_ame_gpu_"))
    rows = []
    try:
        paths = build_llama(root / "in", 4)
        size = sum(f.stat().st_size for p in paths for f in p.glob("*.safetensors"))
        for label, cfg in {"soup": AMEConfig.soup(), "adamw 1 ep": AMEConfig(optimizer="adamw", lr=1e-3)}.items():
            outs = {}
            for dev in ("cpu", "cuda:0"):
                best = float("inf")
                for r in range(2):
                    out = root / f"out-{label.replace(' ', '')}-{dev}-{r}"
                    t = time.perf_counter()
                    merge_checkpoints(paths, out, cfg, device_map=dev, progress=False)
                    best = min(best, time.perf_counter() - t)
                    outs[dev] = out
                rows.append(dict(method=label, device=dev, seconds=best, input_gb=size / 1e9))
            a = {k: v for f in sorted(outs["cpu"].glob("*.safetensors")) for k, v in load_file(f).items()}
            b = {k: v for f in sorted(outs["cuda:0"].glob("*.safetensors")) for k, v in load_file(f).items()}
            diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
            differ = sum((a[k] != b[k]).sum().item() for k in a) / sum(v.numel() for v in a.values())
            print(f"[part 2] {label:<10} 4 x {size / 4e9:.2f} GB from disk: cpu {rows[-2]['seconds']:.2f} s, "
                  f"cuda {rows[-1]['seconds']:.2f} s; cpu vs cuda max|diff| {diff:.2e}, "
                  f"{differ * 100:.4f}% of bf16 elements differ", flush=True)
            rows[-1].update(max_abs_diff_vs_cpu=diff, frac_differ_vs_cpu=differ)
        t = time.perf_counter()
        res = AMEMerger.from_pretrained([str(p) for p in paths], device_map="auto").merge(
            optimizer="adamw", lr=1e-3, output_dir=str(root / "auto"), progress=False)
        print(f"[part 2] AMEMerger(device_map='auto') AdamW 1 ep: {time.perf_counter() - t:.2f} s, devices "
              f"{res.report.devices}", flush=True)
        rows.append(dict(method="adamw 1 ep", device="auto", seconds=time.perf_counter() - t,
                         devices=res.report.devices))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", choices=sorted(MODELS), default="1b")
    ap.add_argument("--e2e", action="store_true", help="also part 2: merges from disk, cpu vs cuda")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="run on CPU through Triton's interpreter (checks the script)")
    args = ap.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE, args.model, args.reps = "cpu", "tiny", 1
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device (or --smoke)")
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)"
    print(f"{name} torch {torch.__version__} triton {__import__('triton').__version__}", flush=True)
    bw = copy_bandwidth()
    result = {"device": name, "copy_bandwidth_Bps": bw, "part1": part1(args, bw)}
    if args.e2e:
        result["part2"] = part2(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
