"""Atomic, safe checkpoint files.

A checkpoint is a dict of tensors and plain values (no pickled objects), written with
``torch.save`` to a temporary file in the same folder, fsynced, then renamed over the old one:
a crash mid-write leaves the previous checkpoint intact. Loading always uses
``torch.load(weights_only=True)``, so a file carrying a pickled object is refused, never run.
"""

from __future__ import annotations

import functools
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from tdc_core.errors import CheckpointError, first_line

__all__ = ["atomic_write_bytes", "load_checkpoint", "save_checkpoint"]

FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _umask() -> int:
    # os.umask can only be read by setting it; do that once per process, not on every write,
    # since another thread creating a file in between would get the temporary mask.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave a half-written temp file behind.
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    _atomic_write(Path(path), lambda f: f.write(data))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomically save ``payload`` (tensors, numbers, strings, lists, dicts only).

    Raises:
        CheckpointError: the file could not be written (disk full, permissions); the previous
            checkpoint at ``path`` is untouched.
    """
    path = Path(path)
    try:
        _atomic_write(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **payload}, f))
    except OSError as exc:
        raise CheckpointError(f"could not write checkpoint {path}: {exc.strerror or exc}") from None


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, refusing pickled objects.

    Raises:
        CheckpointError: missing, truncated or corrupt file, or one that carries code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds objects other than tensors and plain "
            f"values ({first_line(exc)})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {first_line(exc)}") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a TDC checkpoint (format {FORMAT_VERSION})")
    return payload

