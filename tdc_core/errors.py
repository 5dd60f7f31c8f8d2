"""Errors a user can act on.

Every error raised on bad input derives from :class:`TDCError`; its message names the field
or file and says what is allowed. The CLI prints such errors as one line (no traceback) and
exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TDCError(Exception):
    """Base class for user-facing errors (bad config, data, checkpoint...)."""


class ConfigError(TDCError, ValueError):
    """A configuration value, key or file is invalid."""


class DataError(TDCError):
    """A dataset path is missing, a file is corrupt, or images have the wrong shape."""


class CheckpointError(TDCError):
    """A checkpoint is missing, truncated, tampered with or from another config."""


class TrainingError(TDCError):
    """Training cannot continue (e.g. a non-finite loss)."""


def first_line(exc: BaseException, *, limit: int = 200) -> str:
    """The first line of an exception's message (for one-line user-facing errors)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


class WriteError(TDCError, OSError):
    """A file could not be written (disk full, permissions, I/O error); the message names the
    file and the OS reason. Also an :class:`OSError` (with its ``errno``), so callers that
    handle OS errors keep working."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        OSError.__init__(self, errno, message)
        self.message = message

    def __str__(self) -> str:
        return self.message
