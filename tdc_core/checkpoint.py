"""Atomic, safe checkpoint files.

A checkpoint is a dict of tensors and plain values (no pickled objects), written with
``torch.save`` to a temporary file in the same folder, fsynced, then renamed over the old one:
a crash mid-write leaves the previous checkpoint intact. Loading always uses
``torch.load(weights_only=True)``, so a file carrying a pickled object is refused, never run.

Integrity: torch checks neither the zip's CRCs nor anything else, so a flipped bit can load as
other weights. Every checkpoint therefore carries a SHA-256 ``digest`` of what loading must give
back: the payload's structure, the exact type of every value, every float's bits, and every
tensor's type, dtype, shape, ``requires_grad`` flag and bytes. A format-2 checkpoint without a
digest is refused (a damaged ``digest`` key must not turn the check off), so any damage that
changes what loads is refused and any other damage (zip padding, storage bytes outside a saved
view) provably loads the same payload. Format-1 files (written before format 2) are checked
against the zip's CRC-32s, which catch any single flipped bit inside a stored member, and
against their older, weaker digest when they have one.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from tdc_core.errors import CheckpointError, WriteError, first_line

__all__ = ["WriteError", "atomic_write_bytes", "load_checkpoint", "payload_digest", "save_checkpoint"]

FORMAT_VERSION = 2
_LEGACY_VERSION = 1  # no mandatory digest; read, never written


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
        reason = first_line(exc) or type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {reason}") from None
    version = payload.get("format_version") if isinstance(payload, dict) else None
    if type(version) is not int or version not in (FORMAT_VERSION, _LEGACY_VERSION):
        raise CheckpointError(f"checkpoint {path} is not a TDC checkpoint (format {FORMAT_VERSION})")
    stored = payload.pop("digest", None)
    if version == FORMAT_VERSION:
        if type(stored) is not str:
            raise CheckpointError(f"checkpoint {path} is corrupt or was modified: it carries no content digest")
        if stored != payload_digest(payload):
            raise CheckpointError(f"checkpoint {path} is corrupt or was modified: its content does not match "
                                  f"the digest stored when it was written")
        return payload
    # Format 1: its digest (when present) did not cover requires_grad or every type, and a flip
    # in its "digest" key dropped the check; the zip's CRC-32s cover every stored byte.
    _check_zip_crcs(path)
    if stored is not None and stored != _digest_v1(payload):
        raise CheckpointError(f"checkpoint {path} is corrupt or was modified: its content does not match "
                              f"the digest stored when it was written")
    return payload


def _check_zip_crcs(path: Path) -> None:
    """Raise CheckpointError unless ``path`` is a zip whose members all match their CRC-32."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as exc:  # noqa: BLE001 - zipfile raises many types on damaged headers
        reason = first_line(exc) or type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {reason}") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt or was modified: member {bad} fails its CRC check")


def payload_digest(payload: Any) -> str:
    """SHA-256 (hex) over everything loading a checkpoint payload gives back: its structure
    (keys in dict order, which ``torch.save``/``torch.load`` preserve), the exact type of every
    value, every float's bits, and every tensor's type, dtype, shape, ``requires_grad`` and bytes.
    """
    h = hashlib.sha256()
    _feed(h, payload)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    kind = type(obj).__name__.encode()
    if isinstance(obj, dict):
        h.update(b"{%s %d" % (kind, len(obj)))
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(b"[%s %d" % (kind, len(obj)))
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{type(obj).__name__} {t.dtype} {tuple(obj.shape)} {obj.requires_grad};".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    elif type(obj) is float:  # the bits: every NaN has the repr "nan"
        h.update(b"float:" + struct.pack("<d", obj) + b";")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def _digest_v1(payload: Any) -> str:
    """The format-1 digest (no types of containers or tensors, no requires_grad, float reprs)."""
    h = hashlib.sha256()
    _feed_v1(h, payload)
    return h.hexdigest()


def _feed_v1(h: Any, obj: Any) -> None:
    if isinstance(obj, dict):
        h.update(b"{%d" % len(obj))
        for k, v in obj.items():
            _feed_v1(h, k)
            _feed_v1(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(b"[%d" % len(obj))
        for v in obj:
            _feed_v1(h, v)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
