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

import hashlib
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from tdc_core.atomic import atomic_write, atomic_write_bytes
from tdc_core.errors import CheckpointError, WriteError, first_line

__all__ = ["WriteError", "atomic_write_bytes", "load_checkpoint", "payload_digest", "save_checkpoint"]

FORMAT_VERSION = 2
_LEGACY_VERSION = 1  # no mandatory digest; read, never written


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
        atomic_write(path, lambda f: torch.save(body, f), what="checkpoint ")
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
