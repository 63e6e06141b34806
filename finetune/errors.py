"""The one base class of this project's errors: bad input the command line reports as one line.

Every error the toolkit raises on purpose derives from :class:`FinetuneError`; its message is one
line naming the file, key or value and what was expected. ``cli.py`` prints it as ``error: ...``
and exits with status 2 (``RPE_FINETUNE_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

__all__ = ["FinetuneError", "UsageError"]


class FinetuneError(Exception):
    """Bad input (a file, flag or setting), reported as one line and exit status 2."""


class UsageError(FinetuneError, ValueError):
    """Bad command-line input: an unknown recipe, a missing flag, a run folder that holds a run."""
