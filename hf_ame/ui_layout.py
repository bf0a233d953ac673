"""The page's layout: every Gradio component, the four tabs, their labels and element ids.

The components go into the app's ``form`` (the fields a recipe is made from, in the order the handlers
take their values) and ``c`` (every other component by name); the method and optimizer parameter
fields are generated from the registries. What the events do is the app's (:meth:`Page.wire`).
"""
from __future__ import annotations

from typing import Any, Dict, Protocol

import gradio as gr

from .config import COMPUTE_DTYPES, AMEConfig
from .ordering import GREEDY_MODES, ORDERS
from .schedules import LR_SCHEDULES
from .ui_form import AME_STEPS, NO_METHOD, ONE_SHOT, Registry, Settings, field_text


class Page(Protocol):
    """What the layout needs of the app (:class:`hf_ame.ui.UIApp`)."""

    settings: Settings
    reg: Registry
    form: Dict[str, Any]  # field key -> component (the order of the handlers' values)
    c: Dict[str, Any]  # every other component by name

    def wire(self, demo: Any) -> None:
        """Connect every event to its handler (called inside the page's ``gr.Blocks``)."""


def _label(text: str, key: str) -> Dict[str, Any]:
    return {"label": text, "elem_id": f"ui-{key}".replace(":", "-").replace("_", "-")}


def _build_models(page: Page) -> None:
    f = page.form
    f["models"] = gr.Textbox(lines=4, placeholder="org/model  |  org/model@revision  |  ./folder  |  base+adapter",
                             info="one per line, in merge order: Hub ids (optionally @revision), folders, or "
                                  "mergekit's BASE+ADAPTER for a LoRA adapter", **_label("Ingredients", "models"))
    f["base"] = gr.Textbox(placeholder="optional: org/base-model or ./base", info="where task-vector methods measure "
                           "from; the pivot of pivot: base", **_label("Base model", "base"))


def _build_method(page: Page) -> None:
    """The method and its parameter form: one field per parameter any method declares, shown for the
    methods that have it, with that method's default and allowed values."""
    f, reg, c = page.form, page.reg, page.c
    f["method"] = gr.Dropdown([NO_METHOD] + list(reg.methods), value=NO_METHOD, **_label("Merge method", "method"))
    c["method_info"] = gr.Markdown("AME: each step's pseudogradient is the mean of (merge - ingredient), fed to the "
                                   "optimizer below.", elem_id="ui-method-info")
    with gr.Column(visible=False, variant="panel") as c["method_box"]:
        f["steps"] = gr.Radio([ONE_SHOT, AME_STEPS], value=ONE_SHOT, **_label("Steps", "steps"))
        with gr.Row(elem_classes="ui-params"):
            for name, is_bool in reg.method_params.items():
                kw = _label(name, f"m:{name}")
                f[f"m:{name}"] = (gr.Checkbox(visible=False, min_width=200, **kw) if is_bool else
                                  gr.Textbox(visible=False, min_width=200, **kw))


def _build_optimizer(page: Page) -> None:
    """AME's settings and the optimizer's keyword arguments (generated from its signature)."""
    f, reg, c, d = page.form, page.reg, page.c, AMEConfig()
    with gr.Column(visible=True, variant="panel") as c["optimizer_box"]:
        with gr.Row():
            f["optimizer"] = gr.Dropdown(list(reg.optimizers), value=d.optimizer, **_label("Optimizer", "optimizer"))
            f["lr"] = gr.Number(value=d.lr, **_label("lr", "lr"))
            f["lr_schedule"] = gr.Dropdown(list(LR_SCHEDULES), value=d.lr_schedule,
                                           **_label("lr schedule", "lr_schedule"))
            f["lr_power"] = gr.Number(value=d.lr_power, **_label("lr power", "lr_power"))
        with gr.Row():
            f["epochs"] = gr.Number(value=d.epochs, precision=0, **_label("epochs", "epochs"))
            f["batch_size"] = gr.Number(value=d.batch_size, precision=0, info="0: all ingredients in one step",
                                        **_label("batch size", "batch_size"))
            f["pivot"] = gr.Textbox(value=str(d.pivot), info="soup, first, base or an ingredient's index",
                                    **_label("pivot", "pivot"))
            f["amplification"] = gr.Textbox(value=field_text(d.amplification), info="a number or linear",
                                            **_label("amplification", "amplification"))
        with gr.Row():
            f["shuffle"] = gr.Checkbox(value=d.shuffle, **_label("shuffle", "shuffle"))
            f["adaptive_pivot"] = gr.Checkbox(value=d.adaptive_pivot, **_label("adaptive pivot", "adaptive_pivot"))
        with gr.Row(elem_classes="ui-params"):
            kw = reg.optimizers[d.optimizer]
            for name, is_bool in reg.optimizer_params.items():
                opts = dict(visible=name in kw, **_label(name, f"o:{name}"))
                f[f"o:{name}"] = (gr.Checkbox(value=bool(kw.get(name, False)), min_width=200, **opts) if is_bool else
                                  gr.Textbox(value=field_text(kw.get(name)), min_width=200,
                                             info=f"default {field_text(kw[name])}" if name in kw else None, **opts))


