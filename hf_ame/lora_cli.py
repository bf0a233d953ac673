"""``hf-ame extract-lora`` and the LoRA-output flags of ``hf-ame merge`` (see :mod:`hf_ame.lora_out`)."""
from __future__ import annotations

import argparse
from typing import Any, Dict

from .checkpoints import Checkpoint
from .lora_out import extract_lora

__all__ = ["add_lora_parser", "add_lora_merge_arguments", "lora_merge_kwargs", "cmd_extract_lora"]


def add_lora_merge_arguments(m: argparse.ArgumentParser) -> None:
    """``--output-format lora --rank R`` on ``hf-ame merge``."""
    m.add_argument("--output-format", dest="output_format", default=None, choices=["model", "lora"],
                   help="lora: write a peft LoRA adapter over the base (--base-model, or the adapters' own) instead "
                        "of a model; adapters merged linearly are concatenated exactly, anything else is the "
                        "merged delta factored per module by truncated SVD at --rank")
    m.add_argument("--rank", type=int, default=None, metavar="R",
                   help="the LoRA rank of --output-format lora (needed unless adapters are concatenated)")


def lora_merge_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """merge()'s ``output`` / ``rank`` from the flags ({} when neither is given: the recipe decides)."""
    out: Dict[str, Any] = {}
    if getattr(args, "output_format", None) is not None:
        out["output"] = args.output_format
    if getattr(args, "rank", None) is not None:
        out["rank"] = args.rank
    return out


def add_lora_parser(sub: Any) -> None:
    e = sub.add_parser("extract-lora", help="write a fine-tune (or any model) minus its base as a peft LoRA adapter")
    e.add_argument("model", help="the fine-tune: a folder, a .gguf file, or a LoRA adapter folder")
    e.add_argument("--base", required=True, help="the base model folder (or .gguf file) the LoRA applies to")
    e.add_argument("--rank", type=int, required=True, help="LoRA rank of each linear module's delta (truncated SVD)")
    e.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    e.add_argument("--embed-lora", action="store_true",
                   help="LoRA the embeddings too (default: saved whole in modules_to_save, as mergekit-extract-lora)")
    e.add_argument("--dtype", default=None, help="dtype of the written tensors; default float32 factors, whole "
                   "modules as stored")
    e.add_argument("--base-name", default=None, help="base_model_name_or_path to record (e.g. the base's Hub id); "
                   "default: the base folder's absolute path")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def cmd_extract_lora(args: argparse.Namespace) -> int:

    report = extract_lora(Checkpoint(args.model), Checkpoint(args.base), args.out, args.rank,
                          embed_lora=args.embed_lora, dtype=args.dtype, overwrite=args.overwrite,
                          base_name=args.base_name, progress=args.progress)
    print(report.summary())
    worst = max(report.errors.items(), key=lambda kv: kv[1][0] / max(kv[1][1], 1e-30), default=None)
    if worst is not None:
        print(f"reconstruction error per module (Frobenius): the truncated SVD's own, the optimal rank-{args.rank} "
              f"error; largest ratio at {worst[0]}: {worst[1][0]:.4g} vs {worst[1][1]:.4g}")
    return 0
