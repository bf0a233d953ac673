import hashlib
import os
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from hf_ame.testing import make_family  # noqa: E402

# the demo and its digits fine-tunes live in examples/, beside the library, not in it
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """4 perturbed fine-tunes of one init per architecture (fp32, single-file safetensors)."""
    root = tmp_path_factory.mktemp("families")
    return {kind: make_family(kind, root / kind, 4, seed=1) for kind in ("llama", "vit", "bert")}


def read_state(folder) -> dict:
    """All tensors of a checkpoint folder (single or sharded safetensors)."""
    folder = Path(folder)
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


DIGITS_SETUP_KW = dict(n_models=4, hidden_size=48, layers=2, pretrain_epochs=40, finetune_epochs=10, finetune_lr=3e-4)


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("digits")


@pytest.fixture(scope="session")
def digits(digits_cache):
    """4 small ViTs fine-tuned on scikit-learn digits, each never seeing half of the classes,
    with the validation and test splits as datasets.Dataset (PIL images)."""
    from digits import DigitsSetup, build_digits_ingredients, digits_dataset

    paths = build_digits_ingredients(digits_cache, DigitsSetup(**DIGITS_SETUP_KW), verbose=False)
    return [str(p) for p in paths], digits_dataset("validation"), digits_dataset("test")


@pytest.fixture(scope="session")
def examples(digits_cache, tmp_path_factory):
    """The folder ${HF_AME_EXAMPLES} of the example recipes, built from the same ingredients."""
    from digits import DigitsSetup, export_examples

    folder = export_examples(tmp_path_factory.mktemp("examples"), DigitsSetup(**DIGITS_SETUP_KW), cache=digits_cache)
    os.environ["HF_AME_EXAMPLES"] = str(folder)
    return folder


@pytest.fixture
def online(monkeypatch):
    """The suite runs with HF_HUB_OFFLINE=1; Hub tests talk to their own server on 127.0.0.1."""
    import huggingface_hub.constants as C

    from hub_server import HubServer

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    with HubServer() as hub:
        yield hub


@pytest.fixture
def llamas(tmp_path_factory):
    """3 tiny Llama fine-tunes (fp32), a fresh copy per test: tests using it damage files."""
    return [str(p) for p in make_family("llama", tmp_path_factory.mktemp("llamas"), 3, seed=4)]


def tree_sha(folder) -> dict:
    """sha256 of every file under ``folder``, by relative path (inputs and old outputs unchanged)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
