"""Uploading an exported folder to the Hugging Face Hub, with retries and a command to retry by hand.

Everything is exported into a local folder first and uploaded second: a failed upload leaves the
folder intact and prints the command that retries from it. Tokens are read by huggingface_hub
(``HF_TOKEN`` or ``hf auth login``) and never written or printed.
"""

from __future__ import annotations

import inspect
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import http_backoff, validate_repo_id

from .export import ExportError
from .weights import HubError, cause_of, http_cause

__all__ = ["check_target", "retry_command", "push_folder", "report_push"]

# Retry the network errors huggingface_hub's own backoff retries, and the transient HTTP statuses its
# recent releases retry (1.0 retried 503 alone).
_BACKOFF_DEFAULTS = inspect.signature(http_backoff).parameters
_TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    *_BACKOFF_DEFAULTS["retry_on_exceptions"].default,
    ConnectionError,
    TimeoutError,
)
_TRANSIENT_STATUS: tuple[int, ...] = (408, 429, 500, 502, 503, 504)


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ExportError(f"--repo-id {repo_id!r}: expected 'owner/name' ({str(err).splitlines()[0]})") from err
    if repo_id.count("/") != 1:
        raise ExportError(f"--repo-id {repo_id!r}: expected 'owner/name'")


def check_target(repo_id: str, revision: str | None, create_pr: bool) -> None:
    _check_repo_id(repo_id)
    if create_pr and revision not in (None, "main"):
        raise ExportError(f"--create-pr opens a pull request against main; it cannot be combined with --revision {revision!r}")


def retry_command(folder: Path, repo_id: str, private: bool = False, revision: str | None = None,
                  create_pr: bool = False) -> str:
    """The CLI command that uploads an exported folder again."""
    args = ["python", "cli.py", "push", "--folder", str(folder), "--repo-id", repo_id]
    args += ["--private"] * private + (["--revision", revision] if revision else []) + ["--create-pr"] * create_pr
    return shlex.join(args)


def _upload_cause(err: BaseException, repo_id: str) -> tuple[bool, str] | None:
    """(transient?, one-line cause) of an upload failure, or None for errors that are not the Hub's."""
    if isinstance(err, OfflineModeIsEnabled):
        return False, "HF_HUB_OFFLINE=1 is set; unset it to upload"
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        if status in (401, 403):
            return False, (f"HTTP {status}: not allowed to write to {repo_id}; set HF_TOKEN or run `hf auth login` "
                           "with a write token")
        return status in _TRANSIENT_STATUS, f"{http_cause(err)} from {constants.ENDPOINT}"
    if isinstance(err, _TRANSIENT_EXCEPTIONS):
        return True, f"cannot reach {constants.ENDPOINT} ({cause_of(err)})"
    return None


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload model with rpe-finetune",
    retries: int = 3,
    retry_wait: float = 2.0,
) -> Any:
    """Create the repo (if needed) and upload ``folder`` to it; returns huggingface_hub's CommitInfo.

    Transient failures (connection errors, timeouts, 429/5xx) are retried ``retries`` times, waiting
    ``retry_wait`` seconds and doubling; 401/403 are not retried. Raises :class:`HubError` whose one-line
    message ends with the command that retries from the folder.
    """
    folder = Path(folder)
    check_target(repo_id, revision, create_pr)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise ExportError(f"{folder}: {name} is missing; expected a folder written by export/convert")
    api = HfApi(library_name="rpe-finetune")
    attempt = 0
    while True:
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main" and not revision.startswith("refs/"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                     create_pr=create_pr, commit_message=commit_message)
        except Exception as err:
            classified = _upload_cause(err, repo_id)
            if classified is None:
                raise
            transient, cause = classified
            if not transient or attempt == retries:
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise HubError(f"upload of {folder} to {repo_id} failed{tries}: {cause}; the export is kept, retry with: "
                               f"{retry_command(folder, repo_id, private, revision, create_pr)}") from err
            wait = retry_wait * 2**attempt
            print(f"upload to {repo_id} failed ({cause}); retrying in {wait:g}s", file=sys.stderr)
            time.sleep(wait)
            attempt += 1


def report_push(info: Any, repo_id: str) -> None:
    if getattr(info, "pr_url", None):
        print(f"opened pull request {info.pr_url}")
    else:
        print(f"pushed to {constants.ENDPOINT}/{repo_id} (commit {info.oid})")
