"""Rows matched by key: vocabularies (embedding rows by token) and label sets (head rows by label).

Fine-tunes of one model may index the rows of a few tensors differently: a chat fine-tune adds
tokens (its embedding and lm_head have more rows), a classifier is trained on its own labels in its
own order. A :class:`RowMap` says, for each output row, which row of each source holds the same key
(token string or label name), or that it has none. Output rows held by the same sources form a
group (:func:`row_groups`); each group is merged over those sources only, as its own merge (the
soup: their mean; AME: only they contribute pseudogradients). Pure data and index arithmetic: the
key sets are read by :mod:`hf_ame.vocab` and :mod:`hf_ame.labels`, the rows by the executor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .algorithm import Pivot, PivotSpec
from .config import AMEConfig
from .methods import get_method

__all__ = ["RowMap", "RowAlignment", "RowGroup", "match_rows", "row_groups", "subset_config", "subset_pivot",
           "fill_sources", "MISSING_TOKENS"]

# how a row is merged when some models lack its key (``missing_tokens``)
MISSING_TOKENS = {None: "over the models that hold its token (a model that lacks it takes no part)",
                  "mergekit": "as mergekit does: each model lacking a token takes the base's row (when the base holds "
                              "it), the only holder's, or the holders' mean (zero if none holds it); padding rows take "
                              "each model's mean row; then every tensor merges whole"}


@dataclass
class RowMap:
    """One axis ("vocab", "labels") of the output: ``keys[i]`` is output row i's key (None: a padding
    row, matched by position among sources that also have it as padding), ``rows`` the output's row
    count, ``sources[name][i]`` the row of source ``name`` (an ingredient or the base) holding row i's
    key, or -1; ``source_rows[name]`` how many rows that source's tensors have."""

    axis: str
    keys: List[Optional[str]]
    sources: Dict[str, List[int]]
    source_rows: Dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.keys)

    def is_identity(self, names: Sequence[str]) -> bool:
        """True when every source in ``names`` has exactly the output's rows in the output's order."""
        ident = list(range(self.rows))
        return all(self.sources.get(n) == ident and self.source_rows.get(n) == self.rows for n in names)


@dataclass
class RowAlignment:
    """Every row map of a merge: which tensors follow which axis, the config fields the output takes
    (``vocab_size``, ``id2label``, ...), the tokenizer to write (a transformers tokenizer, or None to
    copy the reference's files) and notes for the card."""

    maps: Dict[str, RowMap] = field(default_factory=dict)
    tensors: Dict[str, str] = field(default_factory=dict)  # tensor name -> axis
    config_changes: Dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    tokenizer_dir: Optional[str] = None
    chat_template: Optional[str] = None  # written as chat_template.jinja
    notes: List[str] = field(default_factory=list)
    fill: Optional[str] = None  # "mergekit": rows a model lacks are filled (:func:`fill_sources`), tensors merged whole
    fill_base: Optional[str] = None  # the base of that rule (its row is preferred)
    # fill_tokens: row -> (model, its row); None: zero
    fill_tokens: Dict[int, Tuple[Optional[str], int]] = field(default_factory=dict)
    forced: List[int] = field(default_factory=list)  # rows every model takes from fill_tokens (mergekit's force)

    def map_for(self, tensor: str) -> Optional[RowMap]:
        axis = self.tensors.get(tensor)
        return self.maps[axis] if axis is not None else None

    def update(self, other: "RowAlignment") -> None:
        """Add another axis's maps, tensors, config fields and notes (its tokenizer if it has one)."""
        self.maps.update(other.maps)
        self.tensors.update(other.tensors)
        self.config_changes.update(other.config_changes)
        self.tokenizer = other.tokenizer if other.tokenizer is not None else self.tokenizer
        self.tokenizer_dir = other.tokenizer_dir or self.tokenizer_dir
        self.chat_template = other.chat_template or self.chat_template
        self.notes.extend(other.notes)
        self.fill, self.fill_base = other.fill or self.fill, other.fill_base or self.fill_base
        self.fill_tokens.update(other.fill_tokens)
        self.forced.extend(other.forced)


