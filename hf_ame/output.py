"""Output folders: refuse to clobber, stage in a temporary sibling, move into place at the end."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, List, Optional, Union

import torch

__all__ = ["OutputExistsError", "check_output_dir", "staged_output", "copy_aux_files", "update_config", "AUX_SKIP"]

# Files of a reference checkpoint that are NOT copied: weights (we write our own), the old card.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf", ".onnx")
AUX_SKIP = {"README.md", ".gitattributes", "ame_recipe.yaml", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


class OutputExistsError(FileExistsError):
    """The output folder exists and overwrite was not asked for."""


def check_output_dir(out: Union[str, Path], overwrite: bool) -> Path:
    """Fail early (before any work) if ``out`` exists and ``overwrite`` is False, or if it is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder {out} already exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def staged_output(out: Union[str, Path], overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` (swap by rename, so
    the old folder is only deleted once the new one is in place); on failure it is removed and
    ``out`` is untouched."""
    out = check_output_dir(out, overwrite)
    tmp = out.parent / f".{out.name}.hf_ame-tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    check_output_dir(out, overwrite)  # someone may have created it meanwhile
    old: Optional[Path] = None
    if out.exists():
        old = out.parent / f".{out.name}.hf_ame-old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_aux_files(src: Union[str, Path], dst: Union[str, Path]) -> List[str]:
    """Copy config, tokenizer, processor and generation files (every top-level non-weight file)."""
    src, dst = Path(src), Path(dst)
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in AUX_SKIP or p.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


def update_config(folder: Union[str, Path], dtype: torch.dtype) -> None:
    """Record the merged dtype and the transformers version in config.json, as save_pretrained does."""
    path = Path(folder) / "config.json"
    if not path.exists():
        return
    cfg = json.loads(path.read_text())
    cfg.pop("torch_dtype", None)  # deprecated name; transformers 5 writes "dtype"
    cfg["dtype"] = str(dtype).replace("torch.", "")
    try:  # metadata, not an import: importing transformers costs seconds
        from importlib.metadata import version

        cfg["transformers_version"] = version("transformers")
    except Exception:  # pragma: no cover - transformers is a dependency
        pass
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
