"""Ingredients on the Hub (or in huggingface_hub's cache): resolve, inspect headers, download.

Everything here goes through huggingface_hub. The inspection step reads only config.json and the
safetensors headers (HTTP range requests), so incompatible ingredients are reported before any
weight file is downloaded.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from .checkpoints import SAFETENSORS_DTYPES, TensorInfo
from .errors import IngredientError

__all__ = ["Ingredient", "IngredientError", "parse_ingredient", "RemoteHeader", "inspect_remote", "download",
           "allow_patterns", "bound_timeouts", "timeout_hint"]

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class Ingredient:
    """One model of a merge. ``id`` is the Hub repo id or the local path as given; ``revision`` what
    was asked for; ``sha`` the resolved commit (None for a local folder); ``path`` the local folder."""

    id: str
    revision: Optional[str] = None
    sha: Optional[str] = None
    path: Optional[Path] = None
    local: bool = False
    order: Optional[int] = None
    score: Optional[float] = None
    kept: bool = True
    dtype: Optional[str] = None  # the floating dtype most of its weights are stored in
    adapter_base: Optional[str] = None  # a LoRA adapter's base (mergekit's "model+lora"), a folder or Hub id
    gguf_file: Optional[str] = None  # a GGUF ingredient: the file's name in ``path`` (transformers' gguf_file)
    quantization: Optional[str] = None  # a GGUF ingredient: its file type and tensor types (see hf_ame.gguf)

    def to_dict(self) -> Dict[str, Any]:
        out = {"id": self.id, "revision": self.revision, "sha": self.sha, "path": str(self.path) if self.path else None,
               "local": self.local, "order": self.order, "score": self.score, "kept": self.kept, "dtype": self.dtype}
        if self.adapter_base:
            out["base"] = self.adapter_base
        if self.gguf_file:
            out.update(gguf_file=self.gguf_file, quantization=self.quantization)
        return out


def parse_ingredient(entry: Union[str, os.PathLike, Mapping[str, Any]], default_revision: Optional[str] = None,
                     where: str = "models") -> Ingredient:
    """``"org/name"``, ``"./folder"``, or ``{"id": ..., "revision": ...}`` (``path`` / ``repo_id`` also
    accepted; ``base``: the base model of a LoRA adapter, mergekit's ``model+lora``)."""
    if isinstance(entry, Mapping):
        unknown = set(entry) - {"id", "path", "repo_id", "revision", "base", "gguf_file"}
        if unknown:
            raise IngredientError(f"{where}: unknown key {sorted(unknown)[0]!r} in {dict(entry)!r}; "
                                  "use id and revision")
        if entry.get("gguf_file") is not None:  # a GGUF file of a folder or Hub repo (transformers' gguf_file)
            return _gguf_entry(entry, default_revision, where)
        ing = parse_ingredient({k: v for k, v in entry.items() if k != "base"}, default_revision, where) \
            if entry.get("base") is not None else None
        if ing is not None:
            ing.adapter_base = str(entry["base"])
            return ing
        ident = entry.get("id") or entry.get("repo_id") or entry.get("path")
        if not ident:
            raise IngredientError(f"{where}: entry {dict(entry)!r} has no id")
        revision = entry.get("revision", default_revision)
    elif isinstance(entry, (str, os.PathLike)):
        ident, revision = os.fspath(entry), default_revision
    else:
        raise IngredientError(f"{where}: expected a repo id, a folder or a mapping, got {type(entry).__name__}")
    ident = str(ident)
    path = Path(ident).expanduser()
    if path.is_dir():
        return Ingredient(ident, revision=None, path=path, local=True)
    if path.is_file() and path.suffix.lower() == ".gguf":  # a GGUF file: its folder, and its name in it
        return Ingredient(ident, revision=None, path=path.parent, local=True, gguf_file=path.name)
    looks_local = ident.startswith((".", "/", "~")) or ident.count("/") > 1 or os.sep in ident.replace("/", "")
    if looks_local:
        raise IngredientError(f"{where}: {ident!r}: no such folder")
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(ident)
    except Exception as exc:  # HFValidationError
        raise IngredientError(f"{where}: {ident!r} is neither a folder nor a valid Hub repo id ({exc})") from None
    return Ingredient(ident, revision=revision)


def _gguf_entry(entry: Mapping[str, Any], default_revision: Optional[str], where: str) -> Ingredient:
    """``{"id": folder or repo, "gguf_file": name}``: the named GGUF file of a folder or Hub repo."""
    name = entry["gguf_file"]
    if (not isinstance(name, str) or not name.lower().endswith(".gguf") or os.path.isabs(name)
            or ".." in Path(name).parts):
        raise IngredientError(f"{where}: gguf_file {name!r} must be the name of a .gguf file inside the folder or repo")
    ing = parse_ingredient({k: v for k, v in entry.items() if k != "gguf_file"}, default_revision, where)
    ing.gguf_file = name
    return ing


@dataclass
class RemoteHeader:
    """What :func:`check_compatible` needs, read from the Hub without downloading weights."""

    name: str
    config: Dict[str, Any]
    tensors: Dict[str, TensorInfo]
    sha: str
    files: List[str] = field(default_factory=list)
    safetensors: bool = True
    adapter: bool = False  # a LoRA adapter repo (adapter_config.json): read after downloading it

    def rekey(self, names: Dict[str, str]) -> "RemoteHeader":
        """As :meth:`hf_ame.checkpoints.Checkpoint.rekey`: tensors keyed by other names."""
        self.tensors = {names[k]: dataclasses.replace(info, name=names[k], stored_name=info.file_name)
                        for k, info in self.tensors.items() if k in names}
        return self


def _fill_timeouts(request: Any) -> None:
    """A request hook: every limit the call left unset (None: wait forever) gets huggingface_hub's
    own, read now: HF_HUB_ETAG_TIMEOUT to connect, HF_HUB_DOWNLOAD_TIMEOUT between two reads or
    writes (a pause, not a whole transfer: big files stream on)."""
    from huggingface_hub import constants

    limit = float(constants.HF_HUB_DOWNLOAD_TIMEOUT)
    limits = {"connect": float(constants.HF_HUB_ETAG_TIMEOUT), "read": limit, "write": limit, "pool": limit}
    given = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {k: given[k] if given.get(k) is not None else v for k, v in limits.items()}


def bound_timeouts() -> None:
    """huggingface_hub's shared HTTP client sends most calls (model_info, create_repo, create_commit,
    ...) with no timeout: a Hub endpoint that accepts and never answers would hang a download or a
    push forever. Add :func:`_fill_timeouts` to its request hooks (once per client; limits a caller
    set are kept)."""
    from huggingface_hub.utils import get_session

    client = get_session()
    hooks = client.event_hooks
    if _fill_timeouts not in hooks.get("request", []):
        client.event_hooks = {**hooks, "request": [*hooks.get("request", []), _fill_timeouts]}


def timeout_hint(exc: BaseException) -> Optional[str]:
    """A plain sentence when ``exc`` (or what caused it) is an HTTP timeout, else None."""
    seen: List[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 8:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    timeouts = [e for e in seen if isinstance(e, TimeoutError)
                or any(c.__name__ == "TimeoutException" for c in type(e).__mro__)]  # httpx's, whichever fork
    if not timeouts:
        return None
    from huggingface_hub import constants

    return (f"the Hub did not answer within {constants.HF_HUB_DOWNLOAD_TIMEOUT} s ({type(timeouts[0]).__name__}; "
            "raise HF_HUB_DOWNLOAD_TIMEOUT / HF_HUB_ETAG_TIMEOUT for a slow connection)")


def _wrap(ing: Ingredient, exc: BaseException, what: str) -> IngredientError:
    from huggingface_hub.errors import (GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    rev = f" at revision {ing.revision!r}" if ing.revision else ""
    if isinstance(exc, GatedRepoError):
        why = "the repo is gated: accept its terms on the Hub and pass token="
    elif isinstance(exc, RepositoryNotFoundError):
        why = "repository not found (or private: pass token=)"
    elif isinstance(exc, RevisionNotFoundError):
        why = "revision not found"
    elif isinstance(exc, OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE is set and it is not in the local cache (download it first, or use a local folder)"
    elif timeout_hint(exc):
        why = timeout_hint(exc)
    else:
        why = f"{type(exc).__name__}: {exc}"
    return IngredientError(f"{ing.id!r}{rev}: cannot {what}: {why}")


def inspect_remote(ing: Ingredient, *, token: Union[bool, str, None] = None,
                   endpoint: Optional[str] = None) -> RemoteHeader:
    """Resolve the commit sha, read config.json and every safetensors header (range requests only)."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import NotASafetensorsRepoError

    bound_timeouts()
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(ing.id, revision=ing.revision)
    except Exception as exc:  # noqa: BLE001 - wrapped with the repo's name
        raise _wrap(ing, exc, "resolve it on the Hub") from exc
    sha = info.sha
    files = [s.rfilename for s in (info.siblings or [])]
    config: Dict[str, Any] = {}
    if "config.json" in files:
        try:
            config = json.loads(Path(hf_hub_download(ing.id, "config.json", revision=sha, token=token,
                                                     endpoint=endpoint)).read_text())
        except Exception as exc:  # noqa: BLE001
            raise _wrap(ing, exc, "read config.json") from exc
    if "adapter_config.json" in files and not any(f.startswith(("model.", "model-", "pytorch_model")) for f in files):
        return RemoteHeader(ing.id, config, {}, sha, files, False, adapter=True)  # a LoRA adapter repo
    tensors: Dict[str, TensorInfo] = {}
    is_safetensors = any(f.endswith(".safetensors") for f in files)
    if is_safetensors:
        try:
            meta = api.get_safetensors_metadata(ing.id, revision=sha, token=token)
        except NotASafetensorsRepoError:
            is_safetensors = False
        except Exception as exc:  # noqa: BLE001
            raise _wrap(ing, exc, "read its safetensors headers") from exc
        else:
            for fname, fmeta in meta.files_metadata.items():
                for tname, t in fmeta.tensors.items():
                    if meta.weight_map.get(tname, fname) != fname:
                        continue
                    dt = SAFETENSORS_DTYPES.get(t.dtype)
                    if dt is None:
                        raise IngredientError(f"{ing.id!r}: tensor {tname!r} has unsupported dtype {t.dtype!r}")
                    tensors[tname] = TensorInfo(tname, dt, tuple(t.shape), fname)
    if not is_safetensors and not any(f.startswith("pytorch_model") and f.endswith(".bin") for f in files):
        raise IngredientError(f"{ing.id!r}: the repo has no model weights (no *.safetensors nor "
                              f"pytorch_model*.bin); files: {', '.join(files[:10]) or 'none'}")
    return RemoteHeader(ing.id, config, tensors, sha, files, is_safetensors)


def allow_patterns(files: List[str], trust_remote_code: bool = False, weights: bool = True) -> List[str]:
    """Only what a merge needs: safetensors (never .bin when safetensors exist; none without
    ``weights``), JSON configs and indexes, tokenizer / processor / generation / chat-template files."""
    pats = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "tokenizer*", "*.spm"]
    if weights:
        pats.append("*.safetensors" if any(f.endswith(".safetensors") for f in files) else "pytorch_model*.bin")
    if trust_remote_code:
        pats.append("*.py")
    return pats


def download(ing: Ingredient, *, files: Optional[List[str]] = None, cache_dir: Union[str, Path, None] = None,
             token: Union[bool, str, None] = None, local_files_only: bool = False, trust_remote_code: bool = False,
             endpoint: Optional[str] = None, weights: bool = True) -> Tuple[Path, str]:
    """snapshot_download the files a merge needs at ``ing.sha`` (or ``ing.revision``); returns (folder, sha).
    ``weights=False``: only the small files (configs, tokenizer), to check them before any weight."""
    from huggingface_hub import snapshot_download

    # Ask for the revision as given (so the cache records refs/<branch> and local_files_only works
    # later), then check it is still the commit whose headers were checked.
    revision = ing.revision
    bound_timeouts()
    pats = (allow_patterns(files or ["model.safetensors"], trust_remote_code, weights)
            if (files is not None or not weights) else None)
    if ing.gguf_file:  # a GGUF repo holds many quantizations: only the one named (config and tokenizer are in it)
        pats = [ing.gguf_file]
    try:
        folder = Path(snapshot_download(ing.id, revision=revision, cache_dir=cache_dir, token=token,
                                        local_files_only=local_files_only, allow_patterns=pats, endpoint=endpoint,
                                        library_name="hf_ame"))
    except Exception as exc:  # noqa: BLE001
        from huggingface_hub import constants

        why_local = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "local_files_only=True"
        what = f"find it in the local cache ({why_local})" if local_files_only else "download it"
        raise _wrap(ing, exc, what) from exc
    sha = folder.name if _SHA_RE.match(folder.name) else (ing.sha or "")
    if ing.sha and sha and sha != ing.sha:
        raise IngredientError(f"{ing.id!r}: revision {revision!r} moved from {ing.sha} to {sha} "
                              "during the merge set-up; pin a commit sha")
    return folder, sha