def match_rows(axis: str, out_keys: Mapping[str, int], out_rows: int, source_keys: Mapping[str, Mapping[str, int]],
               source_rows: Mapping[str, int]) -> RowMap:
    """The :class:`RowMap` of an output whose key ``k`` is row ``out_keys[k]`` (of ``out_rows``) over
    sources whose key ``k`` is row ``source_keys[name][k]`` (of ``source_rows[name]``). A key a source
    lacks (or holds beyond its rows) is -1 there; an output row no key names (padding) is matched to
    the same row of each source where that row is padding too."""
    keys: List[Optional[str]] = [None] * out_rows
    for k, i in out_keys.items():
        if 0 <= i < out_rows:
            keys[i] = k
    sources: Dict[str, List[int]] = {}
    for name, sk in source_keys.items():
        n = source_rows[name]
        used = {i for i in sk.values() if 0 <= i < n}
        sources[name] = [(sk.get(k, -1) if sk.get(k, -1) < n else -1) if k is not None
                         else (r if r < n and r not in used else -1)
                         for r, k in enumerate(keys)]
    return RowMap(axis, keys, sources, dict(source_rows))


@dataclass
class RowGroup:
    """Output rows ``out`` (indices) held by the same sources: ``members`` (ingredient indices, in
    merge order), ``rows[k]`` the rows of member k holding them; ``base_rows`` the base's, when it
    has all of them. No members: rows no source holds (filled with the mean of the others)."""

    out: torch.Tensor
    members: Tuple[int, ...]
    rows: List[torch.Tensor]
    base_rows: Optional[torch.Tensor] = None


def row_groups(row_map: RowMap, names: Sequence[str], base: Optional[str] = None) -> List[RowGroup]:
    """Partition the output rows by which of ``names`` (the merge's ingredients, in order) hold
    them (and whether ``base`` does), largest group first."""
    idx = torch.tensor([row_map.sources.get(n, [-1] * row_map.rows) for n in names],
                       dtype=torch.long).reshape(len(names), -1)
    pattern = idx >= 0
    b = torch.tensor(row_map.sources.get(base, [-1] * row_map.rows), dtype=torch.long) if base is not None else None
    if b is not None:
        pattern = torch.cat([pattern, (b >= 0)[None]], 0)
    kinds, inverse = torch.unique(pattern.T, dim=0, return_inverse=True)
    groups = []
    for g in range(kinds.shape[0]):
        out = torch.nonzero(inverse == g).flatten()
        members = tuple(int(j) for j in torch.nonzero(kinds[g][: len(names)]).flatten())
        has_base = base is not None and bool(kinds[g][-1])
        groups.append(RowGroup(out, members, [idx[j, out] for j in members], b[out] if has_base else None))
    return sorted(groups, key=lambda g: (-len(g.members), -g.out.numel()))


def subset_config(config: AMEConfig, members: Sequence[int]) -> AMEConfig:
    """``config`` for a merge of only ``members`` (indices of the full merge): per-ingredient
    method parameters (lists in merge order) keep the members' values."""
    if not config.method_kwargs:
        return config
    per_model = get_method(config.method).per_model if config.method is not None else ()
    kw = {k: ([v[j] for j in members] if k in per_model and isinstance(v, (list, tuple)) else v)
          for k, v in config.method_kwargs.items()}
    return config.replace(method_kwargs=kw)


def subset_pivot(pivot: PivotSpec, members: Sequence[int], has_base: bool) -> PivotSpec:
    """The pivot of a merge of only ``members``: an ingredient pivot keeps its place among them; a
    pivot the group lacks (that ingredient, or the base) becomes the group's soup."""
    kind, idx = pivot
    if kind == "index":
        return Pivot("index", list(members).index(idx)) if idx in members else Pivot("soup")
    if kind == "base" and not has_base:
        return Pivot("soup")
    return pivot


def fill_sources(row_map: RowMap, names: Sequence[str], base: Optional[str],
                 tokens: Optional[Mapping[int, Tuple[Optional[str], int]]] = None,
                 forced: Sequence[int] = ()) -> Dict[int, List[Tuple[str, int]]]:
    """mergekit's default row (``PermutedVocabulary``) for each keyed output row that some of ``names``
    (the models merged) lack, or that is ``forced``: the (model, row) pairs averaged into it (none:
    zero): the row ``tokens`` names for it (mergekit's ``tokenizer.tokens``); else the one holder's;
    else ``base``'s when it is merged and holds the row; else every holder's."""
    tokens, forced_rows, out = tokens or {}, set(forced), {}
    for i, key in enumerate(row_map.keys):
        if key is None:
            continue
        rows = {n: row_map.sources.get(n, [-1] * row_map.rows)[i] for n in names}
        holders = [n for n in names if rows[n] >= 0]
        if len(holders) == len(names) and i not in forced_rows:
            continue
        if i in tokens:
            model, row = tokens[i]
            out[i] = [] if model is None else [(model, row)]
            continue
        pick = holders if len(holders) <= 1 or base not in holders else [base]
        out[i] = [(n, rows[n]) for n in pick]
    return out
