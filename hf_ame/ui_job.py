"""Running a merge in a worker thread for the page: its progress bars and search trials captured as
they come, Cancel, and what a cancelled merge left behind. A browser tab's :class:`Session` holds its
merge and its last result. No gradio.

Cancel raises :class:`Cancelled` (a ``KeyboardInterrupt``, as SIGINT in the CLI) in the merge's thread,
so it ends as an error does: staging and temporary folders removed, nothing left.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .output import stale_siblings
from .result import MergeResult

SCRATCH_KINDS = ("merge", "search", "soup", "greedy")  # hf_ame.scratch folders a merge makes


class Cancelled(KeyboardInterrupt):
    """Raised in a merge's thread by Cancel: a ``KeyboardInterrupt`` (as the CLI's SIGINT), so no
    ``except Exception`` on the way swallows it and the merge ends as an error does."""


class _Routed:
    """``sys.stderr`` while the page runs: what a merge thread writes (its tqdm bars, its warnings) goes
    to that merge's :class:`Job`, everything else where it went before."""

    def __init__(self, real: Any):
        self.real = real

    def write(self, text: str) -> int:
        job = _JOBS.get(threading.get_ident())
        return job.write(text) if job is not None else self.real.write(text)

    def flush(self) -> None:
        if threading.get_ident() not in _JOBS:
            self.real.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class _TrialLog(logging.Handler):
    """A merge thread's scored search trials (``hf_ame.search`` logs each one) go to its :class:`Job`."""

    def emit(self, record: logging.LogRecord) -> None:
        job = _JOBS.get(record.thread or 0)
        trial = getattr(record, "hf_ame_trial", None)
        if job is not None and trial is not None:
            job.trials.append(trial)


_JOBS: Dict[int, "Job"] = {}  # merge thread id -> its job
_TRIAL_LOG = _TrialLog(logging.INFO)


def _route_output() -> None:
    """Install the stderr router and the trial handler (once; again if someone replaced sys.stderr)."""
    if not isinstance(sys.stderr, _Routed):
        sys.stderr = _Routed(sys.stderr)
    log = logging.getLogger("hf_ame.search")
    if _TRIAL_LOG not in log.handlers:
        log.addHandler(_TRIAL_LOG)
        log.setLevel(logging.INFO)


def unroute_output() -> None:
    """Undo :func:`_route_output` (the page is closed)."""
    if isinstance(sys.stderr, _Routed):
        sys.stderr = sys.stderr.real
    log = logging.getLogger("hf_ame.search")
    log.removeHandler(_TRIAL_LOG)
    log.setLevel(logging.NOTSET)


class Job:
    """One merge in a worker thread: its captured output and trials, its result or error, and Cancel."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.chunks: List[str] = []
        self.trials: List[Dict[str, Any]] = []
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.cancelled = self.finished = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._target, name="hf_ame-ui-merge", daemon=True)

    def start(self) -> "Job":
        """Start the merge's thread (its output routed to this job from its first line)."""
        _route_output()
        self.thread.start()
        return self

    def _target(self) -> None:
        """Run the merge; whatever it raises is kept (shown on the page), never raised in this thread."""
        me = threading.get_ident()
        _JOBS[me] = self
        try:
            try:
                self.result = self.fn()
            except BaseException as exc:  # noqa: BLE001 - Cancelled included: reported on the page
                exc.__traceback__ = None  # its frames hold the merge's tensors and progress bars: freed now, here
                self.error = exc
            with self.lock:
                self.finished = True
        except Cancelled:  # the cancel arrived after the merge had returned: the merge stands
            self.finished = True
        finally:
            _JOBS.pop(me, None)

    def cancel(self) -> bool:
        """Stop the merge: :class:`Cancelled` raised in its thread (at most once, never after it ended)."""
        with self.lock:
            if self.finished or self.cancelled or not self.thread.is_alive():
                return False
            self.cancelled = True
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread.ident), ctypes.py_object(Cancelled))
        return True

    def write(self, text: str) -> int:
        """What the merge's thread wrote to ``sys.stderr``, kept for :meth:`progress`."""
        self.chunks.append(text)
        return len(text)

    @property
    def alive(self) -> bool:
        """Whether the merge's thread still runs."""
        return self.thread.is_alive()

    def progress(self, limit: int = 30) -> str:
        """The CLI's progress lines: each tqdm bar at its latest state, and the warnings, in order."""
        lines: Dict[str, str] = {}
        for part in re.split(r"[\r\n]+", "".join(self.chunks)):
            part = part.strip()
            if part:
                lines[part.split(":", 1)[0] if "|" in part else part] = part
        return "\n".join(list(lines.values())[-limit:])


def scratch_folders() -> set:
    """This process's scratch folders of merges now (another tab's temporary output among them)."""
    tmp = Path(tempfile.gettempdir())
    return {p for kind in SCRATCH_KINDS for p in tmp.glob(f"hf_ame-{kind}-{os.getpid()}-*")}


def leftovers_of(out: Optional[Path], existed: bool, scratch_before: set) -> List[str]:
    """What a cancelled merge left: its output (new), staging siblings, scratch folders it made."""
    left = [str(out)] if out is not None and out.exists() and not existed else []
    left += [str(p) for p in stale_siblings(out)] if out is not None else []
    return left + sorted(str(p) for p in scratch_folders() - scratch_before)


@dataclass
class Session:
    """One browser tab: its folder (recipes and zips to download), its merge and its last result."""

    dir: Path
    job: Optional[Job] = None
    result: Optional[MergeResult] = None

    def drop_result(self) -> None:
        """Forget the last result; a temporary output (no output folder given) is removed with it."""
        if self.result is not None and hasattr(self.result, "cleanup"):
            self.result.cleanup()
        self.result = None

    def file(self, name: str, text: str, sub: str = "recipe") -> Path:
        """A file to download, named as it should arrive (the browser keeps the name)."""
        folder = self.dir / sub
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
        return folder / name
