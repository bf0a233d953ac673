"""The Run and Result tabs' contents: the scored search trials as a table, and a finished merge's
result shown (scores, chart, card, recipe, where it is, a zip of a small one)."""
from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import gradio as gr

from .card import CHART_FILE
from .recipe import RECIPE_FILE
from .result import MergeResult
from .ui_form import field_text
from .ui_job import Session

ZIP_LIMIT = 256 * 2 ** 20  # outputs up to this size are offered as a zip download


def result_view(c: Mapping[str, Any], s: Session) -> Dict[Any, Any]:
    """The Result tab's components (``c``: every component by name) for the merge in ``s``: scores,
    chart, card, recipe, where the merge is (a zip of a small one), ready to push."""
    r = s.result
    folder = Path(r.output_dir)
    recipe_text = (folder / RECIPE_FILE).read_text() if (folder / RECIPE_FILE).is_file() else ""
    card = (folder / "README.md").read_text() if (folder / "README.md").is_file() else ""
    chart = folder / CHART_FILE
    svg = f"data:image/svg+xml;base64,{base64.b64encode(chart.read_bytes()).decode()}" if chart.is_file() else ""
    img = f'<img alt="scores" style="max-width:560px" src="{svg}">' if svg else ""
    where = (f"Temporary folder `{folder}`: removed when you run another merge or stop `hf-ame ui`; download it "
             "as a zip or push it." if r.is_temporary else f"Saved to `{folder}`.")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    zipped = None
    if size <= ZIP_LIMIT:
        zipped = shutil.make_archive(str(s.dir / "zip" / folder.name), "zip", root_dir=folder)
    metric = (r.metric or {}).get("name")
    return {c["folder"]: where + f" {size / 2 ** 20:.1f} MiB.",
            c["zip"]: gr.update(value=zipped, visible=bool(zipped)),
            c["scores"]: gr.update(value=score_rows(r), label=f"scores ({metric})" if metric else "scores"),
            c["chart"]: img, c["card"]: card_body(card, svg), c["result_recipe"]: recipe_text,
            c["download_result_recipe"]: gr.update(value=str(s.file(RECIPE_FILE, recipe_text, sub="result")),
                                                   visible=bool(recipe_text))}


def trial_rows(trials: Sequence[Mapping[str, Any]]) -> List[List[Any]]:
    """The search trials table: each scored trial, its settings as the form shows them, its score."""
    return [[t["trial"], field_text(t["params"]), t["score"]] for t in trials]


def score_rows(r: MergeResult) -> List[List[Any]]:
    """Every ingredient's score, order and use, then the merge's (and the soup's, when compared)."""
    rows: List[List[Any]] = [[f"{Path(i.id).name} (local)" if i.local else i.id, i.score, i.order,
                              "yes" if i.kept else "no"] for i in r.ingredients]  # named as the card names them
    if r.scores:
        rows.append(["merged (this merge)", r.scores.get("merged"), None, ""])
        if "soup" in r.scores:
            rows.append(["uniform soup", r.scores["soup"], None, ""])
    return rows


def card_body(card: str, chart: str) -> str:
    """The card as the Hub renders it: its body (the YAML metadata block is for the Hub), the chart inline."""
    m = re.match(r"^---\n.*?\n---\n", card, re.S)
    body = card[m.end():] if m else card
    return body.replace(f"({CHART_FILE})", f"({chart})") if chart else body
