"""Reading checkpoints as transformers does (issue 19, first items): the config's dtype, BatchNorm
step counters, what the summary says."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import read_state
from hf_ame import AMEConfig, merge_checkpoints
from hf_ame.testing import make_family


def test_output_dtype_comes_from_the_config_not_the_first_tensor(tmp_path):
    paths = make_family("llama", tmp_path / "f", 2, seed=1, dtype=torch.bfloat16)
    for p in paths:  # a bf16 model keeping one tensor in float32 (as routers and T5's wo are)
        f = Path(p) / "model.safetensors"
        sd = load_file(f)
        sd["model.norm.weight"] = sd["model.norm.weight"].float()
        save_file(sd, f, metadata={"format": "pt"})
        raw = f.read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        assert header[[k for k in header if k != "__metadata__"][0]]["dtype"] == "F32"  # safetensors lists it first
    rep = merge_checkpoints(paths, tmp_path / "o", AMEConfig.soup(), progress=False)
    cfg = json.loads((tmp_path / "o/config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and rep.dtype == "bfloat16"
    out = read_state(tmp_path / "o")
    assert out["model.norm.weight"].dtype == torch.float32  # kept in its own dtype
    assert out["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert "the exact uniform soup (one pass)" in rep.summary() and "steps per tensor" not in rep.summary()


def test_batchnorm_counters_take_the_maximum(tmp_path):
    paths = make_family("llama", tmp_path / "f", 3, seed=1)
    for i, p in enumerate(paths):  # a BatchNorm-style step counter: fine-tunes trained 10, 30, 20 steps
        f = Path(p) / "model.safetensors"
        sd = load_file(f)
        sd["model.bn.num_batches_tracked"] = torch.tensor(10 * [1, 3, 2][i])
        sd["model.other_counter"] = torch.tensor(5)
        save_file(sd, f, metadata={"format": "pt"})
    rep = merge_checkpoints(paths, tmp_path / "o", AMEConfig.soup(), progress=False)
    assert read_state(tmp_path / "o")["model.bn.num_batches_tracked"].item() == 30
    assert rep.counters_maxed == ["model.bn.num_batches_tracked"]
    sd = load_file(Path(paths[2]) / "model.safetensors")
    sd["model.other_counter"] = torch.tensor(6)
    save_file(sd, Path(paths[2]) / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.other_counter' .* differs between .* integer buffers cannot be averaged"):
        merge_checkpoints(paths, tmp_path / "o2", AMEConfig.soup(), progress=False)
