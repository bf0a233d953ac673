"""The model card of a merge: metadata through huggingface_hub's ModelCard / ModelCardData, a body
rendered from ``model_cards/ame_model_card.md``, and a bar chart of the scores (SVG, no plotting
dependency)."""
from __future__ import annotations

import html
from pathlib import Path
from importlib.metadata import version as package_version
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .methods import get_method
from .optimizers import get_optimizer
from .tasks import pipeline_tag_for
from .version import __version__

__all__ = ["render_card", "scores_svg", "TEMPLATE", "CHART_FILE"]

TEMPLATE = Path(__file__).parent / "templates" / "ame_model_card.md"
CHART_FILE = "ame_scores.svg"

def scores_svg(rows: Sequence[Tuple[str, float]], metric: str, greater_is_better: bool = True) -> str:
    """A horizontal bar chart (SVG text) of (label, score) rows."""
    width, bar_h, gap, left, right = 640, 22, 8, 260, 70
    height = 40 + len(rows) * (bar_h + gap)
    vmax = max((abs(v) for _, v in rows), default=1.0) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             'font-family="sans-serif" font-size="13">',
             f'<text x="{left}" y="20" font-weight="bold">{html.escape(metric)}'
             f'{" (lower is better)" if not greater_is_better else ""}</text>']
    for k, (label, value) in enumerate(rows):
        y = 32 + k * (bar_h + gap)
        w = max(1.0, (width - left - right) * abs(value) / vmax)
        color = "#ff9d00" if label.startswith(("merged", "AME")) else "#4f7fd9"
        parts.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{html.escape(label[:36])}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>')
        parts.append(f'<text x="{left + w + 6:.1f}" y="{y + 15}">{value:.4g}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def render_card(*, config: Dict[str, Any], ingredients: List[Dict[str, Any]], model_config: Dict[str, Any],
                recipe_yaml: str, scores: Optional[Dict[str, Any]] = None, metric: Optional[Dict[str, Any]] = None,
                dataset: Optional[Dict[str, Any]] = None, greedy: Optional[str] = None,
                greedy_log: Optional[List[Dict[str, Any]]] = None, dtype: str = "", parameters: int = 0,
                seconds: float = 0.0, repo_id: Optional[str] = None, reproduce: Optional[str] = None,
                mergekit_config: Optional[str] = None, alignment: Sequence[str] = (),
                search: Optional[Dict[str, Any]] = None, warnings: Sequence[str] = ()):
    """Returns (huggingface_hub.ModelCard, svg text or None). ``alignment``: notes on rows matched
    by token or label and on config choices (:class:`~hf_ame.rows.RowAlignment`); ``warnings``: what
    the merge warned about (tensors returned unchanged, config keys ignored)."""
    # huggingface_hub's card classes pull its HTTP stack (~8 MiB, 190 modules): imported when a card is made
    from huggingface_hub import ModelCard
    archs = model_config.get("architectures") or []
    optimizer = config["optimizer"]
    name = repo_id.split("/")[-1] if repo_id else "ame-merge"
    scores = scores or {}
    metric_name = (metric or {}).get("name")
    gib = (metric or {}).get("greater_is_better", True)
    ds_path = (dataset or {}).get("path")
    table, chart_rows = _score_rows(scores, ingredients, greedy, optimizer)
    chart_rows += _search_chart(search)
    svg = scores_svg(chart_rows, metric_name, gib) if (metric_name and chart_rows) else None
    ds_text = (f"`{ds_path}`" + (f" split `{dataset.get('split')}`" if dataset and dataset.get("split") else "")
               if ds_path else "a held-out split")
    card = ModelCard.from_template(
        _card_data(ingredients, archs, optimizer, name, scores, metric_name, dataset, greedy),
        template_path=str(TEMPLATE),
        model_name=name,
        n_kept=sum(1 for i in ingredients if i.get("kept", True)),
        architecture=archs[0] if archs else model_config.get("model_type", "model"),
        method="greedy soup" if greedy == "soup" else (f"{config['method']}, " if config.get("method") else "")
        + f"{optimizer}{', greedy' if greedy == 'ame' else ''}",
        method_text=_method_text(config),
        optimizer_class=get_optimizer(optimizer).cls.__name__,
        ingredients=_ingredient_rows(ingredients),
        metric_name=metric_name,
        greater_is_better=gib,
        dataset_text=ds_text,
        scores_table=table,
        chart_file=CHART_FILE,
        greedy_text=_greedy_text(greedy, greedy_log),
        hyperparameters=[(k, _fmt(v)) for k, v in config.items()],
        dtype=dtype,
        compute_dtype=config.get("compute_dtype", "float32"),
        parameters=f"{parameters:,}",
        seconds=f"{seconds:.1f}",
        hf_ame_version=__version__,
        transformers_version=package_version("transformers"),
        reproduce=reproduce or "hf-ame merge ame_recipe.yaml --out merged",
        recipe_yaml=recipe_yaml,
        mergekit_config=mergekit_config,
        alignment=list(alignment),
        merge_warnings=list(warnings),
        search_rows=_search_rows(search),
        metric_label=metric_name or "score",
    )
    return card, svg


