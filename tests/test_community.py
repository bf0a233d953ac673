"""Community fine-tunes as they come: mixed storage dtypes, non-finite values."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import read_state
from hf_ame import AMEConfig, AMEMerger, NonFiniteWeightsError, merge_checkpoints
from hf_ame.cli import main
from hf_ame.testing import make_family

DTYPES = (torch.bfloat16, torch.float32, torch.float16)


@pytest.fixture
def mixed(tmp_path):
    """ft-0 saved in bf16, ft-1 in fp32, ft-2 in fp16 (one init, three perturbations); and the
    same three values saved in fp32 (exact upcasts) for reference."""
    picks = [make_family("llama", tmp_path / str(dt).split(".")[1], 3, seed=6, dtype=dt)[i] for i, dt in enumerate(DTYPES)]
    exact = []
    for i, p in enumerate(picks):
        dst = tmp_path / f"fp32-{i}"
        dst.mkdir()
        for f in p.iterdir():
            if f.suffix == ".safetensors":
                save_file({k: v.float() if v.is_floating_point() else v for k, v in load_file(f).items()}, dst / f.name,
                          metadata={"format": "pt"})
            else:
                (dst / f.name).write_bytes(f.read_bytes())
        exact.append(dst)
    return [str(p) for p in picks], [str(p) for p in exact]


@pytest.mark.parametrize("stream", ["auto", "tensor"])
def test_mixed_dtypes_merge_as_their_values(mixed, tmp_path, stream):
    picks, exact = mixed
    cfg = AMEConfig(optimizer="adamw", lr=1e-2, epochs=2)
    merge_checkpoints(picks, tmp_path / "mixed", cfg, dtype="float32", stream=stream, progress=False)
    merge_checkpoints(exact, tmp_path / "exact", cfg, dtype="float32", stream=stream, progress=False)
    a, b = read_state(tmp_path / "mixed"), read_state(tmp_path / "exact")
    assert all(torch.equal(a[k], b[k]) for k in b)  # the merge sees each stored value exactly
    # output dtype: the first ingredient's unless dtype= says otherwise
    rep = merge_checkpoints(picks, tmp_path / "soup", AMEConfig.soup(), stream=stream, progress=False)
    soup = read_state(tmp_path / "soup")
    states = [read_state(p) for p in picks]
    assert rep.dtype == "bfloat16"
    for k, v in soup.items():
        if v.is_floating_point():
            assert v.dtype == torch.bfloat16
            mean = torch.stack([s[k].float() for s in states]).mean(0)
            torch.testing.assert_close(v.float(), mean, atol=0, rtol=2**-8)


def test_card_lists_each_ingredients_dtype(mixed, tmp_path):
    picks, _ = mixed
    result = AMEMerger.from_pretrained(picks, device_map="cpu").merge(AMEConfig.soup(), output_dir=tmp_path / "o",
                                                                     progress=False)
    assert [i.dtype for i in result.ingredients] == ["bfloat16", "float32", "float16"]
    card = (tmp_path / "o/README.md").read_text()
    assert "| bfloat16 |" in card and "| float32 |" in card and "| float16 |" in card


def test_integer_and_float_copies_still_refused(mixed, tmp_path):
    picks, _ = mixed
    f = Path(picks[1]) / "model.safetensors"
    sd = load_file(f)
    k = next(iter(sd))
    sd[k] = sd[k].to(torch.int32)
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor '{k}' has dtype int32"):
        merge_checkpoints(picks, tmp_path / "o", AMEConfig.soup(), progress=False)


def _poison(folder, value, name="model.layers.0.mlp.up_proj.weight"):
    f = Path(folder) / "model.safetensors"
    sd = load_file(f)
    sd[name].view(-1)[17] = value
    save_file(sd, f, metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("cfg,stream,block", [
    (AMEConfig.soup(), "auto", None), (AMEConfig(optimizer="adamw", lr=1e-3), "auto", 64),
    (AMEConfig(optimizer="adamw", lr=1e-3), "tensor", None), (AMEConfig(optimizer="sgd", lr=0.5), "ingredient", None),
], ids=["soup-streamed", "adamw-blocks", "adamw-tensor", "sgd-row"])
def test_non_finite_ingredient_stops_the_merge(tmp_path, value, cfg, stream, block):
    paths = [str(p) for p in make_family("llama", tmp_path / "f", 3, seed=2)]
    name = _poison(paths[1], value)
    kw = {"block_size": block} if block else {}
    with pytest.raises(NonFiniteWeightsError, match=rf"model '.*ft-1' has NaN or Inf values in tensor '{name}'") as err:
        merge_checkpoints(paths, tmp_path / "o", cfg, stream=stream, progress=False, **kw)
    assert err.value.models == [paths[1]] and err.value.tensor == name
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if ".hf_ame-" in p.name]


def test_non_finite_via_cli_and_overflow_of_the_merge(tmp_path, capsys):
    paths = [str(p) for p in make_family("llama", tmp_path / "f", 3, seed=2)]
    _poison(paths[2], float("nan"))
    assert main(["merge", *paths, "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "ft-2' has NaN or Inf values in tensor" in err and err.count("\n") == 1
    clean = [str(p) for p in make_family("llama", tmp_path / "g", 3, seed=2)]
    # finite inputs, but SGD with lr 1e7 against a fixed pivot leaves float16's range
    with pytest.raises(NonFiniteWeightsError, match=r"the merge produced NaN or Inf values from finite ingredients"):
        merge_checkpoints(clean, tmp_path / "o2", AMEConfig(optimizer="sgd", lr=1e7, adaptive_pivot=False, pivot="first"),
                          dtype="float16", progress=False)
    assert not (tmp_path / "o2").exists()
    # a soup has no learning rate to blame: finite float32 values beyond float16's range
    from safetensors.torch import load_file, save_file

    big = make_family("llama", tmp_path / "h", 2, seed=3, noise=0.0)
    for p in big:
        f = p / "model.safetensors"
        save_file({k: v * 1e5 if v.is_floating_point() else v for k, v in load_file(f).items()}, f,
                  metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeightsError, match=r"the average of finite ingredients is NaN or Inf in the output "
                                                    r"dtype") as info:
        merge_checkpoints(big, tmp_path / "o3", AMEConfig.soup(), dtype="float16", progress=False)
    assert "learning rate" not in str(info.value) and not (tmp_path / "o3").exists()
