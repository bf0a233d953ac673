"""``hf-ame moe CONFIG --out DIR``: a mixture of experts from a mergekit-moe config (:mod:`hf_ame.moe`)."""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict

from .cli_args import key_values
from .moe import build_moe

__all__ = ["add_moe_parser", "cmd_moe", "MOE_EXAMPLES"]

MOE_EXAMPLES = """examples:
  hf-ame moe moe.yml --out my-moe                            # mergekit-moe's config, as it is
  hf-ame moe moe.yml --out my-moe --dry-run                  # the plan: tensors, bytes, memory, shards; reads no weight
  hf-ame moe moe.yml --out my-moe --non-expert ties --param density=0.5   # attention/norms merged from the experts
  hf-ame moe my-moe/moe_recipe.yaml --out again              # re-run a MoE from its recipe
"""


def add_moe_parser(sub: Any) -> None:
    """The ``moe`` subcommand, with mergekit-moe's options where it has them."""
    m = sub.add_parser("moe", help="build a mixture of experts from dense models (a mergekit-moe config)",
                       epilog=MOE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("config",
                   help="a mergekit-moe YAML config (base_model, gate_mode, experts, ...) or a moe_recipe.yaml")
    m.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    m.add_argument("--non-expert", default=None, metavar="METHOD",
                   help="merge the attention, norms and embeddings from the experts with this method of the registry "
                        "(linear, ties, ...; task-vector methods from the base) instead of copying the base's")
    m.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="with --non-expert: a method parameter (repeatable), e.g. --param density=0.5")
    m.add_argument("--router-source", choices=["base", "experts"], default=None,
                   help="the model the router's hidden states / embeddings come from: base (mergekit's, default) or "
                        "each expert's own")
    m.add_argument("--random-seed", type=int, default=None, help="seed of random gates and noise_scale; default 0")
    m.add_argument("--device", default="cpu", help="where the hidden-state gate modes run the prompts; default cpu")
    m.add_argument("--max-shard-size", default="5GB", help="output shard size; default 5GB")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.add_argument("--strict", action="store_true", help="refuse config keys mergekit-moe ignores")
    m.add_argument("--i-understand-this-is-not-useful-without-training", dest="allow_all_same", action="store_true",
                   help="allow experts that are all one model (mergekit-moe's flag)")
    m.add_argument("--trust-remote-code", action="store_true", help="allow the models' custom code")
    m.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    m.add_argument("--dry-run", action="store_true",
                   help="print the MoE plan (tensors, bytes to read and write, peak memory, shards) and stop: no "
                        "weight is read, no model loaded, nothing written")
    m.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON (every tensor)")


def _non_expert(args: argparse.Namespace) -> Any:

    params = key_values(args.param, "--param")
    if args.non_expert is None:
        if params:
            raise SystemExit("hf-ame moe: --param needs --non-expert")
        return None
    if args.non_expert == "base":
        return "base"
    return {"merge_method": args.non_expert, **({"parameters": params} if params else {})}


def cmd_moe(args: argparse.Namespace) -> int:

    kwargs: Dict[str, Any] = dict(overwrite=args.overwrite, max_shard_size=args.max_shard_size, device=args.device,
                                  allow_all_same=args.allow_all_same, trust_remote_code=args.trust_remote_code,
                                  strict=args.strict, non_expert=_non_expert(args), router_source=args.router_source,
                                  random_seed=args.random_seed)
    if args.dry_run:
        plan = build_moe(args.config, args.out, dry_run=True, **kwargs)
        print(json.dumps(plan.to_dict(), indent=1) if args.json else str(plan))
        return 0
    result = build_moe(args.config, args.out, progress=args.progress, **kwargs)
    print(result.summary())
    for w in result.warnings:
        print(f"warning: {w}")
    return 0