def _build_ordering(page: Page) -> None:
    """How ingredients are scored, ranked and kept (a recipe's ``ordering``), and a validation search."""
    f = page.form
    with gr.Accordion("Ordering and search (scores need a metric and a dataset)", open=False, elem_id="ui-ordering"):
        with gr.Row():
            f["metric"] = gr.Textbox(info="accuracy, f1, loss, perplexity, ...", **_label("metric", "metric"))
            f["dataset"] = gr.Textbox(info="Hub dataset id, builder name or a save_to_disk folder",
                                      **_label("dataset", "dataset"))
            f["split"] = gr.Textbox(**_label("split", "split"))
        with gr.Row():
            f["input_column"] = gr.Textbox(**_label("input column", "input_column"))
            f["label_column"] = gr.Textbox(**_label("label column", "label_column"))
            f["order"] = gr.Dropdown(list(ORDERS), value="best", **_label("order", "order"))
            f["top_k"] = gr.Number(value=0, precision=0, info="0: keep all", **_label("top k", "top_k"))
            f["greedy"] = gr.Dropdown(["none"] + [g for g in GREEDY_MODES if g], value="none",
                                      **_label("greedy", "greedy"))
            f["compare_soup"] = gr.Checkbox(value=False, **_label("compare with the soup", "compare_soup"))
        with gr.Row():
            f["search"] = gr.Textbox(placeholder="{lr: [0.0001, 0.001], epochs: [1, 3]}",
                                     info="AMEConfig fields to search; trial 0 is the uniform soup, the best trial "
                                          "is kept", **_label("search", "search"))
            f["n_trials"] = gr.Number(value=0, precision=0, info="0: the whole grid; N: Optuna picks N",
                                      **_label("trials", "n_trials"))


def _build_output(page: Page) -> None:
    """The recipe's ``output`` (dtype, shards, choices for models that differ), where to write, "more recipe"."""
    f, safe, d = page.form, page.settings.share_safe, AMEConfig()
    with gr.Accordion("Output and choices for models that differ", open=True, elem_id="ui-output"):
        with gr.Row():
            f["dtype"] = gr.Dropdown(["auto"] + list(COMPUTE_DTYPES), value="auto", **_label("output dtype", "dtype"))
            f["compute_dtype"] = gr.Dropdown(list(COMPUTE_DTYPES), value=d.compute_dtype,
                                             **_label("compute dtype", "compute_dtype"))
            f["seed"] = gr.Number(value=d.seed, precision=0, info="shuffles, DARE masks", **_label("seed", "seed"))
            f["max_shard_size"] = gr.Textbox(placeholder="5GB", **_label("max shard size", "max_shard_size"))
        with gr.Row():
            for key, info in (("tokenizer_source", "vocabularies differ: union, first, base or an ingredient"),
                              ("heads", "label sets differ: union, drop or an ingredient"),
                              ("config_source", "config fields differ: first, base or an ingredient"),
                              ("chat_template", "auto, a name (chatml, ...) or Jinja text")):
                f[key] = gr.Textbox(info=info, **_label(key.replace("_", " "), key))
        with gr.Row(visible=not safe):
            f["output_dir"] = gr.Textbox(info="empty: a temporary folder (zip download or push)", scale=3,
                                         **_label("output folder", "output_dir"))
            f["overwrite"] = gr.Checkbox(value=False, **_label("overwrite", "overwrite"))
            f["allow_unchanged"] = gr.Checkbox(value=False, **_label("allow unchanged", "allow_unchanged"))
            f["trust_remote_code"] = gr.Checkbox(value=False, info="the models' custom code", **_label(
                "trust remote code", "trust_remote_code"))
        f["extra"] = gr.Textbox(lines=3, info="recipe sections the form has no field for (slices:, provenance:, "
                                "output.tokens, ...): YAML, kept as they are", **_label("more recipe", "extra"))


def _build_side(page: Page) -> None:
    """Paste or upload a mergekit config or recipe; the live recipe and its download."""
    c = page.c
    c["paste"] = gr.Textbox(lines=6, placeholder="paste a mergekit_config.yml or an hf_ame recipe",
                            **_label("mergekit config or recipe", "paste"))
    with gr.Row():
        c["upload"] = gr.UploadButton("Upload a file", file_types=[".yaml", ".yml"], elem_id="ui-upload")
        c["load"] = gr.Button("Fill the form", elem_id="ui-load")
    c["load_status"] = gr.Textbox(interactive=False, **_label("", "load_status"), show_label=False)
    c["recipe"] = gr.Code(language="yaml", interactive=False, **_label("recipe (what runs)", "recipe"))
    c["compose_status"] = gr.Textbox(interactive=False, show_label=False, elem_id="ui-compose-status")
    c["download_recipe"] = gr.DownloadButton("Download the recipe", interactive=False, elem_id="ui-download-recipe")


