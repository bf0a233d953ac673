"""``hf-ame ui`` (issue 32): the page in a real browser (Debian's chromium, headless, driven by selenium
through chromium-driver), served on 127.0.0.1. Compose a merge of tiny local models, preview it, run it,
see its scores and card, download its recipe, push it to the test Hub server; paste one of mergekit's
example configs and get the tensors ``hf-ame merge`` gets; Cancel mid-run leaves nothing behind.

Screenshots of each step land in the pytest temporary folder (``ui-screenshots``; the path is printed);
``HF_AME_UI_SCREENSHOTS=DIR`` keeps them in DIR as well, ``HF_AME_UPDATE_DOCS=1`` refreshes docs/ui.png.
The browser tests skip, saying so, only where no chromium / chromedriver is installed."""
import base64
import os
import shutil
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from conftest import read_state
from hf_ame import ui  # gradio: in the test extra, so a missing one fails here instead of skipping
from hf_ame.cli import build_parser, main
from hf_ame.recipe import Recipe, RecipeError
from hf_ame.testing import make_family, save_word_tokenizer

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
NO_BROWSER = ("no browser: the hf-ame ui browser tests need Debian's chromium and chromium-driver "
              "(apt-get install -y chromium chromium-driver)")
DOCS_PNG = Path(__file__).resolve().parent.parent / "docs" / "ui.png"

# mergekit's examples/ties.yml (commit a6e4028 of arcee-ai/mergekit) as written; only the models are tiny local ones
MERGEKIT_TIES = """\
models:
  - model: {a}
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: {b}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: {c}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""
MERGEKIT_PASSTHROUGH = """\
slices:
  - sources:
    - model: {a}
      layer_range: [0, 2]
  - sources:
    - model: {b}
      layer_range: [1, 2]
