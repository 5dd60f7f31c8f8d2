"""Content hashes of files: the one SHA-256 every record, manifest and cache key uses.

Read in 4 MiB chunks, so a multi-gigabyte checkpoint is hashed in constant memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["file_sha256"]

_CHUNK_BYTES = 1 << 22


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of the file at ``path``, as 64 lowercase hex characters."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
