"""The ``hf-ame`` command line."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import yaml

from .errors import ConfigError, Interrupted, OutputExistsError, error_line
from .cli_args import key_values
from .merger import AMEMerger
from .lora_cli import add_lora_merge_arguments, add_lora_parser, cmd_extract_lora, lora_merge_kwargs
from .moe_cli import add_moe_parser, cmd_moe
from .methods import get_method
from .optimizers import list_optimizers
from .config import AMEConfig
from .options import AlignOptions, RunOptions, add_option_flags, given_options
from .publish import push_folder
from .recipe import load_recipe
from .search import split_space

EXAMPLES = """examples:
  hf-ame merge recipes/adamw_ame.yaml --out merged                 # everything from a recipe file
  hf-ame merge me/vit-ame --out merged                               # the ame_recipe.yaml of a Hub repo
  hf-ame merge recipe.yaml --out merged --push me/vit-ame            # merge, then publish with a model card
  hf-ame merge ./ft-a ./ft-b ./ft-c --out merged --optimizer sgd --lr 1 --lr-schedule constant \
--no-adaptive-pivot   # uniform soup
  hf-ame merge ./ft-* --out merged --optimizer adamw --lr 1e-3 --epochs 5 --batch-size 2 --opt weight_decay=0
  hf-ame merge ./ft-a ./ft-b --out merged --pivot ./base-model --no-adaptive-pivot --dtype bfloat16
  hf-ame merge ./ft-* --out merged --max-shard-size 2GB --dry-run   # print the plan; read no weight, write nothing
  hf-ame merge ./ft-* --base-model ./base --method ties --param density=0.5 --out merged          # mergekit's TIES
  hf-ame merge ./ft-* --base-model ./base --method ties --param density=0.5 --optimizer adamw --lr 1e-3 \
--epochs 3 --out m
  hf-ame push merged me/vit-ame --private
  hf-ame score ./ft-a ./ft-b --metric accuracy --dataset ./val_dataset --split validation
  hf-ame optimizers
  hf-ame convert mergekit_config.yml --out ame_recipe.yaml      # a mergekit config as an hf_ame recipe
  hf-ame merge mergekit_config.yml --out merged                  # or run it as it is
  hf-ame ui                                                      # a web page on 127.0.0.1: compose, preview, run, push
  hf-ame moe moe.yml --out my-moe                                # a mixture of experts (mergekit-moe config)
  hf-ame extract-lora ./ft --base ./base --rank 16 --out ft-lora  # a fine-tune as a peft LoRA adapter
  hf-ame merge ./lora-a ./lora-b --out merged-lora --output-format lora   # adapters merged into one adapter
"""


def _add_merge_arguments(m: argparse.ArgumentParser) -> None:
    """The flags of `hf-ame merge`, group by group."""
    m.add_argument("models", nargs="+", metavar="PATH",
                   help="checkpoint folders or Hub ids in merge order (at least 2), or ONE recipe: a .yaml file "
                        "or a Hub repo holding ame_recipe.yaml")
    m.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    _add_ame_arguments(m)
    _add_method_arguments(m)
    _add_alignment_arguments(m)
    _add_output_arguments(m)
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.add_argument("--strict", action="store_true",
                   help="a mergekit config: refuse keys and parameters mergekit ignores "
                        "(default: ignored with a warning)")
    m.add_argument("--allow-unchanged", action="store_true",
                   help="write the output even if every merged tensor equals one input (the base or the pivot model); "
                        "by default that is refused")
    m.add_argument("--trust-remote-code", action="store_true",
                   help="allow the ingredients' custom code and, in a recipe, metric scripts and "
                        "module:function amplifications (a recipe cannot allow them itself)")
    m.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    m.add_argument("--push", metavar="REPO_ID", nargs="?", const="", default=None,
                   help="after merging, push the folder (weights, card, recipe) to this Hub repo in one commit; "
                        "with a local recipe and no value, to its hub.repo_id "
                        "(a recipe from the Hub: type the repo id)")
    m.add_argument("--private", action="store_true", default=None, help="with --push: create the repo private")
    m.add_argument("--revision", default=None, help="recipe from a Hub repo: its revision")
    m.add_argument("--dry-run", action="store_true",
                   help="print the merge plan (tensors, readers, bytes to read and write, peak memory estimate, "
                        "shards, devices) from the headers alone, and stop: no weight is read, nothing is written")
    m.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON (every tensor)")
    add_lora_merge_arguments(m)


def _add_ame_arguments(m: argparse.ArgumentParser) -> None:
    """The AME run: optimizer, schedule, epochs, order, pivot (AMEConfig's fields)."""
    add_option_flags(m, AMEConfig, only=_AME_FLAGS)


_AME_FLAGS = ("optimizer", "lr", "lr_schedule", "lr_power", "epochs", "batch_size", "shuffle", "seed", "pivot",
              "adaptive_pivot", "amplification", "optimizer_kwargs")


def _add_method_arguments(m: argparse.ArgumentParser) -> None:
    """A base model, a merge method and its parameters, a search."""
    m.add_argument("--base-model", default=None, metavar="PATH",
                   help="base checkpoint (folder or Hub id): the pivot of "
                        "--pivot base, and where --method measures task vectors from")
    add_option_flags(m, AMEConfig, only=("method",))
    m.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a method parameter (repeatable), mergekit's names: "
                        "--param density=0.5 --param weight=[1,0.5,0.8]")
    m.add_argument("--search", default=None, metavar="SPACE.yaml",
                   help="a validation search: a YAML file {space: {lr: [1e-4, 1e-3], epochs: [1, 3]}, n_trials: null, "
                        "metric: accuracy, dataset: {path: ..., split: validation}} (metric and dataset: else the "
                        "recipe's ordering); trial 0 is the uniform soup, the best-scoring trial is kept")


