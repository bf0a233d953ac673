"""The ``hf-ame`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

EXAMPLES = """examples:
  hf-ame merge ./ft-a ./ft-b ./ft-c --out merged --optimizer sgd --lr 1 --lr-schedule constant --no-shuffle   # uniform soup
  hf-ame merge ./ft-* --out merged --optimizer adamw --lr 1e-3 --epochs 5 --batch-size 2 --opt weight_decay=0
  hf-ame merge ./ft-a ./ft-b --out merged --pivot ./base-model --no-adaptive-pivot --dtype bfloat16
  hf-ame optimizers
"""


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _opt_kwargs(items: List[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"hf-ame: --opt expects KEY=VALUE (e.g. --opt betas=[0.9,0.999]), got {item!r}")
        out[key] = _parse_value(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-ame",
        description="Merge fine-tuned Hugging Face checkpoints with Amortized Model Ensembling (AME).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge checkpoint folders", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("models", nargs="+", metavar="PATH", help="checkpoint folders, in merge order (at least 2)")
    m.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    m.add_argument("--optimizer", default="adamw", help="registry name (see `hf-ame optimizers`); default adamw")
    m.add_argument("--lr", type=float, default=1e-3, help="base learning rate eta_0; default 1e-3")
    m.add_argument("--lr-schedule", default="harmonic", choices=["constant", "harmonic", "power"], help="default harmonic")
    m.add_argument("--lr-power", type=float, default=-0.5, help="alpha of the power schedule; default -0.5")
    m.add_argument("--epochs", type=int, default=1, help="passes over the ingredients; default 1")
    m.add_argument("--batch-size", type=int, default=1, help="ingredients per step; default 1")
    m.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep the given order every epoch")
    m.add_argument("--seed", type=int, default=0, help="shuffle seed; default 0")
    m.add_argument("--pivot", default="soup", help="soup | first | ingredient index | base checkpoint folder; default soup")
    m.add_argument("--no-adaptive-pivot", dest="adaptive_pivot", action="store_false",
                   help="pseudogradient against the initial pivot instead of the current merge")
    m.add_argument("--amplification", default="1", help="zeta: a number or 'linear'; default 1")
    m.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="optimizer keyword argument (repeatable), e.g. --opt weight_decay=0 --opt betas=[0.9,0.99]")
    m.add_argument("--dtype", default=None, help="output dtype (float32, bfloat16, float16); default: the ingredients'")
    m.add_argument("--compute-dtype", default="float32", help="dtype of the merge arithmetic; default float32")
    m.add_argument("--max-shard-size", default="5GB", help="output shard size; default 5GB")
    m.add_argument("--device", default=None, help="device for the merge arithmetic (cpu, cuda, cuda:1); default cpu")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    sub.add_parser("optimizers", help="list the optimizer registry with defaults")
    return parser


def _cmd_merge(args: argparse.Namespace) -> int:
    from .config import AMEConfig
    from .engine import merge_checkpoints

    amp: Any = args.amplification
    if amp != "linear":
        try:
            amp = float(amp)
        except ValueError:
            raise SystemExit(f"hf-ame: --amplification expects a number or 'linear', got {amp!r}") from None
    pivot: Any = args.pivot
    if isinstance(pivot, str) and pivot.lstrip("-").isdigit():
        pivot = int(pivot)
    config = AMEConfig(
        optimizer=args.optimizer, lr=args.lr, lr_schedule=args.lr_schedule, lr_power=args.lr_power,
        epochs=args.epochs, batch_size=args.batch_size, shuffle=args.shuffle, seed=args.seed,
        pivot=pivot, adaptive_pivot=args.adaptive_pivot, amplification=amp,
        optimizer_kwargs=_opt_kwargs(args.opt), compute_dtype=args.compute_dtype,
    )
    report = merge_checkpoints(args.models, args.out, config, dtype=args.dtype, max_shard_size=args.max_shard_size,
                               overwrite=args.overwrite, progress=args.progress, device_map=args.device)
    print(report.summary())
    return 0


def _cmd_optimizers(args: argparse.Namespace) -> int:
    from .optimizers import list_optimizers

    for e in list_optimizers():
        alias = f" (alias: {', '.join(e.aliases)})" if e.aliases else ""
        defaults = ", ".join(f"{k}={v!r}" for k, v in e.defaults().items()
                             if k not in ("foreach", "fused", "differentiable", "capturable", "maximize"))
        print(f"{e.name}{alias}: torch.optim.{e.cls.__name__} - {e.description}\n    defaults: {defaults}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"merge": _cmd_merge, "optimizers": _cmd_optimizers}
    try:
        return handlers[args.command](args)
    except (ValueError, FileExistsError, FileNotFoundError, KeyError) as exc:
        print(f"hf-ame: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
