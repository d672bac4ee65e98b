"""Push an output (a folder, or a single adapter file, its recipe inside) to the Hugging Face Hub: only what is in it.

The token is whatever huggingface_hub finds (HF_TOKEN, then the login cache of `hf auth login`); it is
never taken as an argument, printed or written, and it is masked in every error message. The endpoint is
huggingface_hub's (HF_ENDPOINT, read when huggingface_hub is imported) unless `endpoint=` is given.
"""
from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import HFValidationError, httpx, validate_repo_id

from .errors import HubError, InputNotFoundError, InvalidArgumentError
from .sources import masked

LARGE_FOLDER_BYTES = 5 * 2**30
"""From this total size on, a folder goes through `HfApi.upload_large_folder` (resumable, several workers and
commits) when the installed huggingface_hub has it (before 2.0; it takes no commit message, opens no pull
request, and keeps its resume state in <folder>/.cache/huggingface). huggingface_hub 2.x has no such method:
its `upload_folder` already streams large folders through hf_xet in several resumable commits."""


def folder_bytes(folder: Path) -> int:
    """Total size of the files under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_repo_id(repo_id: str) -> None:
    """Raise InvalidArgumentError unless `repo_id` is a valid Hub repo id (checked before any work is done)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise InvalidArgumentError(f"{repo_id!r} is not a Hub repo id (ORG/NAME): {exc}") from None


def push(path: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, create_pr: bool = False, endpoint: str | None = None) -> str:
    """Create `repo_id` if needed (private if asked), upload `path` in one commit, return the commit or PR URL.

    A folder is uploaded whole; a single file alone (an adaptools output holds its recipe in its metadata).
    `revision` is a branch, created from main when missing. Failures raise HubError (token masked).
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{str(path)!r} does not exist")
    if create_pr and revision:
        raise InvalidArgumentError("--create-pr opens a pull request against main; it cannot be combined with --revision")
    check_repo_id(repo_id)
    api = HfApi(endpoint=endpoint)
    message = commit_message or f"Upload {path.name} with adaptools"
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return upload(api, path, repo_id, revision, message, create_pr)
    except HfHubHTTPError as exc:
        raise HubError(masked(http_failure(exc, repo_id, api.endpoint))) from exc
    except OfflineModeIsEnabled as exc:
        raise HubError("cannot push while HF_HUB_OFFLINE is set; unset it to reach the Hub") from exc
    except httpx.HTTPError as exc:
        raise HubError(masked(f"lost the connection to {api.endpoint} while pushing to {repo_id} "
                              f"({type(exc).__name__}: {exc}); the local files are intact: run `adaptools push` to retry")) from exc
    except ValueError as exc:
        raise HubError(masked(f"the Hub client refused to push to {repo_id}: {exc}")) from exc


def upload(api: HfApi, path: Path, repo_id: str, revision: str | None, message: str, create_pr: bool) -> str:
    """One commit of `path` (a folder, or a file); the URL of the commit or pull request."""
    if path.is_file():
        operations = [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=path)]
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr)
    elif not create_pr and hasattr(api, "upload_large_folder") and folder_bytes(path) >= LARGE_FOLDER_BYTES:
        api.upload_large_folder(repo_id=repo_id, folder_path=path, repo_type="model", revision=revision)
        return f"{api.endpoint}/{repo_id}/tree/{revision or 'main'}"
    else:
        info = api.upload_folder(repo_id=repo_id, folder_path=path, commit_message=message, revision=revision,
                                 create_pr=create_pr)
    return info.pr_url or info.commit_url


def http_failure(exc: HfHubHTTPError, repo_id: str, endpoint: str) -> str:
    """One line saying what an HTTP error answer means for the push."""
    status = exc.response.status_code if exc.response is not None else None
    said = (exc.server_message or "").strip().splitlines()
    detail = f" (the Hub said: {said[0]})" if said else ""
    if status == 401:
        return (f"{endpoint} refused the credentials (401) for {repo_id}{detail}: set HF_TOKEN to a token with "
                f"write access, or run `hf auth login`")
    if status == 403:
        return f"no write access to {repo_id} on {endpoint} (403){detail}"
    if status == 404:
        return f"{repo_id} (or its branch) was not found on {endpoint} (404){detail}; check the repo id and the token's access"
    return f"{endpoint} answered {status} while pushing to {repo_id}{detail}"
