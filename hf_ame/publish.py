"""Publishing a merged folder to the Hub: create the repo, then ONE commit with everything."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union
from .errors import PushError
from .hub import bound_timeouts, timeout_hint

__all__ = ["PushError", "push_folder"]


def push_folder(folder: Union[str, Path], repo_id: str, *, private: Optional[bool] = None,
                token: Union[bool, str, None] = None, revision: Optional[str] = None, create_pr: bool = False,
                commit_message: Optional[str] = None, commit_description: Optional[str] = None,
                endpoint: Optional[str] = None) -> Any:
    """``create_repo(exist_ok=True)`` (and ``create_branch`` for a new ``revision``), then ONE
    ``create_commit`` adding every file of ``folder`` (upload_folder may split large folders into
    several commits when Xet is used; a merge is published atomically instead). Returns
    huggingface_hub's ``CommitInfo`` (``.commit_url``, ``.oid``, ``.pr_url``)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise PushError(f"push: {folder} is not a merged model folder")
    bound_timeouts()  # a Hub that accepts and never answers: an error after HF_HUB_DOWNLOAD_TIMEOUT, not a hang
    api = HfApi(endpoint=endpoint, token=token)
    step = "create the repository"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision not in (None, "main") and not create_pr:
            step = f"create the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "upload the files"
        ops = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
               for p in sorted(folder.rglob("*"))
               if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
        return api.create_commit(repo_id=repo_id, operations=ops, repo_type="model",
                                 revision=None if create_pr else revision, create_pr=create_pr,
                                 commit_message=commit_message or "Upload AME merge (hf_ame)",
                                 commit_description=commit_description)
    except Exception as exc:  # noqa: BLE001 - every failure leaves the folder as it was
        why = timeout_hint(exc) or f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        raise PushError(f"push to {repo_id!r} failed while trying to {step}: {why}. "
                        f"The merged model is intact at {folder}; retry with "
                        f"`hf-ame push {folder} {repo_id}`") from exc
