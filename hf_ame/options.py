"""Options declared once, as frozen dataclasses whose fields make the CLI's flags (issue 29).

:class:`AlignOptions` names the choices ``AMEMerger.from_pretrained`` takes as keyword arguments, a
recipe keeps in its ``output`` section and ``hf-ame merge`` takes as flags: the flags are generated
from the fields (:func:`add_option_flags`, help text from the field's metadata), the recipe's keys
and ``from_recipe``'s hand-over are :meth:`AlignOptions.names`, so a new choice is added here once.
:class:`RunOptions` does the same for how the merge is computed and written; ``AMEConfig``'s fields carry
the same metadata (:func:`cli_meta`) and make the AME run's flags.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["AlignOptions", "RunOptions", "add_option_flags", "cli_meta", "given_options"]


def cli_meta(help: Any, *, flag: Optional[str] = None, parse: Optional[Callable[[Any], Any]] = None,
             metavar: Optional[str] = None, cli: bool = True, **argparse_kw: Any) -> Dict[str, Any]:
    """A field's metadata for :func:`add_option_flags`: ``help`` (text, or a callable giving it when the
    parser is built), ``flag`` (default ``--name-with-dashes``), ``parse`` (the flag's value -> the
    field's, raising ValueError), argparse keywords; ``cli=False``: no flag."""
    return {"help": help, "metavar": metavar, "cli": cli, "flag": flag, "parse": parse, **argparse_kw}


def _option(help: str, **kw: Any) -> Any:
    """A field defaulting to None; ``help`` and ``kw`` (:func:`cli_meta`'s) make its flag."""
    return dataclasses.field(default=None, metadata=cli_meta(help, **kw))


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlignOptions:
    """Ingredients that differ: vocabularies, heads, configs, chat template, tensor layout. None: the
    default of each (differences refused, the files' own layout)."""

    tokenizer_source: Union[str, int, None] = _option(
        "ingredients with different vocabularies (added tokens): the output's vocabulary, first | base "
        "| union | an ingredient; embedding rows are matched by token", metavar="SOURCE")
    pad_to_multiple_of: Optional[int] = _option(
        "with --tokenizer-source: round the embedding rows up to a multiple of N", metavar="N", type=int)
    missing_tokens: Optional[str] = _option(
        "an embedding row some models lack: merged as mergekit does (default: over the models "
        "that hold its token)", choices=["mergekit"])
    tokens: Optional[Mapping[str, Mapping[str, Any]]] = _option(
        "per-token row sources, mergekit's tokenizer.tokens ({token: {source, force}})", cli=False)
    heads: Union[str, int, None] = _option(
        "classifiers with different label sets: union | drop | an ingredient (its head as it is); "
        "the same labels in another order are always aligned by name", metavar="CHOICE")
    config_source: Union[str, int, None] = _option(
        "configs that differ in what the weights compute (rope_theta, ...): take first | base | an "
        "ingredient's; default: refuse", metavar="SOURCE")
    chat_template: Optional[str] = _option(
        "the output's chat template: auto (the one most models have), Jinja text, or a name bundled "
        "with mergekit (chatml, llama3, ...)", metavar="TEMPLATE")
    layout: Optional[str] = _option(
        "tensors of architectures transformers converts (MoE experts): original (as stored: each expert "
        "merged on its own; default) or in_memory (one fused tensor per layer, as mergekit and "
        "mergekit configs merge them)", choices=["original", "in_memory"])

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        """Every choice's name, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def flag_names(cls) -> Tuple[str, ...]:
        """The choices ``hf-ame merge`` takes as flags (``tokens``, a mapping, only in recipes)."""
        return tuple(f.name for f in _cli_fields(cls, None))

    def to_dict(self) -> Dict[str, Any]:
        """{name: value} of every choice (None included: the merger's ``choices``)."""
        return {name: getattr(self, name) for name in self.names()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How a merge is computed and written: ``from_pretrained``'s ``dtype`` and ``device_map`` (here
    ``device``), ``merge()``/``plan()``'s ``max_shard_size``, ``stream`` and ``memory_budget``. None:
    the API's default (given in each help text)."""

    dtype: Optional[str] = _option("output dtype (float32, bfloat16, float16); default: the ingredients'")
    max_shard_size: Union[int, str, None] = _option("output shard size; default 5GB (or the recipe's)")
    device: Optional[str] = _option(
        "device for the merge arithmetic (cpu, cuda, cuda:1); default auto (Accelerate's placement: a GPU when "
        "there is one)")
    stream: Optional[str] = _option(
        "ingredient: on CPU, one block of every ingredient at a time, each input read once (elsewhere one "
        "ingredient's copy at a time): memory independent of N; tensor: the N copies of one tensor in memory; "
        "auto (default): ingredient on CPU, else ingredient only when tensor would not fit",
        choices=["auto", "tensor", "ingredient"])
    memory_budget: Optional[int] = _option(
        "memory 'auto' may use for ingredient copies; default half the available memory", metavar="BYTES", type=int)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunOptions":
        """The values given as ``hf-ame merge`` flags (the others None)."""
        return cls(**given_options(args, cls))

    def load_kwargs(self) -> Dict[str, Any]:
        """``from_pretrained``'s keywords among the values given."""
        return {k: v for k, v in (("dtype", self.dtype), ("device_map", self.device)) if v is not None}

    def run_kwargs(self) -> Dict[str, Any]:
        """``merge()``/``plan()``'s keywords among the values given."""
        return {k: getattr(self, k) for k in ("max_shard_size", "stream", "memory_budget")
                if getattr(self, k) is not None}


def _cli_fields(cls: type, only: Optional[Sequence[str]]) -> List[dataclasses.Field]:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("cli")}
    return [fields[n] for n in only] if only is not None else list(fields.values())


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_option_flags(parser: Any, cls: type, only: Optional[Sequence[str]] = None) -> None:
    """One flag per field of ``cls`` whose metadata allows it (``only``: those fields, in that order),
    dest the field's name, default None (a flag not given leaves the recipe's or the API's default)."""
    for f in _cli_fields(cls, only):
        meta = {k: v for k, v in f.metadata.items() if k not in ("cli", "flag", "parse") and v is not None}
        if callable(meta.get("help")):
            meta["help"] = meta["help"]()
        parser.add_argument(_flag(f), dest=f.name, default=None, **meta)


def given_options(args: argparse.Namespace, cls: type, only: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """{field: value} of the flags of ``cls`` given on the command line, each read by its ``parse``; a
    value that does not parse is a ValueError naming the flag."""
    out: Dict[str, Any] = {}
    for f in _cli_fields(cls, only):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        parse = f.metadata.get("parse")
        if parse is not None:
            try:
                value = parse(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{_flag(f)}: {exc}") from None
        out[f.name] = value
    return out
