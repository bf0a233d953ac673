"""Scratch folders in the system temp folder: search trials, greedy reloads, the soup of
``compare_soup``, and ``merge()`` without ``output_dir``.

Each is named ``hf_ame-<kind>-<pid>-<random>``, the pid of the process that made it. A run killed
before its clean-up (``kill -9``, a power cut) leaves its folder; the next one that makes a scratch
folder finds those whose process is gone, names them in a warning and removes them, as a write into
an output removes the staging folders beside it (:func:`hf_ame.output.stale_siblings`).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import List

__all__ = ["scratch_dir", "stale_scratch", "remove_stale_scratch"]

_NAME = re.compile(r"hf_ame-[a-z]+-(\d+)-")


def scratch_dir(kind: str) -> Path:
    """A new, empty scratch folder for ``kind`` (``search``, ``greedy``, ``soup``, ``merge``), after
    removing stale ones. The caller removes it when done."""
    remove_stale_scratch()
    return Path(tempfile.mkdtemp(prefix=f"hf_ame-{kind}-{os.getpid()}-"))


def stale_scratch() -> List[Path]:
    """Scratch folders whose process is gone (ours are never stale: this process is alive)."""
    root = Path(tempfile.gettempdir())
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    out = []
    for p in entries:
        m = _NAME.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _alive(int(m.group(1))):
            out.append(p)
    return sorted(out)


def remove_stale_scratch() -> None:
    stale = stale_scratch()
    if stale:
        warnings.warn(f"removing {len(stale)} folder(s) left in {stale[0].parent} by a killed hf_ame run: "
                      + ", ".join(p.name for p in stale), stacklevel=3)
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts as alive: its folders are not ours)."""
    if pid == os.getpid() or os.name == "nt":  # Windows' os.kill would end the process: never guess there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True
