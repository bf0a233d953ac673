"""``hf-ame ui``: a local web page to compose, check, preview, run and publish a merge (Gradio).

Nothing here merges, plans or checks by itself: the form becomes a recipe (the YAML shown live and
downloadable is the file that runs), :meth:`AMEMerger.from_recipe` checks it and :meth:`~AMEMerger.plan`
previews it, :meth:`~AMEMerger.merge` runs it in a worker thread whose progress bars (the CLI's) and
search trials are shown as they come, and :meth:`MergeResult.push_to_hub` publishes it in one commit.

- **Compose**: ingredients, base, method and optimizer from the registries, with a parameter form
  generated from each entry's declared parameters; ordering, search, output. A pasted or uploaded
  mergekit config or recipe fills the form; what the form has no field for stays in "more recipe".
- **Check & preview**: each model's header (dtype, vocabulary, labels, config fields that differ, with
  the choice that resolves each), then the dry-run plan. No weight is read.
- **Run / Cancel**: Cancel raises :class:`Cancelled` (a ``KeyboardInterrupt``, as SIGINT in the CLI) in
  the merge's thread, so it ends as an error does: staging and temporary folders removed, nothing left.
- **Safety**: 127.0.0.1 unless told otherwise; ``share_safe`` (a public Space) takes Hub repos only (as a
  recipe from the Hub does: no local path, no environment variable), never runs remote code, never uses
  the server's own Hub token, and caps sizes. Errors are the CLI's one-line messages.

This module is the app (each tab's state and the event handlers) and :func:`serve`; the rest is in
``ui_form`` (form values <-> recipe and merge arguments, no gradio), ``ui_checks`` (the header check),
``ui_job`` (the merge's worker thread, Cancel), ``ui_layout`` (the components) and ``ui_results``.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import gradio as gr

from .errors import ConfigError
from .errors import error_line as cli_error_line
from .merger import AMEMerger
from .methods import parameter_help
from .recipe import RECIPE_FILE, Recipe
from .scratch import scratch_dir
from .ui_checks import inspect_models
from .ui_form import (AME_STEPS, ONE_SHOT, Registry, Settings, field_text, form_recipe, load_kwargs, merge_kwargs,
                      recipe_form)
from .ui_job import Cancelled, Job, Session, leftovers_of, scratch_folders, unroute_output
from .ui_layout import PAGE_CSS, build_page
from .ui_results import result_view, trial_rows

__all__ = ["serve", "UIApp", "Settings", "Cancelled", "form_recipe", "recipe_form", "error_line"]

MAX_TEXT = 256 * 1024  # a pasted or uploaded config / recipe
_GRADIO_CACHE = os.environ.get("GRADIO_TEMP_DIR")  # the user's own choice, if any, wins over the page's folder


def error_line(exc: BaseException, secret: Optional[str] = None) -> str:
    """The CLI's one-line message for ``exc`` (``hf-ame: error: ...``), ``secret`` (a token) masked."""
    text = cli_error_line(exc)
    return text.replace(secret, "***") if secret else text


def _session_key(request: Any) -> str:
    """A browser tab's key (its Gradio session), usable as a folder name."""
    return re.sub(r"\W", "", str(getattr(request, "session_hash", None) or "default"))[:32] or "default"


