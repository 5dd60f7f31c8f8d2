"""Disk full (or any write error) while saving a checkpoint or a JSON artifact: the previous
file survives and still loads, no temp file is left behind, and the error is one line naming
the file and the OS reason."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tdc_core import atomic as atomic_mod
from tdc_core.errors import CheckpointError, TDCError
from tdc_core.records import load_record, save_record
from tdc_core.training.checkpoint import WriteError, load_checkpoint, save_checkpoint

ENOSPC = f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}"


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``limit`` bytes have gone through: the disk
    fills up in the middle of a write, as it does in life."""

    def __init__(self, f, limit: int) -> None:
        self._f, self._left = f, limit

    def write(self, data) -> int:
        n = len(memoryview(data))
        if n > self._left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= n
        return self._f.write(data)

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def _fail_write(monkeypatch: pytest.MonkeyPatch, *, after_files: int = 0, limit: int = 16) -> None:
    """The ``after_files``-th atomic write from now on (0 = the next) and every later one runs
    out of space after ``limit`` bytes."""
    real = os.fdopen
    opened = {"n": 0}

    def fdopen(fd, *args, **kwargs):
        f = real(fd, *args, **kwargs)
        opened["n"] += 1
        return _FullDisk(f, limit) if opened["n"] > after_files else f

    monkeypatch.setattr(atomic_mod.os, "fdopen", fdopen)


def _fail_os_call(monkeypatch: pytest.MonkeyPatch, name: str, err: int) -> None:
    def boom(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(atomic_mod.os, name, boom)


FAULTS: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], str]] = {
    "disk full mid-write": (lambda mp: _fail_write(mp), ENOSPC),
    "fsync I/O error": (lambda mp: _fail_os_call(mp, "fsync", errno.EIO),
                        f"[Errno {errno.EIO}] {os.strerror(errno.EIO)}"),
    "rename refused": (lambda mp: _fail_os_call(mp, "replace", errno.ENOSPC), ENOSPC),
}


def _payload(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((64, 64), float(step))}}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        fault: str) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, _payload(1))
    inject, reason = FAULTS[fault]
    inject(monkeypatch)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, _payload(2))
    monkeypatch.undo()
    assert str(info.value) == f"could not write checkpoint {path}: {reason}"
    assert load_checkpoint(path)["step"] == 1  # the previous checkpoint is intact and loads
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((64, 64), 1.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left


def test_first_checkpoint_failing_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    _fail_write(monkeypatch)
    with pytest.raises(CheckpointError, match=f"could not write checkpoint {path}: .*No space left"):
        save_checkpoint(path, _payload(1))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fault", list(FAULTS))
def test_failed_json_artifact_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            fault: str) -> None:
    from tdc_core.method.budgets import BudgetPlan

    path = tmp_path / "grouping" / "budgets.json"
    plan = BudgetPlan(base_flops=1e6, k=0.5, difficulty_measure="loss", budgets=[])
    save_record(path, plan)
    before = path.read_bytes()
    inject, reason = FAULTS[fault]
    inject(monkeypatch)
    with pytest.raises(WriteError) as info:
        save_record(path, plan.model_copy(update={"base_flops": 2e6}))
    monkeypatch.undo()
    assert str(info.value) == f"could not write {path}: {reason}"
    # A user-facing error (the CLI prints it as one line) that is still an OSError.
    assert isinstance(info.value, TDCError) and isinstance(info.value, OSError)
    assert path.read_bytes() == before and load_record(path, BudgetPlan, what="budget plan") == plan
    assert sorted(p.name for p in path.parent.iterdir()) == ["budgets.json"]


def test_training_stops_with_the_path_when_a_checkpoint_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], one_thread: None,
) -> None:
    """``tdc train``: the disk fills up after the first checkpoint; the command stops with one
    line naming the checkpoint, and the last good checkpoint loads and resumes."""
    from flows.cli import main

    out = tmp_path / "run"
    args = ["train", "--preset", "smoke", "--out-dir", str(out), "--no-samples",
            "train.steps=30", "train.checkpoint_every=10", "train.heldout_every=10"]
    # The command writes config.yaml first, then the step-10 checkpoint; the next one fails.
    _fail_write(monkeypatch, after_files=2)
    code = main(args)
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    ckpt = out / "checkpoints" / "last.pt"
    assert code == 2
    assert err == f"tdc train: error: could not write checkpoint {ckpt}: {ENOSPC}"
    assert load_checkpoint(ckpt)["step"] == 10  # the last good one
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.pt"]
    assert main(args) == 0  # space again: the same command resumes and finishes
    assert "resuming from" in capsys.readouterr().out
    assert load_checkpoint(ckpt)["step"] == 30
