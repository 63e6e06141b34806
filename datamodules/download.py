"""Downloading a dataset archive: checked against its md5, extracted atomically."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["download_and_extract"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def _fetch(url: str, destination: Path, timeout: float) -> str:
    """Stream ``url`` into ``destination``; return the md5 hex digest of what was written."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(destination, "wb") as out:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        raise OSError(f"could not download {url}: {err}") from None
    return digest.hexdigest()


def download_and_extract(url: str, md5: str, root: Path, folder: str, timeout: float = 60.0) -> Path:
    """Make ``root/folder`` from the top-level ``folder`` of the .tar(.gz) archive at ``url``.

    Nothing happens when ``root/folder`` exists. Download and extraction happen in a temporary
    folder beside the target, which is renamed into place only when the md5 matched and the
    archive extracted completely; on any failure the temporary folder is removed, so neither a
    partial dataset folder nor a stray archive is left behind.
    """
    target = root / folder
    if target.exists():
        return target
    created_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder}.", suffix=".partial", dir=root))
    try:
        archive = staging / "archive"
        logger.info("downloading %s into %s", url, root)
        actual = _fetch(url, archive, timeout)
        if actual != md5:
            raise OSError(f"checksum mismatch for {url}: got md5 {actual}, expected {md5}; nothing was kept")
        extracted = staging / "extracted"
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(extracted, filter="data")
        except tarfile.TarError as err:
            raise OSError(f"{url}: cannot extract the archive ({err})") from None
        if not (extracted / folder).is_dir():
            raise OSError(f"{url}: the archive has no top-level folder {folder!r}")
        os.rename(extracted / folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created_root and not target.exists():
            with contextlib.suppress(OSError):  # only succeeds when empty
                root.rmdir()
    return target