def _add_alignment_arguments(m: argparse.ArgumentParser) -> None:
    """Ingredients that differ: vocabularies, heads, configs, chat template, tensor layout."""
    add_option_flags(m, AlignOptions)


def _add_output_arguments(m: argparse.ArgumentParser) -> None:
    """Output dtype, shards, device and streaming (RunOptions; the arithmetic's dtype is AMEConfig's)."""
    add_option_flags(m, RunOptions, only=("dtype",))
    add_option_flags(m, AMEConfig, only=("compute_dtype",))
    add_option_flags(m, RunOptions, only=("max_shard_size", "device", "stream", "memory_budget"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-ame",
        description="Merge fine-tuned Hugging Face checkpoints with Amortized Model Ensembling (AME).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge checkpoint folders", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_merge_arguments(m)

    p = sub.add_parser("push", help="publish a merged folder (one commit: weights, card, recipe)", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a folder written by hf-ame merge")
    p.add_argument("repo_id", help="namespace/name on the Hub")
    p.add_argument("--private", action="store_true", default=None, help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--message", default=None, help="commit message")

    sc = sub.add_parser("score", help="score checkpoints with an evaluate metric on a dataset split", epilog=EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sc.add_argument("models", nargs="+", metavar="PATH", help="checkpoint folders or Hub ids")
    sc.add_argument("--metric", required=True, help="evaluate metric name (accuracy, f1, loss, perplexity, ...)")
    sc.add_argument("--dataset", required=True,
                    help="Hub dataset id, builder name (csv, json, parquet, imagefolder) or a save_to_disk folder")
    sc.add_argument("--split", default="validation")
    sc.add_argument("--name", default=None, help="dataset configuration name")
    sc.add_argument("--data-files", default=None, help="data files for a builder")
    sc.add_argument("--input-column", default=None)
    sc.add_argument("--label-column", default=None)
    sc.add_argument("--metric-kwargs", default=None, help='JSON, e.g. \'{"average": "macro"}\'')
    sc.add_argument("--no-cache", dest="cache", action="store_false", help="do not read or write the score cache")
    sc.add_argument("--no-progress", dest="progress", action="store_false")

    sub.add_parser("optimizers", help="list the optimizer registry with defaults")
    c = sub.add_parser("convert", help="write the hf_ame recipe equivalent to a mergekit config", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("config", help="a mergekit_config.yml (or a folder or Hub repo holding one)")
    c.add_argument("--out", default=None, help="where to write the recipe (refused if it exists); default: print it")
    add_moe_parser(sub)
    _add_ui_parser(sub)
    add_lora_parser(sub)
    return parser


def _add_ui_parser(sub: Any) -> None:
    u = sub.add_parser("ui", help="a local web page to compose, check, preview, run and publish a merge (Gradio; "
                       "pip install 'hf_ame[ui]')")
    u.add_argument("--host", default="127.0.0.1", help="address to serve on; default 127.0.0.1 (this machine only)")
    u.add_argument("--port", type=int, default=None, help="port; default 7860 or the next free one")
    u.add_argument("--share-safe", action="store_true",
                   help="for a public page (a Space): Hub repos only (no local paths), no remote code, never the "
                        "server's Hub token, sizes capped")


def _is_recipe(models: List[str]) -> bool:
    if len(models) != 1:
        return False
    p = Path(models[0])
    return p.suffix in (".yaml", ".yml") or p.is_file() or (not p.exists() and models[0].count("/") == 1)


def _search_args(path: Optional[str]) -> Dict[str, Any]:
    """merge()'s search arguments from a --search YAML file ({} without one)."""
    if path is None:
        return {}
    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"--search {path}: expected a YAML mapping, got {type(spec).__name__}")
    extra = set(spec) - {"space", "n_trials", "metric", "dataset"}
    if extra and "space" in spec:
        raise ValueError(f"--search {path}: unknown key(s) {', '.join(sorted(extra))} "
                         "(space, n_trials, metric, dataset)")
    space, n_trials = split_space({k: v for k, v in spec.items() if k not in ("metric", "dataset")})
    out: Dict[str, Any] = {"search": space, "n_trials": n_trials}
    if spec.get("metric") is not None:
        out["order_by"] = spec["metric"]
    if spec.get("dataset") is not None:
        out["eval_dataset"] = spec["dataset"]
    return out


def _check_repo_id(repo_id: Optional[str]) -> None:
    """--push's repo id, checked before the merge (a bad one would fail only after all the work)."""
    if not repo_id:
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(f"--push: {exc}") from None


def _cmd_merge(args: argparse.Namespace) -> int:
    """One rule for checkpoints and recipes: the AMEConfig fields given as flags are merge()'s overrides.
    With a recipe they replace the recipe's values (the written recipe records them); a method alone
    (no optimizer flag, no recipe) is its one-shot merge, as ``merge(method=...)``."""
    _check_repo_id(args.push)
    overrides = _overrides(args)
    if _is_recipe(args.models):
        merger = _recipe_merger(args)
        repo = _push_target(args.push, merger.recipe)  # refused before the merge, not after it
    else:
        merger, repo = _models_merger(args, overrides), args.push
    kw = RunOptions.from_args(args).run_kwargs()
    if args.dry_run:
        return _print_plan(merger.plan(output_dir=args.out, overwrite=args.overwrite, **kw, **overrides), args.json)
    result = merger.merge(output_dir=args.out, overwrite=args.overwrite, progress=args.progress,
                          allow_unchanged=args.allow_unchanged, **kw, **_search_args(args.search), **overrides,
                          **lora_merge_kwargs(args))
    if result.report.rank != 0:
        return 0
    print(result.report.summary())
    if result.scores:
        print(f"scores ({result.metric['name']}): " + ", ".join(
            f"{k}={v['score'] if isinstance(v, dict) else v:.4f}" for k, v in result.scores.items()))
    if repo:
        private = (args.private if (args.private is not None or merger.recipe is None)
                   else merger.recipe.hub.get("private"))
        info = result.push_to_hub(repo, private=private)
        print(f"pushed to {repo}: {getattr(info, 'commit_url', info)}")
    return 0


_LOAD_FLAGS = (*AlignOptions.flag_names(), "base_model")


def _recipe_merger(args: argparse.Namespace) -> AMEMerger:
    """The recipe's merger, the loading flags given replacing its ``load`` / ``output`` values."""
    kwargs: Dict[str, Any] = {k: getattr(args, k) for k in _LOAD_FLAGS if getattr(args, k) is not None}
    kwargs.update(RunOptions.from_args(args).load_kwargs())
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if args.push == "" and not Path(args.models[0]).expanduser().exists():  # a Hub recipe: before any download
        raise ValueError(_BARE_PUSH.format(source=args.models[0], repo="its hub.repo_id"))
    return AMEMerger.from_recipe(args.models[0], revision=args.revision, strict=args.strict, **kwargs)


def _models_merger(args: argparse.Namespace, overrides: Mapping[str, Any]) -> AMEMerger:
    if args.push == "":
        raise ValueError("--push: give a repo id (only a recipe can supply one)")
    method = overrides.get("method")
    if (overrides.get("pivot") == "base" or (method and get_method(method).needs_base)) and args.base_model is None:
        raise ValueError(f"--method {method}: measures task vectors from a base model: give it with --base-model"
                         if method else "--pivot base: give the base checkpoint with --base-model")
    return AMEMerger.from_pretrained(args.models, trust_remote_code=args.trust_remote_code, base_model=args.base_model,
                                     **RunOptions.from_args(args).load_kwargs(),
                                     **{k: getattr(args, k) for k in AlignOptions.flag_names()})


_BARE_PUSH = ("--push: this recipe came from the Hub ({source}); {repo} is not pushed to without asking: type "
              "the repo id to publish to (--push NAMESPACE/NAME)")


def _push_target(push: Optional[str], recipe: Any) -> Optional[str]:
    """Where ``--push`` publishes: the repo id typed, or a bare ``--push`` to a LOCAL recipe's
    hub.repo_id. A recipe from the Hub never picks where the user's merge is published."""
    if push is None or push:
        return push
    repo = recipe.hub.get("repo_id")
    if recipe.remote:
        raise ValueError(_BARE_PUSH.format(source=recipe.source, repo=f"its hub.repo_id {repo!r}"))
    if not repo:
        raise ValueError("--push: give a repo id, or set hub.repo_id in the recipe")
    return repo


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """The AMEConfig fields given as flags (merge()'s keyword overrides): a method's parameters
    (``--param``) beside them, as ``merge(method="ties", density=0.5)`` takes them."""
    given = given_options(args, AMEConfig, only=(*_AME_FLAGS, "compute_dtype", "method"))
    params = key_values(args.param, "--param")
    if params and args.method is None and not _is_recipe(args.models):
        raise SystemExit("hf-ame: --param needs --method")
    clash = sorted(set(params) & set(given))
    if clash:
        raise SystemExit(f"hf-ame: --param {clash[0]}: not a method parameter (an AMEConfig field: use its own flag)")
    return {**given, **{("lambda_" if k == "lambda" else k): v for k, v in params.items()}}


def _print_plan(plan: Any, as_json: bool) -> int:
    print(json.dumps(plan.to_dict(), indent=1) if as_json else str(plan))
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    info = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                       create_pr=args.create_pr, commit_message=args.message)
    print(f"pushed {args.folder} to {args.repo_id}: {getattr(info, 'commit_url', info)}"
          + (f" (pull request: {info.pr_url})" if getattr(info, "pr_url", None) else ""))
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    ds = {"path": args.dataset, "split": args.split, "name": args.name, "data_files": args.data_files,
          "input_column": args.input_column, "label_column": args.label_column}
    metric_kwargs = json.loads(args.metric_kwargs) if args.metric_kwargs else None
    merger = AMEMerger.from_pretrained(args.models)
    scores = merger.score(args.metric, {k: v for k, v in ds.items() if v is not None}, metric_kwargs=metric_kwargs,
                          cache=args.cache, progress=args.progress)
    width = max(len(m) for m in args.models)
    for m, s in zip(args.models, scores):
        print(f"{m:<{width}}  {args.metric} = {s:.6g}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    text = load_recipe(args.config).to_yaml()
    if args.out is None:
        print(text, end="")
        return 0
    out = Path(args.out)
    if out.exists():
        raise OutputExistsError(f"{out} exists; choose another --out")
    out.write_text(text)
    print(f"wrote {out}: run it with hf-ame merge {out} --out DIR")
    return 0


def _cmd_optimizers(args: argparse.Namespace) -> int:
    for e in list_optimizers():
        alias = f" (alias: {', '.join(e.aliases)})" if e.aliases else ""
        defaults = ", ".join(f"{k}={v!r}" for k, v in e.defaults().items()
                             if k not in ("foreach", "fused", "differentiable", "capturable", "maximize"))
        where = "torch.optim" if e.cls.__module__.startswith("torch.optim") else e.cls.__module__
        blocks = "coordinate-wise (merged in cache blocks on CPU)" if e.elementwise else "whole tensors"
        if e.fused_kernel:
            blocks += "; one fused Triton kernel per step on CUDA"
        print(f"{e.name}{alias}: {where}.{e.cls.__name__} - {e.description}\n    {blocks}; defaults: {defaults}")
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    """Serve the page until Ctrl-C; gradio is imported here only (the ``ui`` extra)."""
    try:
        from .ui import serve
    except ImportError as exc:
        raise ConfigError(f"hf-ame ui needs gradio: pip install 'hf_ame[ui]' ({exc})") from None
    serve(args.host, args.port, share_safe=args.share_safe)
    return 0


@contextlib.contextmanager
def _signals_as_errors() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, so the merge ends as an error
    does (staging folder removed, lock released) instead of dying mid-write. The first one only: the
    clean-up that follows is not interrupted again (kill -9 still ends it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    old: Dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    for s in _SIGNALS:  # a signal the parent ignores (a background job's SIGINT) stays ignored, as Python leaves it
        if signal.getsignal(s) is not signal.SIG_IGN:
            old[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with _signals_as_errors():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    handlers = {"merge": _cmd_merge, "push": _cmd_push, "score": _cmd_score, "optimizers": _cmd_optimizers,
                "convert": _cmd_convert, "moe": cmd_moe, "ui": _cmd_ui, "extract-lora": cmd_extract_lora}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through _signals_as_errors: one line, 128 + signal
        if args.debug:
            raise
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"hf-ame: interrupted by {signal.Signals(signum).name}: stopped; a partial output was removed, "
              "existing outputs are untouched", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:  # `hf-ame optimizers | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 - every failure is one line and exit code 2 (--debug: traceback)
        if args.debug:
            raise
        print(error_line(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
