"""Checkpoint files written whole or not at all."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from .errors import FinetuneError

__all__ = ["AtomicCheckpointIO", "CheckpointWriteError"]


class CheckpointWriteError(FinetuneError, OSError):
    """A checkpoint could not be written (full disk, no permission); the previous file is intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes local checkpoints to a temporary file in the same folder, then renames it into place.

    An interrupted write (Ctrl-C, SIGKILL, full disk) leaves the previous ``last.ckpt`` intact
    instead of a truncated one. Remote paths (``s3://`` ...) go through Lightning's fsspec writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
                raise
            kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
            raise CheckpointWriteError(
                f"cannot write checkpoint {path} ({os.strerror(err.errno)}); {kept}; free space or choose another "
                "--run_dir, then resume with --ckpt_path last"
            ) from err
        finally:
            tmp.unlink(missing_ok=True)
