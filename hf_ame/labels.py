"""Classification heads trained on their own labels: head rows matched by label name (``heads=``).

A classifier's head tensors are those outside the architecture's ``base_model_prefix`` (asked of
transformers); a head tensor whose first dimension is ``num_labels`` has one row per label, and
``config.json``'s ``id2label`` names them. Rows are matched by label name as vocabulary rows are
matched by token (:mod:`hf_ame.rows`): the same labels in another order are always aligned to the
first ingredient's order; other label sets need a choice:

- ``None`` (default): label sets must be equal as sets, or one error lists them all;
- ``"union"``: the first ingredient's labels, then the others' new ones in order, each row merged
  from the ingredients that have its label;
- an ingredient (id or index): its head tensors and labels as they are; the body merged from all;
- ``"base"``: the base model's head and labels, where it has one;
- ``"drop"``: no head; the merged body is saved as the headless model (``AutoModel`` loads it).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .checks import resolve_model_choice
from .errors import IncompatibleCheckpointsError
from .rows import RowAlignment, match_rows

__all__ = ["HEAD_CHOICES", "labels_of", "head_tensors", "align_labels", "prefix_renames", "drop_renames"]

HEAD_CHOICES = ("union", "base", "drop")  # or None, or an ingredient's id or index


def labels_of(config: Dict[str, Any]) -> Optional[List[str]]:
    """The label names in id order (``id2label``), or None when the config has none."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        return [str(id2label.get(str(i), id2label.get(i))) for i in range(len(id2label))]  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def head_tensors(names: Sequence[str], prefix: str) -> List[str]:
    """Tensors outside the body (``prefix.*``): the head. None without a prefix (no body to tell apart)."""
    if not prefix:
        return []
    return [n for n in names if not n.startswith(prefix + ".")]


def _choice(heads: Union[str, int, None], names: Sequence[str]) -> Union[str, int, None]:
    if heads is None:
        return None
    return resolve_model_choice("heads", heads, names, has_base=False, keywords=HEAD_CHOICES,
                                expected="None, 'union', 'base', 'drop'")


def _refusal(names: Sequence[str], labels: Sequence[Sequence[str]]) -> IncompatibleCheckpointsError:
    listing = "; ".join(f"{n!r}: {', '.join(map(str, lab))}" for n, lab in zip(names, labels))
    return IncompatibleCheckpointsError(
        f"the ingredients' heads are trained on different label sets ({listing}); choose heads='union' (every label, "
        "each row merged from the ingredients that have it), heads=<an ingredient> (its head as it is), "
        "heads='base' (the base model's head) or heads='drop' (the merged body, headless)")


def align_labels(headers: Sequence[Any], heads: Union[str, int, None], *, prefix: str,
                 base: Any = None) -> Tuple[RowAlignment, List[str]]:
    """The :class:`RowAlignment` of the head rows of ``headers`` (the ingredients; ``base``: the base
    model's header, which may have no head) and the head tensors to drop ("drop"). Reads configs only."""
    names = [h.name for h in headers]
    choice = _choice(heads, names)
    out = RowAlignment()
    head = head_tensors(list(headers[0].tensors), prefix)
    if choice == "drop":
        out.notes.append(f"heads: dropped ({', '.join(head) or 'none'}); the merged body is saved headless")
        return out, head
    labels = [labels_of(h.config) for h in headers]
    if not head or any(lab is None for lab in labels):
        return out, []
    rows = {h.name: len(lab) for h, lab in zip(headers, labels)}
    by_label = [{name: i for i, name in enumerate(lab)} for lab in labels]
    labelled = [t for t in head
                if all(h.tensors.get(t) is not None and h.tensors[t].shape[0] == rows[h.name] for h in headers)]
    if not labelled:
        return out, []
    for h, lab in zip(headers, labels):
        _check_unique(h.name, lab)
    if choice is None and len({frozenset(lab) for lab in labels}) > 1:
        raise _refusal(names, labels)
    if choice == "base":
        donor = _base_head(base, head)
        out_labels, keys = labels_of(donor.config) or [], {n: {} for n in names}
        _check_unique(donor.name, out_labels)
        keys[donor.name], rows[donor.name] = {x: i for i, x in enumerate(out_labels)}, len(out_labels)
        _take_head(out, donor, [h.name for h in headers] + [donor.name], [t for t in head if t not in labelled])
        out.notes.append(f"heads: the base model {donor.name!r}'s head and labels ({', '.join(out_labels)})")
    elif isinstance(choice, int):
        out_labels = labels[choice]
        keys = {n: (by_label[k] if k == choice else {}) for k, n in enumerate(names)}
        out.notes.append(f"heads: {names[choice]!r}'s head and labels ({', '.join(out_labels)}), as they are")
        _take_head(out, headers[choice], names, [t for t in head if t not in labelled])
    else:
        out_labels, keys = _union_labels(out, choice, names, labels, by_label)
    if (choice != "base" and base is not None and labels_of(base.config) is not None
            and all(t in base.tensors for t in labelled)):
        _check_unique(base.name, labels_of(base.config) or [])
        keys[base.name] = {name: i for i, name in enumerate(labels_of(base.config) or [])}
        rows[base.name] = len(labels_of(base.config) or [])
    if any(lab != labels[0] for lab in labels[1:]) or choice is not None:
        out.notes.append("label sets: " + "; ".join(f"{n!r}: {', '.join(lab)}" for n, lab in zip(names, labels)))
    _match_label_rows(out, out_labels, keys, rows, labelled, base)
    return out, []