class UIApp:
    """The page: built from the registries by :meth:`build`, served by :func:`serve`."""

    def __init__(self, settings: Settings = Settings()):
        self.settings = settings
        self.reg = Registry.read()
        self.form: Dict[str, Any] = {}  # field key -> component (the order of the handlers' values)
        self.c: Dict[str, Any] = {}  # every other component by name
        self.root = scratch_dir("ui")  # removed by close(), or by the next hf_ame run if this one was killed
        self.sessions: Dict[str, Session] = {}
        self.demo: Any = None
        self.url: Optional[str] = None

    # ------------------------------------------------------------------ state
    def session(self, request: gr.Request) -> Session:
        """The browser tab's session (made on its first event)."""
        key = _session_key(request)
        if key not in self.sessions:
            self.sessions[key] = Session(self.root / key)
        return self.sessions[key]

    def values(self, values: Sequence[Any]) -> Dict[str, Any]:
        """A handler's values by field key (they come in the order of ``self.form``)."""
        return dict(zip(self.form, values))

    def recipe(self, values: Sequence[Any]) -> Recipe:
        """The form's values as a validated recipe (see :func:`hf_ame.ui_form.form_recipe`)."""
        return form_recipe(self.values(values), self.reg, self.settings)

    def build(self) -> Any:
        """The Gradio page (see :func:`hf_ame.ui_layout.build_page`, which calls :meth:`wire`)."""
        self.demo = build_page(self)
        return self.demo

    def wire(self, demo: Any) -> None:
        """Every event: any field changed -> the live recipe; method / optimizer picked -> their generated
        fields; Fill the form, Check & preview, Run (streamed), Cancel (outside the queue), Push."""
        c, f, reg = self.c, self.form, self.reg
        comps = list(f.values())
        live = [c["recipe"], c["compose_status"], c["download_recipe"]]
        gr.on([x.change for x in comps], self.compose, inputs=comps, outputs=live, trigger_mode="always_last",
              show_progress="hidden")
        demo.load(self.compose, inputs=comps, outputs=live, show_progress="hidden")
        params = [f[f"m:{n}"] for n in reg.method_params]
        shown = [c["method_box"], c["optimizer_box"], c["method_info"], *params]
        f["method"].change(self.method_changed, [f["method"], f["steps"]], shown, show_progress="hidden")
        f["steps"].change(self.method_changed, [f["method"], f["steps"]], shown, show_progress="hidden")
        f["method"].input(self.method_picked, [f["method"]], [f["steps"], *params], show_progress="hidden")
        kwargs = [f[f"o:{n}"] for n in reg.optimizer_params]
        f["optimizer"].change(self.optimizer_changed, [f["optimizer"]], kwargs, show_progress="hidden")
        f["optimizer"].input(self.optimizer_picked, [f["optimizer"]], kwargs, show_progress="hidden")
        filled = comps + [c["load_status"], c["push_repo"]]
        c["load"].click(self.load, [c["paste"]], filled)
        c["upload"].upload(self.upload, [c["upload"]], filled + [c["paste"]])
        c["preview"].click(self.preview, comps, [c["tabs"], c["check_status"], c["models_table"], c["differences"],
                                                c["plan"], c["plan_table"]])
        results = [c[k] for k in ("folder", "zip", "scores", "chart", "card", "result_recipe",
                                  "download_result_recipe")]
        c["run"].click(self.run, comps, [c["tabs"], c["run_status"], c["progress"], c["trials"], *results],
                       show_progress="hidden")
        c["cancel"].click(self.cancel, None, None, queue=False)
        c["push"].click(self.push, [c["push_repo"], c["push_private"], c["push_token"]],
                        [c["push_token"], c["push_status"], c["push_link"]])
        demo.unload(self.unload)

    def unload(self, request: gr.Request) -> None:
        """A closed tab: its merge cancelled, its temporary output and files removed."""
        s = self.sessions.pop(_session_key(request), None)
        if s is None:
            return
        if s.job is not None and s.job.cancel():
            s.job.thread.join(timeout=60)
        s.drop_result()
        shutil.rmtree(s.dir, ignore_errors=True)

    def close(self) -> None:
        """Stop the server, cancel running merges, remove temporary outputs and this page's folder."""
        for s in self.sessions.values():
            if s.job is not None and s.job.cancel():
                s.job.thread.join(timeout=60)
            s.drop_result()
        if self.demo is not None:
            self.demo.close()
        shutil.rmtree(self.root, ignore_errors=True)
        unroute_output()

    # ------------------------------------------------------------------ handlers
    def compose(self, request: gr.Request, *values: Any) -> Dict[Any, Any]:
        """The live recipe: its YAML, whether it is valid, and the file the download button gives."""
        c = self.c
        try:
            text = self.recipe(values).to_yaml()
        except Exception as exc:  # noqa: BLE001 - shown as the CLI shows it
            return {c["compose_status"]: error_line(exc), c["download_recipe"]: gr.update(interactive=False)}
        path = self.session(request).file(RECIPE_FILE, text)
        return {c["recipe"]: text, c["compose_status"]: "recipe valid: check and preview it, or run it",
                c["download_recipe"]: gr.update(value=str(path), interactive=True)}

    def load(self, text: str) -> Dict[Any, Any]:
        """A pasted or uploaded mergekit config or recipe, into the form."""
        c = self.c
        try:
            if len(text or "") > MAX_TEXT:
                raise ConfigError(f"paste: {len(text):,} characters; at most {MAX_TEXT:,}")
            safe = self.settings.share_safe
            recipe = Recipe.from_yaml(text or "", base_dir=None if safe else Path.cwd(), remote=safe, source="pasted")
            v = recipe_form(recipe, self.reg)
        except Exception as exc:  # noqa: BLE001
            return {c["load_status"]: error_line(exc)}
        out: Dict[Any, Any] = {self.form[k]: val for k, val in v.items() if k in self.form}
        kind = "mergekit config" if (recipe.provenance or {}).get("mergekit_config") else "recipe"
        out[c["load_status"]] = f"{kind} loaded into the form ({len(recipe.models)} models)"
        if recipe.hub.get("repo_id"):
            out[c["push_repo"]] = recipe.hub["repo_id"]
        return out

    def upload(self, path: Optional[str]) -> Dict[Any, Any]:
        """An uploaded file: shown in the paste box and loaded into the form as a paste is."""
        if not path:
            return {}
        if os.path.getsize(path) > MAX_TEXT:
            return {self.c["load_status"]: error_line(ConfigError(f"upload: larger than {MAX_TEXT:,} bytes"))}
        text = Path(path).read_text(errors="replace")
        return {self.c["paste"]: text, **self.load(text)}

    def method_changed(self, method: str, steps: str) -> List[Any]:
        """Which generated fields a method shows (their help from the method's checks), and its steps."""
        entry = self.reg.methods.get(method)
        ups = [gr.update(visible=entry is not None), gr.update(visible=entry is None or steps == AME_STEPS)]
        ups.append(self.reg.descriptions.get(method, "") if entry is not None else "AME: each step's pseudogradient "
                   "is the mean of (merge - ingredient), fed to the optimizer below.")
        for name in self.reg.method_params:
            shown = entry is not None and name in entry
            info = parameter_help(method, name) if shown else None
            ups.append(gr.update(visible=shown, info=info))
        return ups

    def method_picked(self, method: str) -> List[Any]:
        """A method the user picked: its parameters at their defaults, one-shot first."""
        defaults = self.reg.methods.get(method, {})
        ups = [gr.update(value=ONE_SHOT if method in self.reg.methods else AME_STEPS)]
        for name, is_bool in self.reg.method_params.items():
            d = defaults.get(name)
            ups.append(gr.update(value=d if isinstance(d, bool) else (False if is_bool else field_text(d))))
        return ups

    def optimizer_changed(self, name: str) -> List[Any]:
        """Which generated keyword fields an optimizer shows, each with its default as help."""
        kw = self.reg.optimizers.get(name, {})
        return [gr.update(visible=k in kw, info=f"default {field_text(kw[k])}" if k in kw else None)
                for k in self.reg.optimizer_params]

    def optimizer_picked(self, name: str) -> List[Any]:
        """An optimizer the user picked: its keyword arguments at their defaults."""
        kw = self.reg.optimizers.get(name, {})
        return [gr.update(value=kw[k] if isinstance(kw.get(k), bool) else
                          (False if is_bool and k not in kw else field_text(kw.get(k))))
                for k, is_bool in self.reg.optimizer_params.items()]

    # ------------------------------------------------------------------ check, preview, run, push
    def load_kwargs(self, v: Mapping[str, Any]) -> Dict[str, Any]:
        """``from_recipe``'s arguments for these form values (see :func:`hf_ame.ui_form.load_kwargs`)."""
        return load_kwargs(v, self.settings)

    def merge_kwargs(self, v: Mapping[str, Any]) -> Dict[str, Any]:
        """``merge()``'s arguments for these form values (see :func:`hf_ame.ui_form.merge_kwargs`)."""
        return merge_kwargs(v, self.settings)

    def merger(self, recipe: Recipe, v: Mapping[str, Any], session: Session) -> AMEMerger:
        """The recipe's merger, read from the file the page shows (checks from the headers first)."""
        path = session.file(RECIPE_FILE, recipe.to_yaml(), sub="run")
        return AMEMerger.from_recipe(str(path), **self.load_kwargs(v))

    def preview(self, request: gr.Request, *values: Any) -> Dict[Any, Any]:
        """Headers (what differs), then the checks and the dry-run plan: no weight read, nothing written."""
        c = self.c
        out: Dict[Any, Any] = {c["tabs"]: gr.Tabs(selected="check"), c["plan"]: "", c["plan_table"]: []}
        try:
            v = self.values(values)
            recipe = self.recipe(values)
            rows, notes = inspect_models(recipe, self.settings)
        except Exception as exc:  # noqa: BLE001
            return {**out, c["check_status"]: error_line(exc), c["models_table"]: [], c["differences"]: ""}
        out.update({c["models_table"]: rows, c["differences"]: "\n".join(f"- {n}" for n in notes)})
        try:
            plan = self.merger(recipe, v, self.session(request)).plan(**self.merge_kwargs(v))
        except Exception as exc:  # noqa: BLE001 - an incompatibility: named as the CLI names it
            return {**out, c["check_status"]: error_line(exc)}
        rows = [[t.name, str(list(t.shape)), t.dtype, t.transform, t.reader, t.device, t.shard, t.read_bytes,
                 t.write_bytes] for t in plan.mine()[:5000]]
        return {**out, c["check_status"]: "checks passed: the models can be merged as composed; the plan below is "
                "what Run reads, writes and holds", c["plan"]: plan.summary(), c["plan_table"]: rows}

    def run(self, request: gr.Request, *values: Any) -> Iterator[Dict[Any, Any]]:
        """Merge in a worker thread; its progress bars and search trials shown as they come."""
        c, s = self.c, self.session(request)
        if s.job is not None and s.job.alive:
            yield {c["run_status"]: "a merge is already running on this page: cancel it first"}
            return
        try:
            v = self.values(values)
            recipe = self.recipe(values)
            if self.settings.share_safe:
                inspect_models(recipe, self.settings)  # the caps, before anything is downloaded
            kw, load = self.merge_kwargs(v), self.load_kwargs(v)
            path = s.file(RECIPE_FILE, recipe.to_yaml(), sub="run")
        except Exception as exc:  # noqa: BLE001
            yield {c["tabs"]: gr.Tabs(selected="run"), c["run_status"]: error_line(exc)}
            return
        s.drop_result()
        out = Path(kw["output_dir"]) if kw["output_dir"] else None
        before = (out is not None and out.exists(), scratch_folders())  # what a cancel may not take for its leftovers
        t0 = time.perf_counter()
        s.job = job = Job(lambda: AMEMerger.from_recipe(str(path), **load).merge(**kw)).start()
        yield {c["tabs"]: gr.Tabs(selected="run"), c["run_status"]: "running", c["progress"]: "", c["trials"]: []}
        while job.alive:
            time.sleep(0.25)
            status = "cancelling: the merge stops at its next step" if job.cancelled else \
                f"running ({time.perf_counter() - t0:.0f} s)"
            yield {c["run_status"]: status, c["progress"]: job.progress(), c["trials"]: trial_rows(job.trials)}
        yield self.finished(s, job, out, before, time.perf_counter() - t0)

    def finished(self, s: Session, job: Job, out: Optional[Path], before: Tuple[bool, set],
                 seconds: float) -> Dict[Any, Any]:
        """The run's end: the result, or what a cancel left behind (nothing, checked), or the error line."""
        c = self.c
        done = {c["progress"]: job.progress(), c["trials"]: trial_rows(job.trials)}
        if job.result is not None:
            s.result = job.result
            return {**done, **result_view(c, s), c["tabs"]: gr.Tabs(selected="result"),
                    c["run_status"]: f"merged in {seconds:.1f} s: " + " ".join(job.result.report.summary().split())}
        if isinstance(job.error, Cancelled):
            left = leftovers_of(out, *before)
            msg = ("cancelled: nothing was written (no output folder, no staging or temporary folder left)" if not left
                   else f"cancelled; left behind: {', '.join(left)}")
            return {**done, c["run_status"]: msg}
        return {**done, c["run_status"]: error_line(job.error or RuntimeError("the merge ended without a result"))}

    def cancel(self, request: gr.Request) -> None:
        """Cancel this page's merge (the run's status says when it has stopped and what is left)."""
        s = self.session(request)
        if s.job is not None:
            s.job.cancel()

    def push(self, request: gr.Request, repo: str, private: bool, token: str) -> Dict[Any, Any]:
        """One commit to the repo typed; the token is used for this call only: never shown, logged or kept."""
        c, s = self.c, self.session(request)
        token = (token or "").strip() or None
        cleared = {c["push_token"]: ""}
        try:
            if s.result is None:
                raise ConfigError("push: run a merge first")
            if self.settings.share_safe and token is None:
                raise ConfigError("push: type your Hub token (a shared page never uses the server's own)")
            from huggingface_hub.utils import validate_repo_id

            repo = (repo or "").strip()
            validate_repo_id(repo)
            info = s.result.push_to_hub(repo, private=bool(private), token=token)
        except Exception as exc:  # noqa: BLE001
            return {**cleared, c["push_status"]: error_line(exc, token), c["push_link"]: ""}
        url = str(getattr(info, "commit_url", info))
        return {**cleared, c["push_status"]: f"pushed to {repo} in one commit: {url}",
                c["push_link"]: f"[{url}]({url})"}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(host: str = "127.0.0.1", port: Optional[int] = None, share_safe: bool = False, *, block: bool = True,
          quiet: bool = False) -> UIApp:
    """Serve the page on ``host:port`` (127.0.0.1 unless told otherwise; port: Gradio's 7860 or the next
    free one). ``block``: until Ctrl-C (or SIGTERM), then close; else return the running :class:`UIApp`
    (``.url``, ``.close()``)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = UIApp(Settings(share_safe=share_safe))
    # Gradio's copies of the files it serves (recipes, zips, uploads): in the page's folder, removed with it
    os.environ["GRADIO_TEMP_DIR"] = _GRADIO_CACHE or str(app.root / "gradio")
    try:
        _launch(app, host, port, quiet)
    except BaseException as exc:
        app.close()
        if block and isinstance(exc, KeyboardInterrupt):  # Ctrl-C while starting: the same clean stop
            return app
        raise
    if not block:
        return app
    try:
        app.demo.block_thread()  # until Ctrl-C (or, through the CLI, SIGTERM)
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return app


def _launch(app: UIApp, host: str, port: Optional[int], quiet: bool) -> None:
    demo = app.build()
    demo.queue(default_concurrency_limit=1)  # one merge at a time: it takes the cores
    # system fonts: the page asks nothing of the internet; no run history: the browser would keep every input
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    _, app.url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=quiet,
                                ssr_mode=False, run_history=False, footer_links=[], show_error=False,
                                max_file_size=MAX_TEXT if app.settings.share_safe else None, theme=theme, css=PAGE_CSS)