merge_method: passthrough
dtype: float32
"""


# ------------------------------------------------------------------------------------------ no browser
def _form(recipe):
    reg = ui.Registry.read()
    return ui.form_recipe(ui.recipe_form(recipe, reg), reg, ui.Settings())


def _same_merge(a, b):
    assert [m["id"] for m in a.models] == [m["id"] for m in b.models]
    assert a.base_model == b.base_model and a.slices == b.slices and a.output == b.output
    assert a.merge.method_arguments() == b.merge.method_arguments()
    assert {k: v for k, v in a.merge.to_dict().items() if k != "method_kwargs"} == \
           {k: v for k, v in b.merge.to_dict().items() if k != "method_kwargs"}


def test_form_round_trips_recipes_and_mergekit_configs(tmp_path):
    """A recipe or mergekit config filling the form comes back as the same merge (what the page runs)."""
    names = dict(a="/m/a", b="/m/b", c="/m/c", base="/m/base")
    for text in (MERGEKIT_TIES.format(**names), MERGEKIT_PASSTHROUGH.format(**names),
                 "models: [/m/a, {id: org/b, revision: v1}, {id: /m/lora, base: /m/base}]\n"
                 "merge: {optimizer: adam, lr: 0.01, epochs: 3, batch_size: 2, optimizer_kwargs: {betas: [0.8, 0.9]},"
                 " method: dare_ties, density: 0.4}\nordering: {metric: accuracy, dataset: {path: org/ds, split: val,"
                 " name: cfg}, top_k: 2}\noutput: {dtype: bfloat16, heads: union, missing_tokens: mergekit}"):
        recipe = Recipe.from_yaml(text)
        again = _form(recipe)
        _same_merge(recipe, again)
        assert again.ordering == recipe.ordering and again.provenance == recipe.provenance
    v = ui.recipe_form(Recipe.from_yaml(MERGEKIT_TIES.format(**names)), ui.Registry.read())
    assert v["method"] == "ties" and v["steps"] == ui.ONE_SHOT
    assert v["m:density"] == '[{"gradient": [1, 0.7, 0.1]}, 0.5, 0.33]'


def test_share_safe_refuses_local_paths_code_and_oversize(tmp_path):
    """--share-safe: Hub repos only (named as a Hub recipe's refusals name them), no code, no server token."""
    reg = ui.Registry.read()
    v = ui.recipe_form(Recipe.from_yaml("models: [org/a, org/b]"), reg)
    safe = ui.Settings(share_safe=True)
    assert [m["id"] for m in ui.form_recipe(v, reg, safe).models] == ["org/a", "org/b"]
    (tmp_path / "m").mkdir()
    with pytest.raises(RecipeError, match=r"^models\[1\].id: .* is not a Hub repo id; a recipe from the Hub"):
        ui.form_recipe({**v, "models": f"org/a\n{tmp_path / 'm'}"}, reg, safe)
    with pytest.raises(RecipeError, match=r"^models\[0\].id: .*environment variable"):
        ui.form_recipe({**v, "models": "org/${HOME}\norg/b"}, reg, safe)
    with pytest.raises(RecipeError, match="metric script"):  # a metric script would run code: refused even if ticked
        ui.form_recipe({**v, "metric": "me/metric", "dataset": "org/ds", "trust_remote_code": True}, reg, safe)
    app = ui.UIApp(safe)
    try:
        assert app.load_kwargs({"trust_remote_code": True}) == {"token": False}  # no code, never the server's token
        assert app.merge_kwargs({**v, "output_dir": "/etc", "overwrite": True})["output_dir"] is None
    finally:
        app.close()


def test_header_check_names_what_differs(tmp_path):
    """The header table and its notes: what differs, with the choice that resolves it; the size cap."""
    paths = make_family("bert", tmp_path, 2, seed=1)
    make_family("bert", tmp_path / "other", 1, seed=1, num_labels=4, dtype=torch.bfloat16)
    models = "\n".join(map(str, paths + [tmp_path / "other" / "ft-0"]))
    reg = ui.Registry.read()
    v = ui.recipe_form(Recipe.from_yaml("models: [a, b]"), reg)
    rows, notes = ui.inspect_models(ui.form_recipe({**v, "models": models}, reg, ui.Settings()), ui.Settings())
    assert [r[4] for r in rows] == ["float32", "float32", "bfloat16"] and rows[2][8].count(",") == 3
    assert any(n.startswith("stored dtypes differ") for n in notes)
    assert any(n.startswith("label sets differ") for n in notes)
    with pytest.raises(ui.ConfigError, match="this shared page merges at most 0.0 GiB"):
        ui.inspect_models(Recipe.from_yaml(f"models: [{paths[0]}, {paths[1]}]"),
                          ui.Settings(share_safe=True, max_bytes=1))


def test_cli_ui_arguments_and_error_lines():
    args = build_parser().parse_args(["ui"])
    assert (args.host, args.port, args.share_safe) == ("127.0.0.1", None, False)
    args = build_parser().parse_args(["ui", "--host", "0.0.0.0", "--port", "7000", "--share-safe"])
    assert (args.host, args.port, args.share_safe) == ("0.0.0.0", 7000, True)
    assert ui.error_line(ValueError("merge.lr: bad")) == "hf-ame: error: merge.lr: bad"
    assert ui.error_line(RuntimeError("x hf_secret y"), "hf_secret") == "hf-ame: error: RuntimeError: x *** y"


# ------------------------------------------------------------------------------------------ in a browser
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """4 tiny Llamas with a word tokenizer (ft-0 the base) and a text split to score them by loss."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("ui-models")
    paths = make_family("llama", root, 4, seed=5, noise=0.05, vocab_size=64)
    for p in paths:
        save_word_tokenizer(p, 64)
    gen = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(1, 64, (12,), generator=gen)) for _ in range(16)]
    Dataset.from_dict({"text": texts}).save_to_disk(str(root / "val"))
    return paths, root / "val"


@pytest.fixture(scope="module")
def screens(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui-screenshots")
    print(f"\nhf-ame ui screenshots: {folder}")
    yield folder
    keep = os.environ.get("HF_AME_UI_SCREENSHOTS")
    if keep:
        shutil.copytree(folder, keep, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page served on 127.0.0.1 and a headless chromium (downloads into a folder of its own)."""
    if not (CHROMIUM and DRIVER):
        pytest.skip(NO_BROWSER)
    from selenium import webdriver  # the test extra's: only the browser itself may be missing
    app = ui.serve("127.0.0.1", ui.free_port(), block=False, quiet=True)
    assert app.url.startswith("http://127.0.0.1:")
    downloads = tmp_path_factory.mktemp("ui-downloads")
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    # chromium leaves its singleton socket folder (org.chromium.Chromium.*) in TMPDIR: keep it in ours
    scratch = tmp_path_factory.mktemp("chromium-tmp")
    service = webdriver.ChromeService(executable_path=DRIVER, env={**os.environ, "TMPDIR": str(scratch)})
    driver = webdriver.Chrome(service=service, options=opts)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield Page(driver, app, downloads)
    finally:
        driver.quit()
        app.close()


class Page:
    """The page as a person uses it: fields by name, buttons, tabs, screenshots."""

    def __init__(self, driver, app, downloads):
        from selenium.webdriver.common.by import By

        self.d, self.app, self.downloads, self.By = driver, app, downloads, By
        self.shots = 0

    def open(self):
        self.d.get(self.app.url)
        self.wait(lambda d: self.field("models").is_displayed())
        self.wait(lambda d: "models: expected a non-empty list" in self.value("compose-status"))

    def wait(self, cond, timeout=60):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.d, timeout, poll_frequency=0.1).until(cond)

    def field(self, key):
        return self.d.find_element(self.By.CSS_SELECTOR, f"#ui-{key} textarea, #ui-{key} input")

    def shown(self, key):
        """Whether the field is on the page (Gradio leaves hidden ones out of the document)."""
        return any(e.is_displayed() for e in self.d.find_elements(self.By.ID, f"ui-{key}"))

    def value(self, key):
        return self.field(key).get_attribute("value") or ""

    def text(self, key):
        return self.d.find_element(self.By.ID, f"ui-{key}").text

    def type(self, key, text):
        from selenium.webdriver.common.keys import Keys

        el = self.field(key)
        el.send_keys(Keys.CONTROL, "a")
        el.send_keys(Keys.DELETE)
        el.send_keys(text)

    def paste(self, key, text):
        """A paste: the whole text at once, as the clipboard puts it."""
        self.d.execute_script("const el = arguments[0]; el.value = arguments[1];"
                              "el.dispatchEvent(new Event('input', {bubbles: true}));", self.field(key), text)

    def click(self, key):
        self.d.find_element(self.By.ID, f"ui-{key}").click()

    def pick(self, key, option):
        self.field(key).click()
        self.wait(lambda d: d.find_elements(self.By.CSS_SELECTOR, f"[role=option][aria-label='{option}']"))
        self.d.find_element(self.By.CSS_SELECTOR, f"[role=option][aria-label='{option}']").click()

    def tab(self, tab_id):
        self.d.find_element(self.By.ID, f"ui-tab-{tab_id}-button").click()

    def open_section(self, key, inside):
        self.d.find_element(self.By.CSS_SELECTOR, f"#ui-{key} button.label-wrap").click()
        self.wait(lambda d: self.shown(inside))

    def shot(self, folder, name, docs=False):
        """A screenshot of the whole page (not only the window); ``docs``: the window, for docs/ui.png."""
        self.shots += 1
        if docs:
            path = folder / f"{self.shots:02d}-{name}.png"
            self.d.save_screenshot(str(path))
            if os.environ.get("HF_AME_UPDATE_DOCS"):
                shutil.copy(path, DOCS_PNG)
            return path
        size = self.d.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        png = self.d.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                                "clip": clip})
        path = folder / f"{self.shots:02d}-{name}.png"
        path.write_bytes(base64.b64decode(png["data"]))
        return path

    def downloaded(self, name, timeout=30):
        path = self.downloads / name
        self.wait(lambda d: path.is_file() and not list(self.downloads.glob("*.crdownload")), timeout)
        return path


