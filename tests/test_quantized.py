"""Quantized ingredients (issue 17 item 5): FP8 dequantized as it streams, other schemes refused."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from conftest import read_state
from hf_ame import AMEConfig, AMEMerger, Checkpoint, IncompatibleCheckpointsError, merge_checkpoints
from hf_ame.quantization import FP8Checkpoint, dequantize
from hf_ame.testing import make_family

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Q = "model.layers.0.self_attn.q_proj.weight"


def _fp8_blockwise(src, dst, block=(16, 16)):
    """Save ``src`` as transformers' fp8 does: float8_e4m3fn weights, one float32 weight_scale_inv per tile."""
    shutil.copytree(src, dst)
    state = read_state(src)
    out = {}
    for k, w in state.items():
        if k.endswith(".weight") and any(f".{n}." in k for n in LINEAR):
            r, c = w.shape
            tiles = w.float().reshape(r // block[0], block[0], c // block[1], block[1])
            scale = tiles.abs().amax(dim=(1, 3)) / 448.0
            q = (tiles / scale[:, None, :, None]).reshape(r, c).to(torch.float8_e4m3fn)
            out[k], out[k + "_scale_inv"] = q, scale
        else:
            out[k] = w
    save_file(out, Path(dst) / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((Path(dst) / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    (Path(dst) / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def _compressed_per_channel(src, dst):
    """compressed-tensors' float8: a weight_scale per output channel, and an input_scale to drop."""
    shutil.copytree(src, dst)
    state = read_state(src)
    out = {}
    for k, w in state.items():
        if k.endswith(".weight") and any(f".{n}." in k for n in LINEAR):
            scale = w.float().abs().amax(dim=1, keepdim=True) / 448.0
            out[k], out[k[:-len("weight")] + "weight_scale"] = (w.float() / scale).to(torch.float8_e4m3fn), scale
            out[k[:-len("weight")] + "input_scale"] = torch.ones(1)
        else:
            out[k] = w
    save_file(out, Path(dst) / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((Path(dst) / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized"}
    (Path(dst) / "config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    paths = make_family("llama", root / "bf16", 3, seed=8, dtype=torch.bfloat16)
    return [_fp8_blockwise(paths[0], root / "q0"), _fp8_blockwise(paths[1], root / "q1"), str(paths[2]),
            _compressed_per_channel(paths[1], root / "c1")]


def test_fp8_is_read_as_transformers_reads_it(fp8):
    ck = Checkpoint(fp8[0])
    assert isinstance(ck, FP8Checkpoint) and Q in ck.tensors and Q + "_scale_inv" not in ck.tensors
    model = AutoModelForCausalLM.from_pretrained(fp8[0])  # on CPU transformers dequantizes to bfloat16
    loaded = dict(model.named_parameters())[Q]
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(ck.get_tensor(Q).to(torch.bfloat16), loaded.detach())
    c = Checkpoint(fp8[3])
    assert not any(k.endswith(("_scale", "input_scale")) for k in c.tensors)
    raw = c.raw_tensors
    assert raw[Q].dtype == torch.float8_e4m3fn
    # per channel: within fp8's rounding of the original bf16 weights
    torch.testing.assert_close(c.get_tensor(Q), read_state(fp8[2].replace("ft-2", "ft-1"))[Q].float(), rtol=0.07, atol=1e-3)


def test_fp8_and_full_precision_merge_in_float32_and_write_plain_weights(fp8, tmp_path):
    ins = [Checkpoint(p) for p in fp8[:3]]
    AMEMerger.from_pretrained(fp8[:3]).merge(AMEConfig.soup(), output_dir=tmp_path / "m", progress=False)
    out = read_state(tmp_path / "m")
    assert not any("scale" in k for k in out) and out[Q].dtype == torch.bfloat16
    want = sum(c.get_tensor(Q).float() for c in ins) / 3
    torch.testing.assert_close(out[Q].float(), want, rtol=0, atol=float(want.abs().max()) * 2**-8)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in cfg
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    merge_checkpoints(fp8[:3], tmp_path / "f32", AMEConfig.soup(), dtype="float32", progress=False)
    torch.testing.assert_close(read_state(tmp_path / "f32")[Q], want, rtol=0, atol=1e-6)
    # AdamW through FP8 ingredients: streamed one ingredient at a time, never in byte blocks
    plan = AMEMerger.from_pretrained([fp8[0], fp8[3]]).plan(optimizer="adamw", lr=1e-3)
    assert "blocks" not in plan.counts("reader")
    AMEMerger.from_pretrained([fp8[0], fp8[3]]).merge(optimizer="adamw", lr=1e-3, output_dir=tmp_path / "a", progress=False)
    assert read_state(tmp_path / "a")[Q].dtype == torch.bfloat16
    card = (tmp_path / "m" / "README.md").read_text()
    assert "float8_e4m3fn" in card


def test_other_quantization_is_refused_by_name(fp8, tmp_path):
    gptq = tmp_path / "gptq"
    shutil.copytree(fp8[2], gptq)
    cfg = json.loads((gptq / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleCheckpointsError, match=r"gptq.*quantized \(gptq\): .*merge its unquantized original"):
        AMEMerger.from_pretrained([fp8[2], str(gptq)])
    with pytest.raises(IncompatibleCheckpointsError, match=r"quantized \(gptq\)"):
        merge_checkpoints([fp8[2], str(gptq)], tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_dequantize_partial_tiles():
    w = torch.randn(20, 40)
    s = torch.rand(2, 3) + 0.5  # tiles of 16 x 16; the last row and column tiles partial
    got = dequantize(w.to(torch.float8_e4m3fn), s, [16, 16])
    want = w.to(torch.float8_e4m3fn).float().clone()
    for i in range(2):
        for j in range(3):
            want[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16] *= s[i, j]
    assert torch.equal(got, want)
