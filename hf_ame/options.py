"""How ingredients that differ are aligned, declared once (issue 29).

:class:`AlignOptions` names the choices ``AMEMerger.from_pretrained`` takes as keyword arguments, a
recipe keeps in its ``output`` section and ``hf-ame merge`` takes as flags: the flags are generated
from the fields (:func:`add_option_flags`, help text from the field's metadata), the recipe's keys
and ``from_recipe``'s hand-over are :meth:`AlignOptions.names`, so a new choice is added here once.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple, Union

__all__ = ["AlignOptions", "add_option_flags"]


def _option(help: str, *, metavar: Optional[str] = None, cli: bool = True, **argparse_kw: Any) -> Any:
    """A field defaulting to None; ``help``/``metavar``/``argparse_kw`` make its flag (``cli=False``: none)."""
    return dataclasses.field(default=None, metadata={"help": help, "metavar": metavar, "cli": cli, **argparse_kw})


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
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["cli"])

    def to_dict(self) -> Dict[str, Any]:
        """{name: value} of every choice (None included: the merger's ``choices``)."""
        return {name: getattr(self, name) for name in self.names()}


def add_option_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--name-with-dashes`` flag per field of ``cls`` whose metadata allows it (default None)."""
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        if not meta.pop("cli"):
            continue
        kw = {k: v for k, v in meta.items() if v is not None}
        parser.add_argument("--" + f.name.replace("_", "-"), default=None, **kw)
