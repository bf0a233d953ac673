import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from hf_ame.testing import make_family  # noqa: E402


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