TOKEN = "hf_uitest_" + "s3cr3t" * 4


def test_compose_preview_run_result_download_and_push(page, tiny, screens, tmp_path, online, monkeypatch):
    """The whole path through the page, every field typed as a person types it; each step a screenshot."""
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "ENDPOINT", online.endpoint)  # the push goes to the test Hub server
    monkeypatch.setenv("HF_AME_CACHE", str(tmp_path / "scores"))
    paths, val = tiny
    out = tmp_path / "merged"
    _compose(page, paths, val, out, screens)
    _preview(page, out, screens)
    _run_and_see_the_result(page, out, screens)
    _push(page, online, out, screens, tmp_path / "pushed")


def _compose(page, paths, val, out, screens):
    """Type the merge in; the method's generated fields; the live recipe, downloaded."""
    page.open()
    page.type("models", "\n".join(map(str, paths[1:])))
    page.type("base", str(paths[0]))
    page.pick("method", "ties")  # the generated parameter form: ties' own fields, at its defaults
    page.wait(lambda d: page.field("m-density").is_displayed() and page.value("m-density") == "1.0")
    assert not page.shown("m-t") and page.shown("m-weight") and not page.shown("optimizer")  # one-shot: no optimizer
    page.type("m-density", "0.7")
    page.open_section("ordering", "metric")
    page.type("metric", "loss")
    page.type("dataset", str(val))
    page.type("search", "{lr: [0.5, 1.0]}")
    page.type("output-dir", str(out))
    page.wait(lambda d: page.value("compose-status").startswith("recipe valid")
              and "density: 0.7" in page.text("recipe") and "metric: loss" in page.text("recipe"))
    assert str(out) not in page.text("recipe")  # where to write is the run's, not the recipe's
    page.shot(screens, "compose")
    page.click("download-recipe")  # the live recipe, as the file that runs
    recipe = yaml.safe_load(page.downloaded("ame_recipe.yaml").read_text())
    assert [m["id"] for m in recipe["models"]] == list(map(str, paths[1:]))
    assert recipe["base_model"]["id"] == str(paths[0])
    assert recipe["merge"]["method"] == "ties" and recipe["merge"]["method_kwargs"] == {"density": 0.7}
    assert recipe["ordering"] == {"metric": "loss", "dataset": {"path": str(val)}}