def _union_labels(out: RowAlignment, choice: Union[str, int, None], names: Sequence[str],
                  labels: Sequence[List[str]], by_label: Sequence[Dict[str, int]]
                  ) -> Tuple[List[str], Dict[str, Dict[str, int]]]:
    """heads=None or "union": the output's labels (the first ingredient's, then the others' new ones in
    order) and each ingredient's rows keyed by label; a note says what was aligned."""
    out_labels = list(labels[0])
    for lab in labels[1:]:
        out_labels += [x for x in lab if x not in out_labels]
    keys = dict(zip(names, by_label))
    if labels.count(labels[0]) != len(labels):
        moved = [n for n, lab in zip(names, labels) if lab != labels[0] and set(lab) == set(labels[0])]
        out.notes.append("labels: "
                         + (f"rows of {', '.join(map(repr, moved))} aligned to {names[0]!r}'s label order; "
                            if moved else "")
                         + (f"the union of the label sets ({', '.join(out_labels)})"
                            if choice == "union" else f"labels {', '.join(out_labels)}"))
    return out_labels, keys


def _match_label_rows(out: RowAlignment, out_labels: Sequence[str], keys: Dict[str, Dict[str, int]],
                      rows: Dict[str, int], labelled: Sequence[str], base: Any) -> None:
    """Put the label row map, the labelled tensors and the output's id2label / label2id into ``out``,
    unless there is nothing to align (one label set in one order)."""
    lmap = match_rows("labels", {x: i for i, x in enumerate(out_labels)}, len(out_labels), keys, rows)
    if lmap.is_identity(list(keys)) and (base is None or base.name in keys) and not out.tensors:
        return  # one label set in one order: nothing to align
    out.maps["labels"] = lmap
    out.tensors.update({t: "labels" for t in labelled})
    out.config_changes.update(id2label={str(i): x for i, x in enumerate(out_labels)},
                              label2id={x: i for i, x in enumerate(out_labels)})


def _check_unique(model: str, labels: Sequence[str]) -> None:
    """Rows are matched by label name: two ids with one name would drop one row and take the other
    from a single model, so they are refused, naming the model, the label and its ids."""
    seen: Dict[str, int] = {}
    for i, name in enumerate(labels):
        if name in seen:
            raise IncompatibleCheckpointsError(
                f"model {model!r}: config.json's id2label names {name!r} twice (ids {seen[name]} and {i}); head rows "
                "are matched by label name, so each label needs its own name (fix id2label, or heads='drop')")
        seen[name] = i


def _base_head(base: Any, head: Sequence[str]) -> Any:
    """The base model, checked to have a head with labels (heads="base")."""
    if base is None:
        raise IncompatibleCheckpointsError("heads: 'base' needs a base_model")
    lacking = [t for t in head if t not in base.tensors]
    if lacking or labels_of(base.config) is None:
        raise IncompatibleCheckpointsError(f"heads='base': the base model {base.name!r} has no head to take (it lacks "
                                           f"{lacking[0] if lacking else 'id2label'!r}); choose another heads= value")
    return base


def _take_head(out: RowAlignment, donor: Any, names: Sequence[str], tensors: Sequence[str]) -> None:
    """Head tensors without a label dimension, taken whole from ``donor`` (its rows by position)."""
    for t in tensors:
        n_rows = donor.tensors[t].shape[0]
        ident = {str(i): i for i in range(n_rows)}
        out.maps[f"head:{t}"] = match_rows(f"head:{t}", ident, n_rows,
                                           {n: (ident if n == donor.name else {}) for n in names},
                                           {n: n_rows for n in names})
        out.tensors[t] = f"head:{t}"


def _prefixed_share(names: Sequence[str], prefix: str) -> float:
    return sum(1 for n in names if n.startswith(prefix + ".")) / max(1, len(names))


def prefix_renames(headers: Sequence[Any], prefix: str) -> Tuple[Dict[str, Dict[str, str]], List[str]]:
    """Names that differ only by ``base_model_prefix`` (a headless body beside headed fine-tunes, or
    the other way round), aligned to the first header's layout as transformers aligns them on load:
    {model: {name in its file: name in the merge}} (tensors left out are dropped) and notes."""
    if not prefix:
        return {}, []
    ref = set(headers[0].tensors)
    ref_headed = _prefixed_share(list(ref), prefix) > 0.5
    renames: Dict[str, Dict[str, str]] = {}
    notes: List[str] = []
    for h in headers[1:]:
        names = list(h.tensors)
        if set(names) == ref or (_prefixed_share(names, prefix) > 0.5) == ref_headed:
            continue
        lead = prefix + "."
        mapping = ({n: lead + n for n in names} if ref_headed else
                   {n: n[len(lead):] for n in names if n.startswith(lead)})
        dropped = sorted(n for n, m in mapping.items() if m not in ref) + sorted(n for n in names if n not in mapping)
        renames[h.name] = {n: m for n, m in mapping.items() if m in ref}
        notes.append(f"{h.name!r} is saved {'headless' if ref_headed else 'with a head'}: its names aligned by the "
                     f"prefix {prefix!r}" + (f"; left out: {', '.join(dropped)}" if dropped else ""))
    return renames, notes


def drop_renames(headers: Sequence[Any], prefix: str) -> Dict[str, Dict[str, str]]:
    """heads="drop": every model keyed as the headless body (``prefix.`` stripped, the head left out)."""
    if not prefix:
        raise IncompatibleCheckpointsError("heads='drop': this architecture has no base_model_prefix, so its head "
                                           "cannot be told from its body")
    lead = prefix + "."
    return {h.name: {n: n[len(lead):] for n in h.tensors if n.startswith(lead)} for h in headers}