def _build_check(page: Page) -> None:
    c = page.c
    c["check_status"] = gr.Textbox(interactive=False, show_label=False, elem_id="ui-check-status")
    c["models_table"] = gr.Dataframe(headers=["role", "model", "revision", "architecture", "dtype", "parameters",
                                              "size", "vocabulary", "labels"], interactive=False,
                                     **_label("models (from their headers)", "models_table"))
    c["differences"] = gr.Markdown(elem_id="ui-differences")
    c["plan"] = gr.Code(language=None, interactive=False, **_label("plan (dry run)", "plan"))
    c["plan_table"] = gr.Dataframe(headers=["tensor", "shape", "dtype", "transform", "reader", "device", "shard",
                                            "read bytes", "write bytes"], interactive=False, max_height=360,
                                   **_label("tensors", "plan_table"))


def _build_run(page: Page) -> None:
    c = page.c
    c["run_status"] = gr.Textbox(interactive=False, show_label=False, lines=2, elem_id="ui-run-status")
    c["progress"] = gr.Textbox(lines=6, interactive=False, **_label("progress (as the CLI shows it)", "progress"))
    c["trials"] = gr.Dataframe(headers=["trial", "settings", "score"], interactive=False,
                               **_label("search trials, as they are scored", "trials"))


def _build_result(page: Page) -> None:
    """Where the merge is, its scores and chart, Push, its recipe and its card."""
    c = page.c
    c["folder"] = gr.Markdown(elem_id="ui-folder")
    c["zip"] = gr.DownloadButton("Download the merge (zip)", visible=False, elem_id="ui-zip")
    with gr.Row():
        c["scores"] = gr.Dataframe(headers=["model", "score", "order", "used"], interactive=False,
                                   **_label("scores", "scores"))
        c["chart"] = gr.HTML(elem_id="ui-chart")
    with gr.Accordion("Push to the Hub", open=True, elem_id="ui-push-box"):
        with gr.Row():
            c["push_repo"] = gr.Textbox(placeholder="namespace/name", **_label("repo id", "push_repo"))
            c["push_private"] = gr.Checkbox(value=True, **_label("private", "push_private"))
            c["push_token"] = gr.Textbox(type="password", placeholder="hf_... (empty: your login)",
                                         info="used for this push only: never shown, logged or kept",
                                         **_label("token", "push_token"))
        c["push"] = gr.Button("Push (one commit)", variant="primary", elem_id="ui-push")
        c["push_status"] = gr.Textbox(interactive=False, show_label=False, elem_id="ui-push-status")
        c["push_link"] = gr.Markdown(elem_id="ui-push-link")
    c["result_recipe"] = gr.Code(language="yaml", interactive=False, **_label("recipe", "result_recipe"))
    c["download_result_recipe"] = gr.DownloadButton("Download the recipe", visible=False,
                                                    elem_id="ui-download-result-recipe")
    c["card"] = gr.Markdown(elem_id="ui-card")


_HEADER = ("## hf_ame: compose, check, run and publish a merge\n"
           "Compose it (or paste a mergekit config), **Check & preview** reads only headers and plans it, **Run** "
           "merges with live progress (**Cancel** leaves nothing behind), then push the result in one commit.")
_SAFE_NOTE = ("\n\n*Shared page*: Hub repos only (no local paths), no remote code, sizes capped; merges are "
              "temporary (download them as a zip or push them with your own token).")
PAGE_CSS = ("#ui-progress textarea, #ui-run-status textarea {font-family: ui-monospace, monospace; font-size: 12px}\n"
            ".ui-params .form {flex-wrap: wrap}\n"  # the generated parameter fields wrap, each at least 200 px wide
            ".ui-params .form > * {flex: 1 1 200px !important; min-width: 200px !important}")


def build_page(page: Page) -> Any:
    """The four steps as tabs under one row of actions; every handler wired by :meth:`Page.wire`."""
    c = page.c
    with gr.Blocks(title="hf_ame", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(_HEADER + (_SAFE_NOTE if page.settings.share_safe else ""))
        with gr.Row():
            c["preview"] = gr.Button("Check & preview", elem_id="ui-preview")
            c["run"] = gr.Button("Run", variant="primary", elem_id="ui-run")
            c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="ui-cancel")
        with gr.Tabs(selected="compose", elem_id="ui-tabs") as c["tabs"]:
            with gr.Tab("1. Compose", id="compose", elem_id="ui-tab-compose"):
                with gr.Row():
                    with gr.Column(scale=3):
                        for part in (_build_models, _build_method, _build_optimizer, _build_ordering, _build_output):
                            part(page)
                    with gr.Column(scale=2):
                        _build_side(page)
            for tab_id, title, part in (("check", "2. Check & preview", _build_check), ("run", "3. Run", _build_run),
                                        ("result", "4. Result", _build_result)):
                with gr.Tab(title, id=tab_id, elem_id=f"ui-tab-{tab_id}"):
                    part(page)
        page.wire(demo)
    return demo