def _search_chart(search: Optional[Dict[str, Any]]) -> List[Tuple[str, float]]:
    """The chart's bars of a validation search: trial 0 (the soup), then every AME trial."""
    out = []
    for t in (search or {}).get("trials", []):
        if t["score"] is None:
            continue
        label = ("search trial 0: soup" if isinstance(t["params"], str) else
                 f"AME trial {t['trial']}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in t["params"].items()))
        out.append((label, float(t["score"])))
    return out


def _search_rows(search: Optional[Dict[str, Any]]) -> List[Tuple[str, str, str]]:
    """(trial, settings, score) rows of a validation search, the kept one in bold."""
    rows = []
    for t in (search or {}).get("trials", []):
        params = (t["params"] if isinstance(t["params"], str)
                  else ", ".join(f"{k}={_fmt(v)}" for k, v in t["params"].items()))
        mark = "**" if t["trial"] == search["chosen"] else ""  # type: ignore[index]
        score = "-" if t["score"] is None else f"{t['score']:.4f}"
        rows.append((f"{mark}{t['trial']}{mark}", params, f"{mark}{score}{mark}"))
    return rows


def _method_text(config: Dict[str, Any]) -> Optional[str]:
    """A sentence on the merge method (mergekit's name and parameters), if one shaped the pseudogradients."""
    name = config.get("method")
    if not name:
        return None
    entry = get_method(name)
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in (config.get("method_kwargs") or {}).items()) or "its defaults"
    return (f"Each step's pseudogradient was built by the **{name}** method ({entry.description}; "
            f"{entry.reference}) with {params} (as recipes and `--param` name them: mergekit's names for "
            f"mergekit's methods).")


def _card_data(ingredients: List[Dict[str, Any]], archs: Sequence[str], optimizer: str, name: str,
               scores: Dict[str, Any], metric_name: Optional[str], dataset: Optional[Dict[str, Any]],
               greedy: Optional[str]) -> Any:
    """The card's YAML metadata (a ``huggingface_hub.ModelCardData``): base models (the Hub
    ingredients kept), tags, eval results."""
    from huggingface_hub import EvalResult, ModelCardData

    pipeline_tag = pipeline_tag_for(archs)
    hub_ids = [i["id"] for i in ingredients if i.get("kept", True) and not i.get("local")]
    ds_path = (dataset or {}).get("path")
    ds_is_hub = bool(ds_path) and not Path(str(ds_path)).exists() and str(ds_path).count("/") == 1
    eval_results = None
    if metric_name and "merged" in scores:
        eval_results = [EvalResult(task_type=pipeline_tag or "other", dataset_type=ds_path if ds_is_hub else "custom",
                                   dataset_name=((dataset or {}).get("name")
                                                 or (ds_path if ds_is_hub else "held-out split")),
                                   dataset_split=(dataset or {}).get("split"), metric_type=metric_name,
                                   metric_value=float(scores["merged"]), metric_name=metric_name)]
    tags = ["merge", "hf-ame", "ame", f"ame-{optimizer}"] + (["greedy-soup"] if greedy == "soup" else [])
    return ModelCardData(base_model=hub_ids or None, library_name="transformers", pipeline_tag=pipeline_tag, tags=tags,
                         datasets=[ds_path] if ds_is_hub else None, eval_results=eval_results,
                         model_name=name if eval_results else None, base_model_relation="merge")


def _ingredient_rows(ingredients: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for ing in sorted(ingredients, key=lambda i: (i.get("order") is None, i.get("order") or 0)):
        ident = ing["id"]
        link = f"[{ident}](https://huggingface.co/{ident})" if not ing.get("local") else f"`{Path(ident).name}` (local)"
        rev = ing.get("sha") or ing.get("revision") or ""
        rows.append({"order": ing.get("order"), "link": link, "revision_short": f"`{rev[:10]}`" if rev else "",
                     "dtype": (ing.get("dtype") or "") + (f" (GGUF `{ing['gguf_file']}`, {ing.get('quantization')})"
                                                          if ing.get("gguf_file") else ""),
                     "score_text": "" if ing.get("score") is None else f"{ing['score']:.4f}",
                     "kept": ing.get("kept", True)})
    return rows


def _score_rows(scores: Dict[str, Any], ingredients: List[Dict[str, Any]], greedy: Optional[str],
                optimizer: str) -> Tuple[List[Dict[str, str]], List[Tuple[str, float]]]:
    """The card's score table and the chart's (label, score) rows."""
    table = []
    chart_rows: List[Tuple[str, float]] = []
    if "merged" in scores:
        table.append({"label": f"**merged ({'greedy soup' if greedy == 'soup' else optimizer + '-AME'})**",
                      "value": f"{scores['merged']:.4f}"})
        chart_rows.append(("merged", float(scores["merged"])))
    if "soup" in scores:
        table.append({"label": "uniform soup of the same ingredients", "value": f"{scores['soup']:.4f}"})
        chart_rows.append(("uniform soup", float(scores["soup"])))
    best = scores.get("best_ingredient")
    if best:
        table.append({"label": "best ingredient "
                               f"({Path(best['id']).name if Path(best['id']).exists() else best['id']})",
                      "value": f"{best['score']:.4f}"})
    for ing in ingredients:
        if ing.get("score") is not None:
            chart_rows.append((Path(ing["id"]).name if ing.get("local") else ing["id"], float(ing["score"])))
    return table, chart_rows


def _greedy_text(greedy: Optional[str], greedy_log: Optional[List[Dict[str, Any]]]) -> Optional[str]:
    if not (greedy and greedy_log):
        return None
    acc = sum(1 for e in greedy_log if e.get("accepted"))
    what = "candidates" if greedy == "soup" else "steps (the first line is the starting point)"
    return (f"**Greedy {'soup' if greedy == 'soup' else 'AME'}**: {acc} of {len(greedy_log)} {what} were kept; "
            "a candidate is kept only if the held-out score strictly improves.")
