"""Vocabularies that differ (``tokenizer_source``): embedding and lm_head rows matched by token.

Chat and tool fine-tunes add tokens, so their embedding and lm_head have more rows than their
siblings'. Each source's tokenizer is read as transformers reads it (``AutoTokenizer`` on its
files, before any weight is downloaded); the output vocabulary is one source's (``"first"``,
``"base"``, an ingredient) or ``"union"`` (the first tokenizer plus every added token of the others,
in order); rows are matched by token string (:mod:`hf_ame.rows`). mergekit's names:
``tokenizer_source: base | union | <model>``, ``tokenizer: {pad_to_multiple_of: ...}``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .architecture import embedding_tensors
from .checks import resolve_model_choice
from .errors import IncompatibleCheckpointsError
from .rows import MISSING_TOKENS, RowAlignment, match_rows

__all__ = ["TOKENIZER_SOURCES", "read_tokenizer", "union_tokenizer", "align_vocab", "resolve_tokenizer_source",
           "resolve_chat_template"]

TOKENIZER_SOURCES = ("first", "base", "union")  # or an ingredient's id or index


def resolve_tokenizer_source(source: Union[str, int], names: Sequence[str], has_base: bool) -> Union[str, int]:
    """"union", or the index (in ``names``, the base last) of the source whose vocabulary the output takes."""
    return resolve_model_choice("tokenizer_source", source, names, has_base=has_base, keywords=("union",),
                                expected=f"one of {', '.join(TOKENIZER_SOURCES)}")


def read_tokenizer(folder: Union[str, Path], name: str, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained(folder)``; an error names the model when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        raise IncompatibleCheckpointsError(
            f"tokenizer_source: cannot read the tokenizer of {name!r} ({type(exc).__name__}: {exc}); its embedding "
            "rows cannot be matched by token") from None


def union_tokenizer(first: Any, others: Sequence[Any]) -> Tuple[Any, List[str]]:
    """The first tokenizer plus every added token of the others that it lacks, in order (special
    tokens stay special). Returns (tokenizer, the tokens added)."""
    tok = first
    have = set(tok.get_vocab())
    added: List[str] = []
    for other in others:
        specials = set(other.all_special_tokens)
        for _, token in sorted(other.added_tokens_decoder.items()):
            if token.content in have:
                continue
            if token.content in specials:  # listed as a special token there: listed here too
                tok.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
            else:
                tok.add_tokens([token], special_tokens=bool(token.special))
            have.add(token.content)
            added.append(token.content)
    return tok, added


def _vocab_key(config: Dict[str, Any]) -> Tuple[Optional[str], Any]:
    """Where the config keeps vocab_size: (sub-config key or None, value)."""
    if "vocab_size" in config:
        return None, config["vocab_size"]
    text = config.get("text_config")
    if isinstance(text, dict) and "vocab_size" in text:
        return "text_config", text["vocab_size"]
    return None, None


def _rows_of(header: Any, names: Sequence[str]) -> int:
    rows = {header.tensors[t].shape[0] for t in names}
    if len(rows) != 1:
        raise IncompatibleCheckpointsError(
            f"model {header.name!r}: its embedding tensors ({', '.join(names)}) have different row counts "
            f"{sorted(rows)}")
    return rows.pop()


def _embedding_rows(headers: Sequence[Any], folders: Sequence[Union[str, Path]], names: Sequence[str],
                    trust_remote_code: bool) -> Tuple[List[str], Dict[str, int]]:
    """The embedding tensors (the first model's, which every model must have) and each model's row count."""
    emb = embedding_tensors(str(folders[0]), list(headers[0].tensors), trust_remote_code)
    if not emb:
        raise IncompatibleCheckpointsError(f"tokenizer_source: found no embedding tensor in {names[0]!r}")
    for h in headers:
        lacking = [t for t in emb if t not in h.tensors]
        if lacking:
            raise IncompatibleCheckpointsError(f"model {h.name!r} lacks the embedding tensor {lacking[0]!r}")
    return emb, {h.name: _rows_of(h, emb) for h in headers}


def _union_vocab(out: RowAlignment, toks: Sequence[Any], names: Sequence[str], rows: Mapping[str, int],
                 has_base: bool, pad_to_multiple_of: Optional[int]) -> Tuple[Dict[str, int], int]:
    """``tokenizer_source="union"``: the union tokenizer (set on ``out``, with a note); returns its
    vocabulary and the output's row count."""
    tok, added = union_tokenizer(toks[0], toks[1:])
    # mergekit builds the union on the base model's tokenizer (else the first model's): its chat
    # template, or none, is the output's unless the config names one (chat_template)
    tok.chat_template = toks[-1 if has_base else 0].chat_template
    out_vocab = tok.get_vocab()
    n_tok = max(out_vocab.values()) + 1
    out_rows = max(n_tok, rows[names[0]] if not added else 0)
    m = pad_to_multiple_of or 1
    out_rows = -(-out_rows // m) * m
    out.tokenizer = tok
    out.notes.append(f"vocabulary: the union of {len(names)} tokenizers ({len(out_vocab)} tokens"
                     + (f", {len(added)} added: {', '.join(map(repr, added[:8]))}"
                        + (" ..." if len(added) > 8 else "")
                        if added else "") + f"); {out_rows} embedding rows")
    return out_vocab, out_rows


def _source_vocab(out: RowAlignment, folders: Sequence[Union[str, Path]], names: Sequence[str], chosen: int,
                  vocabs: Mapping[str, Mapping[str, int]], rows: Mapping[str, int],
                  pad_to_multiple_of: Optional[int]) -> Tuple[Mapping[str, int], int]:
    """One source's vocabulary (its tokenizer files are the output's, set on ``out`` with a note);
    returns it and the output's row count."""
    out_vocab, out_rows = vocabs[names[chosen]], rows[names[chosen]]
    if pad_to_multiple_of and out_rows % pad_to_multiple_of:
        out_rows = -(-out_rows // pad_to_multiple_of) * pad_to_multiple_of
    out.tokenizer_dir = str(folders[chosen])
    out.notes.append(f"vocabulary: {names[chosen]!r}'s ({len(out_vocab)} tokens, {out_rows} embedding rows)")
    return out_vocab, out_rows


def _vocab_config_changes(out: RowAlignment, headers: Sequence[Any], chosen: Union[str, int],
                          out_rows: int) -> None:
    """The config fields the output vocabulary changes: vocab_size, and the token ids (which follow
    the tokenizer's source)."""
    ref_config = headers[chosen if chosen != "union" else 0].config
    where, old = _vocab_key(dict(headers[0].config))
    if old is not None and old != out_rows:
        out.config_changes.update({"vocab_size": out_rows} if where is None else
                                  {where: dict(headers[0].config[where], vocab_size=out_rows)})
    for key, value in ref_config.items():  # token ids follow the tokenizer's source
        if key.endswith("_token_id") and headers[0].config.get(key) != value:
            out.config_changes[key] = value


def _note_lost_tokens(out: RowAlignment, names: Sequence[str], vocabs: Mapping[str, Mapping[str, int]],
                      rows: Mapping[str, int], out_vocab: Mapping[str, int], out_rows: int) -> None:
    """A note for each model with tokens (of its rows) that the output vocabulary leaves out."""
    kept = {k for k, i in out_vocab.items() if i < out_rows}
    for n in names:
        lost = sum(1 for k, i in vocabs[n].items() if i < rows[n] and k not in kept)
        if lost:
            out.notes.append(f"{lost} token(s) of {n!r} are not in the output vocabulary: their rows are left out")


def align_vocab(headers: Sequence[Any], folders: Sequence[Union[str, Path]], source: Union[str, int], *,
                has_base: bool, pad_to_multiple_of: Optional[int] = None,
                trust_remote_code: bool = False, missing_tokens: Optional[str] = None,
                tokens: Optional[Mapping[str, Mapping[str, Any]]] = None) -> RowAlignment:
    """The :class:`RowAlignment` of the vocabulary: ``headers`` (name, config, tensors) and
    ``folders`` (with config and tokenizer files) of the ingredients, then the base when
    ``has_base``; ``missing_tokens`` (:data:`hf_ame.rows.MISSING_TOKENS`) says how a row that some
    models lack is merged, ``tokens`` (mergekit's ``tokenizer.tokens``, which implies its rule) where
    some rows come from. Reads tokenizers only; no weight."""
    missing_tokens = "mergekit" if tokens else missing_tokens
    names = [h.name for h in headers]
    chosen = resolve_tokenizer_source(source, names, has_base)
    emb, rows = _embedding_rows(headers, folders, names, trust_remote_code)
    toks = [read_tokenizer(f, n, trust_remote_code) for f, n in zip(folders, names)]
    vocabs = {n: t.get_vocab() for n, t in zip(names, toks)}
    out = RowAlignment(tensors={t: "vocab" for t in emb}, fill=missing_tokens,
                       fill_base=names[-1] if (has_base and missing_tokens) else None)
    if chosen == "union":
        out_vocab, out_rows = _union_vocab(out, toks, names, rows, has_base, pad_to_multiple_of)
    else:
        out_vocab, out_rows = _source_vocab(out, folders, names, chosen, vocabs, rows, pad_to_multiple_of)
    out.maps["vocab"] = match_rows("vocab", out_vocab, out_rows, vocabs, rows)
    out.fill_tokens, out.forced = token_rows(tokens or {}, out_vocab, out_rows, vocabs, rows)
    if out.maps["vocab"].is_identity(names) and not out.forced:  # one vocabulary: the rows merge as they are
        out.tensors = {}
    elif missing_tokens:
        out.notes.append(f"rows some models lack (missing_tokens={missing_tokens!r}): {MISSING_TOKENS[missing_tokens]}")
    _vocab_config_changes(out, headers, chosen, out_rows)
    _note_lost_tokens(out, names, vocabs, rows, out_vocab, out_rows)
    return out


def token_rows(tokens: Mapping[str, Mapping[str, Any]], out_vocab: Mapping[str, int], out_rows: int,
               vocabs: Mapping[str, Mapping[str, int]],
               rows: Mapping[str, int]) -> Tuple[Dict[int, Tuple[Optional[str], int]], List[int]]:
    """mergekit's ``tokenizer.tokens`` as rows: {output row: (model, its row) or (None, -1) for zero}
    and the forced rows. ``source`` is a model (its row for the same token), "zero", or {model, token
    or token_id}; every name is checked here, from the tokenizers."""
    fill: Dict[int, Tuple[Optional[str], int]] = {}
    forced: List[int] = []
    for token, spec in tokens.items():
        i = out_vocab.get(token, -1)
        if not 0 <= i < out_rows:
            raise IncompatibleCheckpointsError(f"tokens: {token!r} is not in the output vocabulary")
        src = spec.get("source")
        if src == "zero":
            fill[i] = (None, -1)
        else:
            model = src if isinstance(src, str) else (src or {}).get("model")
            if model not in vocabs:
                raise IncompatibleCheckpointsError(f"tokens.{token}.source: {model!r} is not one of the models "
                                                   f"({', '.join(vocabs)})")
            row = src["token_id"] if isinstance(src, Mapping) and "token_id" in src else \
                vocabs[model].get(src["token"] if isinstance(src, Mapping) else token, -1)
            if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < rows[model]:
                raise IncompatibleCheckpointsError(f"tokens.{token}.source: model {model!r} has no such row ({src!r})")
            fill[i] = (model, row)
        if spec.get("force"):
            forced.append(i)
    return fill, forced


def resolve_chat_template(value: str, folders: Sequence[Union[str, Path]], names: Sequence[str],
                          trust_remote_code: bool = False) -> Tuple[str, str]:
    """mergekit's ``chat_template``: ``"auto"`` (the template most of the models have), the name of
    one of mergekit's bundled templates (chatml, llama3, ...: read from an installed mergekit), or the
    Jinja text itself. Returns (template, a note for the card)."""
    if value == "auto":
        found = []
        for folder, name in zip(folders, names):
            template = getattr(read_tokenizer(folder, name, trust_remote_code), "chat_template", None)
            template = template.get("default") if isinstance(template, dict) else template
            if template:
                found.append(template.strip())
        if not found:
            raise IncompatibleCheckpointsError("chat_template: 'auto' found no chat template in any model's tokenizer")
        best = max(set(found), key=found.count)
        return best, f"chat template: the one {found.count(best)} of {len(names)} models have (auto)"
    if "{" in value and len(value) >= 20:
        return value, "chat template: given in the merge's configuration"
    try:
        from importlib.resources import files

        if not re.fullmatch(r"[A-Za-z0-9_\-]+", value):
            raise ModuleNotFoundError  # a bundled template has a plain name: no path out of mergekit's folder
        bundled = files("mergekit._data.chat_templates").joinpath(value + ".jinja")
        if bundled.is_file():
            return bundled.read_text(), f"chat template: mergekit's {value!r}"
    except (ImportError, ModuleNotFoundError):
        pass
    raise IncompatibleCheckpointsError(
        f"chat_template: {value!r} is neither 'auto', a Jinja template, nor a template bundled with an installed "
        "mergekit (chatml, llama3, alpaca, mistral, exaone)")
