"""The hand-off store between a pipeline and its group workers: a local folder or any fsspec URL.

A group worker on another machine sees no file of the pipeline's run folder. What it needs (the
run's config, grouping, budgets and the shared model) and what it gives back (its group folder)
travel through a *storage root* instead (``orchestration.storage``)::

    <root>/<run key>/inputs/...                the files a group fine-tune reads, at their paths
                                               in a run folder (config.yaml, grouping/*.json,
                                               checkpoints/last.pt = the shared model)
    <root>/<run key>/inputs/manifest.json      written last: every input and its SHA-256
    <root>/<run key>/groups/group-<g>/...      a finished group's folder (result.json, its
                                               checkpoint, pruning record, metrics)
    <root>/<run key>/groups/group-<g>/manifest.json   written last: the group is finished,
                                               from the inputs named by ``inputs_sha256``

Writes are atomic for a reader: each file is uploaded to a temporary key beside its own and then
moved into place (a rename on a local disk, a server-side copy on object stores), and a manifest
is written only after every file it names. A download is verified against the manifest's SHA-256
before it replaces anything, so a truncated or tampered object is refused, never used.

Here, not in ``tdc_core``: it is an orchestration side effect (files on remote storage).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import socket
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import fsspec
from fsspec.core import url_to_fs
from pydantic import BaseModel, ConfigDict

from tdc_core.errors import CheckpointError, ConfigError, TDCError
from tdc_core.hashing import file_sha256

__all__ = ["Manifest", "RunStore", "StorageError", "bundle_files", "open_store"]

class StorageError(TDCError):
    """The storage root cannot be reached or written, or an object is missing or damaged."""


class Manifest(BaseModel):
    """A bundle's table of contents: relative path → SHA-256 (hex) and size in bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    files: dict[str, tuple[str, int]]
    # For a group's bundle: the digest of the inputs it was made from, and where it ran.
    inputs_sha256: str | None = None
    ran_on: dict[str, str] = {}

    @classmethod
    def of_files(cls, files: dict[str, Path], **extra) -> Manifest:
        """The manifest of local ``files`` (relative path → file)."""
        return cls(files={rel: (file_sha256(p), p.stat().st_size) for rel, p in files.items()}, **extra)

    @property
    def digest(self) -> str:
        """One SHA-256 over every file's path and hash: equal digests, equal bundles."""
        h = hashlib.sha256()
        for rel in sorted(self.files):
            h.update(f"{rel}\0{self.files[rel][0]}\n".encode())
        return h.hexdigest()


def bundle_files(folder: Path, *, skip: Iterable[str] = ()) -> dict[str, Path]:
    """Every file under ``folder`` by its POSIX path relative to it, except those under a
    relative folder in ``skip`` (e.g. scratch space) and temporary files of atomic writes."""
    skipped = tuple(s.rstrip("/") + "/" for s in skip)
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not rel.startswith(skipped) and ".tmp" not in p.name and ".part-" not in p.name:
            out[rel] = p
    return out


def open_store(url: str | os.PathLike) -> RunStore:
    """The store at ``url`` (a local path or an fsspec URL such as ``s3://bucket/prefix``).

    Raises:
        ConfigError: the URL's protocol is unknown or its fsspec implementation is not
            installed (naming ``orchestration.storage`` and the package to install).
    """
    text = str(url)
    try:
        fs, root = url_to_fs(text)
    except (ImportError, ValueError) as exc:
        proto = text.split("://", 1)[0] if "://" in text else "file"
        hint = " (install the s3 extra: pip install 'tdc[s3]')" if proto in {"s3", "s3a"} else ""
        raise ConfigError(f"orchestration.storage={text!r}: no storage for '{proto}://' here: {exc}{hint}") from None
    return RunStore(fs=fs, root=root.rstrip("/"), url=text)