def _preview(page, out, screens):
    """Headers, checks, the dry-run plan: nothing written."""
    page.click("preview")
    page.wait(lambda d: page.value("check-status").startswith(("checks passed", "hf-ame: error")))
    assert page.value("check-status").startswith("checks passed"), page.value("check-status")
    assert "plan: merge 3 ingredients + base" in page.text("plan")
    assert "model.embed_tokens.weight" in page.text("plan-table")
    assert page.text("models-table").count("LlamaForCausalLM") == 4 and "models agree" in page.text("differences")
    assert not out.exists()
    page.shot(screens, "preview")


def _run_and_see_the_result(page, out, screens):
    """Run; the result tab: scores, card, folder, recipe, the zip; the run tab: trials and progress."""
    page.click("run")
    page.wait(lambda d: page.value("run-status").startswith(("merged in", "hf-ame: error")), 120)
    assert page.value("run-status").startswith("merged in"), page.value("run-status")
    page.wait(lambda d: "merged (this merge)" in page.text("scores") and "Ingredients" in page.text("card"))
    assert all((out / f).is_file() for f in ("model.safetensors", "README.md", "ame_scores.svg", "ame_recipe.yaml"))
    assert page.text("folder").startswith("Saved to") and str(out) in page.text("folder")
    assert "hf_ame: 1" in page.text("result-recipe")  # the recipe of the kept trial, the search in its provenance
    assert yaml.safe_load((out / "ame_recipe.yaml").read_text())["provenance"]["search"]["space"] == {"lr": [0.5, 1.0]}
    page.shot(screens, "result")
    page.click("zip")  # a small merge: the whole folder as a zip
    with zipfile.ZipFile(page.downloaded("merged.zip")) as z:
        assert z.read("model.safetensors") == (out / "model.safetensors").read_bytes()
    page.tab("run")
    trials = page.text("trials")  # trial 0 (the soup), then the grid, each with its score
    assert trials.index("uniform soup") < trials.index('{"lr": 0.5}') < trials.index('{"lr": 1.0}')
    assert "hf_ame score" in page.value("progress")
    page.shot(screens, "run")


