"""One owner per run folder (:mod:`tdc_core.run.runlock`): real processes holding real locks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tdc_core.run.runlock import LOCK_NAME, TOKEN_ENV, RunFolderBusy, RunLock, hold_run_folder

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import sys
from tdc_core.run.runlock import RunLock
group = None if sys.argv[2] == "-" else int(sys.argv[2])
lock = RunLock(sys.argv[1], command=sys.argv[3], group=group).acquire()
print("held", flush=True)
sys.stdin.read()  # until the test closes stdin (or kills us)
lock.release()
"""


class Holder:
    """Another process holding the lock of ``root`` (or of one group) until stopped."""

    def __init__(self, root: Path, *, command: str = "tdc run", group: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), "-" if group is None else str(group),
                                      command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**(env or os.environ), "PYTHONPATH": str(ROOT)})
        assert self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)


@pytest.fixture(autouse=True)
def _no_inherited_token(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def test_a_second_owner_is_refused_naming_the_first(tmp_path: Path) -> None:
    holder = Holder(tmp_path, command="tdc run")
    try:
        with pytest.raises(RunFolderBusy) as info:
            RunLock(tmp_path, command="tdc run").acquire()
        message = str(info.value)
        assert message.startswith(f"run folder {tmp_path} is in use by pid {holder.proc.pid} on host ")
        assert message.endswith("(tdc run)") and " since 20" in message
        with pytest.raises(RunFolderBusy):  # a group fine-tune cannot share it with a pipeline either
            RunLock(tmp_path, command="tdc finetune-group", group=0).acquire()
    finally:
        holder.release()
    with hold_run_folder(tmp_path, command="tdc run") as lock:  # free again, and nothing to take over
        assert lock.took_over is None


def test_a_killed_owners_lock_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    holder = Holder(tmp_path, command="tdc run")
    pid = holder.proc.pid
    holder.kill()
    warnings: list[str] = []
    with hold_run_folder(tmp_path, command="tdc run", warn=warnings.append) as lock:
        assert lock.took_over["pid"] == pid
    assert len(warnings) == 1 and f"held by pid {pid}" in warnings[0] and "which is gone" in warnings[0]
    assert (tmp_path / LOCK_NAME).read_text() == "", "released cleanly: no record left"


def test_group_fine_tunes_share_the_folder_one_process_per_group(tmp_path: Path) -> None:
    g0 = Holder(tmp_path, command="tdc finetune-group --group 0", group=0)
    try:
        with hold_run_folder(tmp_path, command="tdc finetune-group --group 1", group=1):
            pass  # another group: fine
        with pytest.raises(RunFolderBusy, match=rf"group 0 of run folder .* is in use by pid {g0.proc.pid}"):
            RunLock(tmp_path, command="x", group=0).acquire()
        with pytest.raises(RunFolderBusy, match=rf"is in use by pid {g0.proc.pid} .*--group 0"):
            RunLock(tmp_path, command="tdc run").acquire()
    finally:
        g0.release()


def test_workers_of_the_owner_act_under_its_lock(tmp_path: Path) -> None:
    with hold_run_folder(tmp_path, command="tdc run") as lock:
        token = os.environ[TOKEN_ENV]  # what the owner's worker processes inherit
        worker = Holder(tmp_path, command="tdc finetune-group --group 2", group=2,
                        env={**os.environ, TOKEN_ENV: token})
        worker.release()
        stranger = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        with pytest.raises(subprocess.CalledProcessError):
            subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path), "3", "x"], input="", check=True,
                           capture_output=True, text=True, env={**stranger, "PYTHONPATH": str(ROOT)}, timeout=60)
        assert lock.took_over is None
    assert TOKEN_ENV not in os.environ, "the token leaves with the lock"


def test_wait_takes_the_folder_once_the_owner_is_done(tmp_path: Path) -> None:
    holder = Holder(tmp_path)
    heard: list[str] = []
    released = threading.Event()

    def on_wait(text: str) -> None:
        heard.append(text)
        holder.release()  # the owner finishes while we wait
        released.set()

    lock = RunLock(tmp_path, command="tdc run --wait").acquire(wait=True, poll_s=0.05, on_wait=on_wait)
    try:
        assert released.is_set() and len(heard) == 1
        assert heard[0].endswith("; waiting for it") and f"pid {holder.proc.pid}" in heard[0]
    finally:
        lock.release()
