"""The hf-ame command line."""
import subprocess
import sys

import torch

from conftest import read_state
from hf_ame.cli import main
from hf_ame import list_optimizers


def test_merge_soup_and_errors(families, tmp_path, capsys):
    paths = [str(p) for p in families["bert"]]
    rc = main(["merge", *paths, "--out", str(tmp_path / "o"), "--optimizer", "sgd", "--lr", "1", "--lr-schedule", "constant",
               "--no-adaptive-pivot", "--no-progress"])
    assert rc == 0
    assert "merged 4 ingredients" in capsys.readouterr().out
    states = [read_state(p) for p in paths]
    got = read_state(tmp_path / "o")
    for k in got:
        torch.testing.assert_close(got[k], torch.stack([s[k] for s in states]).mean(0), atol=1e-6, rtol=1e-5)
    # refuses to overwrite, names the flag
    rc = main(["merge", *paths, "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    rc = main(["merge", *paths, "--out", str(tmp_path / "o"), "--overwrite", "--no-progress", "--optimizer", "adamw",
               "--opt", "betas=[0.8,0.9]", "--opt", "weight_decay=0", "--epochs", "2", "--batch-size", "2", "--pivot", "first"])
    assert rc == 0
    rc = main(["merge", *paths, "--out", str(tmp_path / "x"), "--optimizer", "adamz"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown optimizer 'adamz'" in err and "adamw" in err
    rc = main(["merge", *paths, "--out", str(tmp_path / "x"), "--opt", "betas=[0.9,1.5]"])
    assert rc == 2 and "optimizer_kwargs.betas" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_optimizers_listing_and_help(capsys):
    assert main(["optimizers"]) == 0
    out = capsys.readouterr().out
    for name in ("sgd (alias: gd)", "adamw", "adagrad", "adadelta", "rmsprop", "adamax", "nadam", "radam"):
        assert name in out
    assert "betas=(0.9, 0.999)" in out
    assert out.count("coordinate-wise (merged in cache blocks on CPU)") == len(list_optimizers())
    res = subprocess.run([sys.executable, "-m", "hf_ame", "merge", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "examples:" in res.stdout and "--overwrite" in res.stdout
