"""Output folders: refuse to clobber, stage in a temporary sibling, move into place at the end.

Writers of one target take a lock file beside it (``.NAME.hf_ame-lock``, removed on release), so
two merges into one folder run one after the other. Holding the lock, a writer knows any
``.NAME.hf_ame-tmp-*`` / ``-old-*`` sibling is left over from a killed run: it names and removes it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
import warnings
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Union

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; writers are not serialised there
    fcntl = None

import torch
from .errors import CheckpointError, OutputExistsError
from .trust import checked_file, is_read_file, unsafe_reason

__all__ = ["OutputExistsError", "check_output_dir", "staged_output", "target_lock", "stale_siblings", "copy_aux_files",
           "update_config", "write_files", "write_error", "finish_output", "copy_tokenizer_files", "TOKENIZER_FILES",
           "AUX_SKIP"]

# Files of a reference checkpoint that are NOT copied: weights (we write our own), the old card.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf", ".onnx")
AUX_SKIP = {"README.md", ".gitattributes", "ame_recipe.yaml", "model.safetensors.index.json",
            "pytorch_model.bin.index.json"}


def check_output_dir(out: Union[str, Path], overwrite: bool, inputs: Iterable[Union[str, Path]] = ()) -> Path:
    """Fail early (before any work) if ``out`` exists and ``overwrite`` is False, if it is a file,
    or if it is, or contains, one of the ``inputs`` (an overwrite would delete an ingredient)."""
    out = Path(out)
    target = out.resolve()
    _refuse_cwd(out, target)
    for inp in inputs:
        src = Path(inp).resolve()
        if src == target or target in src.parents:
            raise OutputExistsError(f"output {out} {'is' if src == target else 'contains'} the input {inp}; "
                                    "write the merge somewhere else")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder {out} already exists and is not empty; "
                                "pass overwrite=True (--overwrite) to replace it")
    return out


def _refuse_cwd(out: Path, target: Path) -> None:
    """The output is staged beside it and swapped in by rename: the current folder (``--out .``) or
    one of its parents has no usable name for that and would be swapped from under the shell."""
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current folder was removed: nothing to swap from under anyone
        cwd = None
    if (cwd is not None and (target == cwd or target in cwd.parents)) or out.name in ("", ".", ".."):
        raise OutputExistsError(f"output {str(out)!r} is the current folder or one of its parents; write the merge "
                                "into a new folder (e.g. --out merged)")


@contextlib.contextmanager
def target_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (a ``.NAME.hf_ame-lock`` file beside it) until the block
    ends; waits while another writer holds it. The file is removed on release: a waiter that then
    finds it gone or replaced locks again."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = out.parent / f".{out.name}.hf_ame-lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def stale_siblings(out: Path) -> List[Path]:
    """Staging and set-aside folders of ``out`` left by a killed run (also nested ones: a merge's
    engine stages inside the merger's staging name)."""
    prefixes = (f"{out.name}.hf_ame-tmp-", f"{out.name}.hf_ame-old-")
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(".") and p.name.lstrip(".").startswith(prefixes))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged_output(out: Union[str, Path], overwrite: bool, inputs: Iterable[Union[str, Path]] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` (swap by rename, so
    the old folder is only deleted once the new one is in place); on failure it is removed and
    ``out`` is untouched. The whole block runs under :func:`target_lock`; leftovers of killed runs
    into ``out`` are removed first, with a warning naming them."""
    inputs = list(inputs)
    out = check_output_dir(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)  # only when writing: a dry run creates nothing
    with target_lock(out):
        # again, now that no other writer of ``out`` runs: one that finished while we waited for the
        # lock may have written it (refused now, before any work, unless overwrite)
        check_output_dir(out, overwrite, inputs)
        stale = stale_siblings(out)
        if stale:
            warnings.warn(f"removing {len(stale)} folder(s) left by an interrupted write into {out}: "
                          + ", ".join(p.name for p in stale), stacklevel=3)
            for p in stale:
                _remove(p)
        tmp = out.parent / f".{out.name}.hf_ame-tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            check_output_dir(out, overwrite, inputs)  # someone may have created it meanwhile (without hf_ame)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old: Optional[Path] = None
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.hf_ame-old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)  # a link is replaced, never what it points to
        os.replace(tmp, out)
        if old is not None:
            _remove(old)


def write_files(folder: Path, files: Mapping[str, Union[str, bytes]]) -> None:
    """Write small files (name -> text or bytes) into ``folder``; a failure names the file."""
    for fname, content in files.items():
        try:
            with open(folder / fname, "wb" if isinstance(content, bytes) else "w") as fh:
                fh.write(content)
        except OSError as exc:
            raise write_error(exc, folder / fname) from None


def write_error(exc: OSError, path: Union[str, Path]) -> OSError:
    """``exc`` (a failed write) as an OSError naming ``path``: a full disk says where."""
    code = exc.errno or errno.EIO
    return OSError(code, f"{os.strerror(code)} while writing", str(path))


def copy_aux_files(src: Union[str, Path], dst: Union[str, Path], code: bool = False) -> List[str]:
    """Copy config, tokenizer, processor and generation files (every top-level non-weight file).
    Custom code (``.py``) only with ``code`` (the caller's trust_remote_code). Only regular files
    inside ``src`` are copied (see :mod:`hf_ame.trust`): another file that loading reads is refused,
    naming it; any other (a README, a licence) is skipped with a warning naming it."""
    src, dst = Path(src), Path(dst)
    copied = []
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or p.name in AUX_SKIP or p.name.endswith(_WEIGHT_SUFFIXES) or p.is_dir():
            continue
        if p.name.endswith(".py") and not code:
            continue  # the ingredient's custom code travels only with the user's consent
        why = unsafe_reason(src, p.name)
        if why is not None and is_read_file(p.name):
            raise CheckpointError(f"{src}: {p.name!r} {why}; only regular files inside the model folder are read")
        if why is not None:
            warnings.warn(f"{src}: {p.name!r} {why}: not copied into the output", stacklevel=2)
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


def update_config(folder: Union[str, Path], dtype: torch.dtype, changes: Optional[Mapping[str, object]] = None,
                  drop: Iterable[str] = ()) -> None:
    """Record the merged dtype and the transformers version in config.json, as save_pretrained does
    (and ``changes``: e.g. the layer count of a stacking; ``drop``: fields removed)."""
    path = Path(folder) / "config.json"
    if not path.exists():
        return
    cfg = json.loads(path.read_text())
    cfg.update(changes or {})
    for key in drop:
        cfg.pop(key, None)
    cfg.pop("torch_dtype", None)  # deprecated name; transformers 5 writes "dtype"
    cfg["dtype"] = str(dtype).replace("torch.", "")
    try:  # metadata, not an import: importing transformers costs seconds
        cfg["transformers_version"] = package_version("transformers")
    except Exception:  # pragma: no cover - transformers is a dependency
        pass
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")


def copy_tokenizer_files(src: Union[str, Path], dst: Union[str, Path]) -> List[str]:
    """Replace ``dst``'s tokenizer files by ``src``'s (a mergekit ``tokenizer_source``)."""
    src, dst = Path(src), Path(dst)
    for name in TOKENIZER_FILES:
        if (dst / name).exists():
            (dst / name).unlink()
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.lexists(src / name):
            shutil.copy2(checked_file(src, name, str(src)), dst / name)
            copied.append(name)
    return copied


def write_chat_template(folder: Path, template: str) -> List[str]:
    """``chat_template.jinja`` (as transformers 5 saves it), replacing any template in
    tokenizer_config.json or chat_template.json so there is one."""
    (folder / "chat_template.json").unlink(missing_ok=True)
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if cfg.pop("chat_template", None) is not None:
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (folder / "chat_template.jinja").write_text(template)
    return ["chat_template.jinja"]


def finish_output(folder: Path, files_from: Union[str, Path], dtype: torch.dtype,
                  extra_files: Optional[Mapping[str, Union[str, bytes]]] = None,
                  config_changes: Optional[Mapping[str, object]] = None,
                  tokenizer_from: Union[str, Path, None] = None, tokenizer: Any = None,
                  config_drop: Iterable[str] = (), chat_template: Optional[str] = None,
                  code: bool = False) -> List[str]:
    """Complete a folder of merged weights: the reference's config, tokenizer, processor and
    generation files (``files_from``), config.json's dtype, then ``extra_files``. The tokenizer
    files come from ``tokenizer_from`` (a folder) or ``tokenizer`` (a transformers tokenizer,
    saved with ``save_pretrained``) when given; custom code (``.py``) only with ``code``. Returns the
    names written."""
    aux = copy_aux_files(files_from, folder, code)
    if tokenizer_from is not None:
        aux = sorted(set(a for a in aux if a not in TOKENIZER_FILES)
                     | set(copy_tokenizer_files(tokenizer_from, folder)))
    if tokenizer is not None:
        for name in TOKENIZER_FILES:
            (folder / name).unlink(missing_ok=True)
        saved = {Path(f).name for f in tokenizer.save_pretrained(str(folder))}
        aux = sorted(set(a for a in aux if a not in TOKENIZER_FILES) | saved)
    if chat_template is not None:
        aux = sorted(set(aux) | set(write_chat_template(folder, chat_template)))
    update_config(folder, dtype, config_changes, config_drop)
    write_files(folder, extra_files or {})
    return aux + list(extra_files or {})
