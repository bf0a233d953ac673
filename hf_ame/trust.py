"""Which files of an ingredient folder are read and copied: regular files inside the folder only.

An ingredient folder is data from someone else (a download, an archive): a file in it that is a
symlink to ``/proc/self/environ`` or ``~/.ssh/id_rsa`` would be read, merged into the output and
pushed; a FIFO named ``config.json`` would block the merge forever. So a file is used only when
it is a regular file inside the folder, or a symlink that resolves inside the folder or into the
blob store of the Hugging Face cache repo the folder is a snapshot of (``snapshots/<sha>/f ->
../../blobs/<hash>``, as every Hub download is laid out).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO, Optional, Union

from .errors import CheckpointError

__all__ = ["unsafe_reason", "checked_file", "check_folder", "open_regular", "is_read_file", "hub_snapshot_repo"]

# Files that hf_ame or transformers read when they load a folder's config, tokenizer, processor,
# chat template or custom code (weight files are checked by name where they are found).
_READ_SUFFIXES = (".json", ".jinja", ".py", ".model", ".tiktoken")
_READ_NAMES = ("vocab.txt", "merges.txt")
_HUB_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


def is_read_file(name: str) -> bool:
    """A file that loading the folder reads (refused when unsafe, rather than skipped)."""
    return name.endswith(_READ_SUFFIXES) or name in _READ_NAMES or name.startswith("tokenizer")


def hub_snapshot_repo(folder: Union[str, Path]) -> Optional[Path]:
    """The cache repo folder (``.../models--org--name``) when ``folder`` is in one of its snapshots."""
    real = Path(os.path.realpath(folder))
    for parent in (real, *real.parents):
        if parent.parent.name == "snapshots" and parent.parent.parent.name.startswith(_HUB_REPO_PREFIXES):
            return parent.parent.parent
    return None


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return what
    return "not a regular file"


def unsafe_reason(folder: Union[str, Path], name: str) -> Optional[str]:
    """Why ``folder/name`` must not be read (None when it may, or when it does not exist)."""
    path = Path(folder) / name
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    root, target = os.path.realpath(folder), os.path.realpath(path)
    if os.path.commonpath([root, target]) != root:
        repo = hub_snapshot_repo(folder)
        blobs = os.path.realpath(repo / "blobs") if repo is not None else None
        if blobs is None or os.path.dirname(target) != blobs:
            return f"resolves to {target}, outside the folder"
    try:
        mode = os.stat(path).st_mode  # follows the link: what a read would open
    except FileNotFoundError:
        return f"is a link to {target}, which does not exist"
    return None if stat.S_ISREG(mode) else f"is {_kind(mode)}, not a regular file"


def checked_file(folder: Union[str, Path], name: str, who: str, what: Optional[str] = None) -> Path:
    """``folder/name``, refused (naming it) unless it is a regular file inside the folder."""
    why = unsafe_reason(folder, name)
    if why is not None:
        raise CheckpointError(f"{who}: {what or repr(name)} {why}; only regular files inside the model folder are read "
                              "(copy the file into the folder)")
    return Path(folder) / name


def check_folder(folder: Union[str, Path], who: str) -> None:
    """Refuse, before anything is read, a top-level file that loading the folder would read
    (config, tokenizer, processor, chat template, custom code) and that is not a regular file inside it."""
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if not e.name.startswith("."))
    for name in names:
        if is_read_file(name):
            checked_file(folder, name, who)


def open_regular(path: Union[str, Path], who: str) -> BinaryIO:
    """Open ``path`` for reading, refusing anything but a regular file without blocking on it (a
    FIFO is opened non-blocking, then refused by fstat)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"{who}: {Path(path).name!r} is {_kind(mode)}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
