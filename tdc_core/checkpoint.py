"""Atomic, safe checkpoint files.

A checkpoint is a dict of tensors and plain values (no pickled objects), written with
``torch.save`` to a temporary file in the same folder, fsynced, then renamed over the old one:
a crash mid-write leaves the previous checkpoint intact. Loading always uses
``torch.load(weights_only=True)``, so a file carrying a pickled object is refused, never run.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from tdc_core.errors import CheckpointError, WriteError, first_line

__all__ = ["WriteError", "atomic_write_bytes", "load_checkpoint", "payload_digest", "save_checkpoint"]

FORMAT_VERSION = 1


def _os_error(exc: BaseException) -> OSError | None:
    """The OS error behind ``exc``: itself, or one it wraps. ``torch.save`` turns a failed write
    of its file object into a ``RuntimeError`` ("enforce fail ... unexpected pos") whose
    context is the real ``OSError``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _reason(exc: OSError) -> str:
    """``[Errno 28] No space left on device``: the OS reason alone, without a temp file's name."""
    return f"[Errno {exc.errno}] {exc.strerror}" if exc.errno and exc.strerror else first_line(exc)


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


def _atomic_write(path: Path, write, *, what: str = "") -> None:
    """Write through ``write(file)`` into a temp file beside ``path``, then rename it over ``path``.

    Raises:
        WriteError: naming ``path`` and the OS reason (disk full, permissions); ``path`` keeps
            its previous content and no temp file is left behind.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        # Also on KeyboardInterrupt: never leave a half-written temp file behind.
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = _os_error(exc) if isinstance(exc, Exception) else None
        if cause is None:
            raise
        raise WriteError(f"could not write {what}{path}: {_reason(cause)}", errno=cause.errno) from exc
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename).

    Raises:
        WriteError: the file could not be written; ``path`` keeps its previous content.
    """
    _atomic_write(Path(path), lambda f: f.write(data))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomically save ``payload`` (tensors, numbers, strings, lists, dicts only).

    Raises:
        CheckpointError: the file could not be written (disk full, permissions); the previous
            checkpoint at ``path`` is untouched.
    """
    path = Path(path)
    body = {"format_version": FORMAT_VERSION, **payload}
    body["digest"] = payload_digest(body)
    try:
        _atomic_write(path, lambda f: torch.save(body, f), what="checkpoint ")
    except WriteError as exc:
        raise CheckpointError(str(exc)) from exc


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
    except Exception as exc:  # noqa: BLE001 - torch's unpickler raises many types on damaged bytes
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {first_line(exc) or type(exc).__name__}") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a TDC checkpoint (format {FORMAT_VERSION})")
    # torch does not check the zip's CRCs: a flipped bit in tensor data loads as other weights.
    # Checkpoints written before digests existed carry none and load unchecked.
    stored = payload.pop("digest", None)
    if stored is not None and stored != payload_digest(payload):
        raise CheckpointError(f"checkpoint {path} is corrupt or was modified: its content does not match "
                              f"the digest stored when it was written")
    return payload


def payload_digest(payload: Any) -> str:
    """SHA-256 over a checkpoint payload's structure and every tensor's bytes (hex).

    Keys are hashed in dict order, which ``torch.save``/``torch.load`` preserve.
    """
    h = hashlib.sha256()
    _feed(h, payload)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, dict):
        h.update(b"{%d" % len(obj))
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(b"[%d" % len(obj))
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())