class RunStore:
    """Files under one storage root; keys are POSIX paths relative to it."""

    def __init__(self, *, fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
        self.fs, self.root, self.url = fs, root, url

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ConfigError(f"storage key {key!r} must be a relative path without '..'")
        return f"{self.root}/{key}" if self.root else key

    def url_of(self, key: str) -> str:
        """The object's full URL (for records and error messages)."""
        return self.fs.unstrip_protocol(self._path(key))

    def _io(self, what: str, key: str, exc: BaseException) -> StorageError:
        return StorageError(f"storage {self.url}: cannot {what} {key}: {type(exc).__name__}: {exc}")

    def exists(self, key: str) -> bool:
        try:
            return self.fs.exists(self._path(key))
        except OSError as exc:
            raise self._io("read", key, exc) from None

    def check_writable(self) -> str:
        """Write, read back and delete a small probe object (the pre-run check)."""
        key = f".tdc-probe-{uuid.uuid4().hex}"
        try:
            self.fs.makedirs(self.root, exist_ok=True) if self.root else None
            self.fs.pipe_file(self._path(key), b"tdc")
            ok = self.fs.cat_file(self._path(key)) == b"tdc"
            self.fs.rm_file(self._path(key))
        except Exception as exc:  # noqa: BLE001 - any backend error becomes one line naming the root
            raise StorageError(f"orchestration.storage={self.url!r} cannot be written: {type(exc).__name__}: {exc}") \
                from None
        if not ok:
            raise StorageError(f"orchestration.storage={self.url!r}: an object read back differs from what was written")
        return f"storage {self.url} is writable"

    def put_file(self, local: Path, key: str) -> None:
        """Upload ``local`` to ``key``: to a temporary key first, then moved into place."""
        self._put(key, lambda tmp: self.fs.put_file(str(local), tmp))

    def put_bytes(self, data: bytes, key: str) -> None:
        """Write ``data`` to ``key``: to a temporary key first, then moved into place."""
        self._put(key, lambda tmp: self.fs.pipe_file(tmp, data))

    def _put(self, key: str, write: Callable[[str], object]) -> None:
        """``write(tmp)`` to a temporary key beside ``key``, then move it into place: a reader
        never sees half an object, and a failed write leaves no temporary key behind."""
        final = self._path(key)
        tmp = f"{final}.part-{uuid.uuid4().hex[:12]}"
        try:
            self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
            write(tmp)
            self.fs.mv(tmp, final)
        except Exception as exc:  # noqa: BLE001
            try:
                if self.fs.exists(tmp):
                    self.fs.rm_file(tmp)
            except Exception:  # noqa: BLE001 - the write's own error matters
                pass
            raise self._io("write", key, exc) from None

    def put_bundle(self, files: dict[str, Path], *, prefix: str, inputs_sha256: str | None = None,
                   ran_on: dict[str, str] | None = None) -> Manifest:
        """Upload ``files`` (relative path → local file) under ``prefix``, then its manifest.

        A manifest already there is deleted first, so a reader never pairs a new file with an
        old manifest."""
        manifest = Manifest.of_files(files, inputs_sha256=inputs_sha256, ran_on=ran_on or {})
        self.delete(f"{prefix}/manifest.json")
        for rel, p in files.items():
            self.put_file(p, f"{prefix}/{rel}")
        self.put_bytes(manifest.model_dump_json(indent=1).encode(), f"{prefix}/manifest.json")
        return manifest

    def delete(self, key: str) -> None:
        try:
            if self.fs.exists(self._path(key)):
                self.fs.rm_file(self._path(key))
        except OSError as exc:
            raise self._io("delete", key, exc) from None

    def manifest(self, prefix: str) -> Manifest | None:
        """The bundle's manifest, or None while the bundle is incomplete or absent."""
        key = f"{prefix}/manifest.json"
        try:
            raw = self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._io("read", key, exc) from None
        try:
            return Manifest.model_validate_json(raw)
        except ValueError as exc:
            raise StorageError(f"storage {self.url}: {key} is damaged ({exc.__class__.__name__}); delete it to "
                               f"redo that bundle") from None

    def get_bundle(self, prefix: str, dest: Path, *, only: Iterable[str] | None = None) -> Manifest:
        """Download the bundle under ``prefix`` into ``dest`` (same relative paths), each file
        verified against the manifest's SHA-256 before it replaces anything; ``only`` limits it
        to some of the bundle's paths.

        Raises:
            StorageError: no manifest (the bundle is not finished) or an object is missing.
            CheckpointError: a file's SHA-256 or size differs from its manifest's.
        """
        manifest = self.manifest(prefix)
        if manifest is None:
            raise StorageError(f"storage {self.url}: {prefix} has no manifest.json (not finished or never written)")
        wanted = set(manifest.files) if only is None else set(only)
        for rel in sorted(wanted):
            if rel not in manifest.files:
                raise StorageError(f"storage {self.url}: {prefix}/manifest.json lists no {rel}")
            digest, size = manifest.files[rel]
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f"{out.name}.part-{uuid.uuid4().hex[:12]}")
            try:
                self.fs.get_file(self._path(f"{prefix}/{rel}"), str(tmp))
                got, got_size = file_sha256(tmp), tmp.stat().st_size
                if (got, got_size) != (digest, size):
                    raise CheckpointError(
                        f"{self.url_of(f'{prefix}/{rel}')} is damaged: SHA-256 {got[:12]}… ({got_size} bytes), its "
                        f"manifest says {digest[:12]}… ({size} bytes); it was not used")
                os.replace(tmp, out)
            except FileNotFoundError:
                raise StorageError(f"storage {self.url}: {prefix}/{rel} is listed in its manifest but missing") \
                    from None
            except OSError as exc:
                raise self._io("read", f"{prefix}/{rel}", exc) from None
            finally:
                tmp.unlink(missing_ok=True)
        return manifest

    def read_json(self, key: str) -> dict:
        try:
            return json.loads(self.fs.cat_file(self._path(key)))
        except FileNotFoundError:
            raise StorageError(f"storage {self.url}: {key} does not exist") from None
        except (OSError, ValueError) as exc:
            raise self._io("read", key, exc) from None


def host_identity(work_dir: Path) -> dict[str, str]:
    """Where a bundle was made: host, process and local work folder (shown in the run's record)."""
    return {"host": socket.gethostname(), "pid": str(os.getpid()), "work_dir": str(work_dir)}
