"""Atomic file writes: a crash or a full disk mid-write never leaves a torn file.

The data goes to a temporary file in the same folder, is flushed and fsynced, then renamed over
the target (and the folder fsynced), so the target holds either its previous content or the new
one. A failure is one :class:`WriteError` naming the file and the OS reason. No torch here:
configs, records and plots are written through it as well as checkpoints.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from tdc_core.errors import WriteError, first_line

__all__ = ["atomic_write", "atomic_write_bytes", "probe_writable"]


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


def atomic_write(path: Path, write: Callable[[BinaryIO], object], *, what: str = "") -> None:
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
    atomic_write(Path(path), lambda f: f.write(data))


def probe_writable(path: str | Path) -> Path:
    """The nearest existing folder on the way to ``path`` (which need not exist), after really
    creating and removing a file in it: permissions, read-only mounts and quotas all show.

    Raises:
        NotADirectoryError: that nearest existing entry is a file.
        OSError: the folder refuses a new file.
    """
    folder = Path(path).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(folder))
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".tdc-write-check-"):
        pass
    return folder
