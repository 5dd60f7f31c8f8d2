"""The storage root of distributed runs (tasks/storage.py): bundles by URL, atomic, verified."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.storage import Manifest, StorageError, bundle_files, open_store
from tdc_core.errors import CheckpointError, ConfigError


def _files(root: Path) -> dict[str, Path]:
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "last.pt").write_bytes(bytes(range(256)) * 100)
    (root / "result.json").write_text('{"ok": 1}')
    (root / "prune" / "work").mkdir(parents=True)
    (root / "prune" / "work" / "candidate.pt").write_bytes(b"scratch")
    (root / "prune" / "memory.json").write_text("[]")
    return bundle_files(root, skip=["prune/work"])


@pytest.mark.parametrize("scheme", ["path", "file", "memory"])
def test_a_bundle_comes_back_byte_for_byte_from_any_fsspec_root(tmp_path, scheme):
    files = _files(tmp_path / "src")
    assert set(files) == {"checkpoints/last.pt", "result.json", "prune/memory.json"}  # scratch left out
    url = {"path": str(tmp_path / "store"), "file": f"file://{tmp_path / 'store'}",
           "memory": f"memory://tdc-test-{tmp_path.name}"}[scheme]
    store = open_store(url)
    assert store.manifest("run/g0") is None
    written = store.put_bundle(files, prefix="run/g0", inputs_sha256="abc", ran_on={"host": "h"})
    back = store.get_bundle("run/g0", tmp_path / "dst")
    assert back == written and back.inputs_sha256 == "abc" and back.ran_on == {"host": "h"}
    for rel, p in files.items():
        assert (tmp_path / "dst" / rel).read_bytes() == p.read_bytes()
    assert written.digest == Manifest.of_files(files).digest  # the digest covers paths and contents only
    assert not [p for p in (tmp_path / "dst").rglob("*") if ".part-" in p.name]


def test_a_damaged_object_is_refused_and_never_replaces_a_local_file(tmp_path):
    files = _files(tmp_path / "src")
    store = open_store(tmp_path / "store")
    store.put_bundle(files, prefix="run/g0")
    stored = tmp_path / "store" / "run" / "g0" / "checkpoints" / "last.pt"
    stored.write_bytes(stored.read_bytes()[:-10])  # truncated in the store
    dst = tmp_path / "dst"
    (dst / "checkpoints").mkdir(parents=True)
    (dst / "checkpoints" / "last.pt").write_bytes(b"previous")
    with pytest.raises(CheckpointError, match=r"last\.pt is damaged: SHA-256 .* its manifest says"):
        store.get_bundle("run/g0", dst)
    assert (dst / "checkpoints" / "last.pt").read_bytes() == b"previous"
    assert not [p for p in dst.rglob("*") if ".part-" in p.name]


def test_a_bundle_without_its_manifest_is_not_finished(tmp_path):
    files = _files(tmp_path / "src")
    store = open_store(tmp_path / "store")
    store.put_bundle(files, prefix="run/g0")
    store.delete("run/g0/manifest.json")  # as if the uploader died before its last write
    assert store.manifest("run/g0") is None
    with pytest.raises(StorageError, match="no manifest.json"):
        store.get_bundle("run/g0", tmp_path / "dst")


def test_a_failed_upload_leaves_neither_the_object_nor_its_temporary(tmp_path, monkeypatch):
    store = open_store(tmp_path / "store")
    src = tmp_path / "x.bin"
    src.write_bytes(b"x" * 1000)

    def broken_move(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.fs, "mv", broken_move)
    with pytest.raises(StorageError, match="cannot write a/x.bin: OSError"):
        store.put_file(src, "a/x.bin")
    assert not any((tmp_path / "store").rglob("x.bin*"))


def test_bad_roots_and_keys_are_one_line_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"orchestration.storage='nosuch://x': no storage for 'nosuch://'"):
        open_store("nosuch://x")
    (tmp_path / "afile").write_text("")
    with pytest.raises(StorageError, match="orchestration.storage=.*afile/store.* cannot be written"):
        open_store(tmp_path / "afile" / "store").check_writable()
    store = open_store(tmp_path / "store")
    assert "is writable" in store.check_writable()
    with pytest.raises(ConfigError, match="without '..'"):
        store.put_bytes(b"x", "../escape")