def _push(page, online, out, screens, pushed):
    """One commit to the test Hub; the files pushed load as the local ones do; the token left nowhere."""
    from transformers import AutoModelForCausalLM

    page.tab("result")
    page.type("push-repo", "me/ui-merge")
    page.type("push-token", TOKEN)
    page.click("push")
    page.wait(lambda d: page.value("push-status").startswith(("pushed to", "hf-ame: error")), 60)
    assert page.value("push-status").startswith("pushed to me/ui-merge in one commit: "), page.value("push-status")
    repo = online.state.repos["me/ui-merge"]
    assert repo.private and len(repo.commit_log) == 2  # the server's initial commit, then ONE with everything
    sha = repo.commit_log[-1]["sha"]
    assert page.value("push-status").endswith(f"/me/ui-merge/commit/{sha}") and sha in page.text("push-link")
    page.shot(screens, "pushed")
    page.d.execute_script("window.scrollTo(0, 0)")
    page.shot(screens, "docs", docs=True)  # the window as a person sees it: scores, chart, the commit pushed
    _token_left_nowhere(page, online)
    pushed.mkdir()
    for name, data in repo.commits[sha].items():
        (pushed / name).write_bytes(data)
    assert (pushed / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    a, b = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (pushed, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _token_left_nowhere(page, online):
    """The token went to the Hub (as the Authorization header) and nowhere else: not on the page, not in
    the page's files, not in Gradio's cache."""
    assert page.value("push-token") == ""
    assert TOKEN not in page.d.page_source
    assert {r["auth"] for r in online.state.requests if r["method"] == "POST"} == {f"Bearer {TOKEN}"}
    gradio_cache = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    for folder in (page.app.root, gradio_cache):
        for f in (p for p in Path(folder).rglob("*") if p.is_file()):
            assert TOKEN.encode() not in f.read_bytes(), f


def test_pasted_mergekit_example_merges_as_the_cli(page, tiny, screens, tmp_path):
    """mergekit's ties example pasted fills the form; Run gives the tensors `hf-ame merge` gives on that file."""
    paths, _ = tiny
    text = MERGEKIT_TIES.format(a=paths[1], b=paths[2], c=paths[3], base=paths[0])
    page.open()
    page.paste("paste", text)
    page.click("load")
    page.wait(lambda d: page.value("load-status").startswith(("mergekit config loaded", "hf-ame: error")))
    assert page.value("load-status") == "mergekit config loaded into the form (3 models)"
    page.wait(lambda d: page.field("m-density").is_displayed())
    assert page.value("m-density") == '[{"gradient": [1, 0.7, 0.1]}, 0.5, 0.33]' and page.value("base") == str(paths[0])
    page.type("output-dir", str(tmp_path / "ui"))
    page.wait(lambda d: page.value("compose-status").startswith("recipe valid") and "compute_dtype: float16" in
              page.text("recipe"))
    page.shot(screens, "mergekit-config")
    page.click("run")
    page.wait(lambda d: page.value("run-status").startswith(("merged in", "hf-ame: error")), 120)
    assert page.value("run-status").startswith("merged in"), page.value("run-status")
    config = tmp_path / "ties.yml"
    config.write_text(text)
    assert main(["merge", str(config), "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    a, b = read_state(tmp_path / "ui"), read_state(tmp_path / "cli")
    assert a.keys() == b.keys() and all(a[k].dtype == torch.float16 and torch.equal(a[k], b[k]) for k in a)


def test_cancel_mid_run_leaves_nothing_behind(page, tiny, screens, tmp_path, tmp_path_factory):
    """Cancel while the merge writes: no output folder, no staging folder, no lock, no temporary folder."""
    paths, _ = tiny
    out = tmp_path / "never"
    recipe = tmp_path_factory.mktemp("upload") / "slow_recipe.yaml"  # uploaded, not pasted (tmp_path stays empty)
    recipe.write_text(yaml.safe_dump({"models": list(map(str, paths[:3])),
                                      "merge": {"optimizer": "adamw", "epochs": 10000}}))  # minutes of steps
    page.open()
    page.click("preview")  # nothing composed yet: the CLI's one-line error, on the page
    page.wait(lambda d: page.value("check-status").startswith("hf-ame: error: models: expected a non-empty list"))
    page.tab("compose")
    page.d.find_element(page.By.CSS_SELECTOR, "input[type=file]").send_keys(str(recipe))
    page.wait(lambda d: page.value("load-status").startswith(("recipe loaded", "hf-ame: error")))
    assert page.value("load-status") == "recipe loaded into the form (3 models)"
    assert "epochs: 10000" in page.value("paste")
    page.type("output-dir", str(out))
    page.wait(lambda d: page.value("compose-status").startswith("recipe valid")
              and "epochs: 10000" in page.text("recipe"))
    def scratch():  # this process's scratch folders (others may exist: a temporary result lives until exit)
        return {p for k in ("merge", "search", "soup", "greedy")
                for p in Path(tempfile.gettempdir()).glob(f"hf_ame-{k}-{os.getpid()}-*")}

    before = scratch()
    page.click("run")
    page.wait(lambda d: list(tmp_path.glob(".never.hf_ame-tmp-*")) and "hf_ame merge" in page.value("progress"), 60)
    page.shot(screens, "running")
    t0 = time.perf_counter()
    page.click("cancel")
    page.wait(lambda d: page.value("run-status").startswith("cancelled"), 60)
    page.shot(screens, "cancelled")
    assert page.value("run-status") == ("cancelled: nothing was written (no output folder, no staging or temporary "
                                        "folder left)"), page.value("run-status")
    assert time.perf_counter() - t0 < 30 and list(tmp_path.iterdir()) == []  # no output, staging folder or lock
    assert scratch() - before == set()
    assert not any(s.job.alive for s in page.app.sessions.values() if s.job is not None)


def test_hf_ame_ui_serves_on_localhost_and_ctrl_c_stops_it(tmp_path):
    """The command itself: 127.0.0.1 by default, gradio imported only by it, Ctrl-C ends it cleanly."""
    import signal
    import subprocess
    import sys
    import urllib.request

    code = "import sys, hf_ame, hf_ame.cli; sys.exit('gradio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0  # the CLI imports gradio lazily
    port = ui.free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False"}
    # a suite started in the background (`cmd &`) ignores SIGINT, and so would the command it starts (the CLI
    # keeps a signal its parent ignores): it then ran on after the Ctrl-C below (seen in session 12)
    proc = subprocess.Popen([sys.executable, "-m", "hf_ame", "ui", "--port", str(port), "--share-safe"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                config = urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5).read().decode()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.3)
        assert "Shared page" in config and "Running on local URL:  http://127.0.0.1:" in _read_until(proc, "http")
        printed: list = []  # the rest of its output, read as it comes (a full pipe would block it)
        threading.Thread(target=lambda: printed.extend(proc.stdout), daemon=True).start()
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # seen once in CI (session 12), never reproduced: say what it printed
            pytest.fail("hf-ame ui did not stop within 30 s of Ctrl-C; it printed after its URL:\n" + "".join(printed))
        assert code == 0, "".join(printed)
        assert list(tmp_path.glob("hf_ame-ui-*")) == []  # its folder removed
    finally:
        proc.kill()


def _read_until(proc, text):
    line = ""
    while text not in line:
        line = proc.stdout.readline()
        assert line, "the command ended without printing its URL"
    return line
