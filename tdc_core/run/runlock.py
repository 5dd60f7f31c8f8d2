"""One owner per run folder: an advisory lock with the owner's pid, host and start time.

Two pipelines on one run folder would train every stage twice and write the same checkpoints
at once. A command that writes a run folder takes its lock first:

- the pipeline (``tdc run``, the flow ``tdc``) and the whole-folder stages (``tdc profile``,
  ``tdc group``, ``tdc train``) take it **exclusively**;
- ``tdc finetune-group`` takes it **shared**, plus its own group's lock exclusively, so that
  several groups of one run can be fine-tuned by hand at once, each in its own process.

A second owner is refused with ``run folder R is in use by pid N on host H since T`` (a
:class:`RunFolderBusy`, one line), or waits for the folder with ``wait=True``.

The lock is ``fcntl.flock`` on ``<folder>/.tdc-lock``: the kernel drops it when its process
dies, however it dies (SIGKILL included), so a lock is never left behind; the JSON inside
says who holds it. Finding the file naming a process that is gone means its owner was
killed: the new owner takes over and says so (:attr:`RunLock.took_over`).

Worker processes of an owner (group fine-tunes, ``torchrun`` ranks) act under its lock: the
owner puts its token in the environment variable ``TDC_RUN_LOCK_TOKEN``, which they inherit;
a command that finds the folder held by the owner whose token it carries goes ahead.

``flock`` is reliable on local disks. On network file systems it depends on the server; run
folders shared between machines should not rely on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from tdc_core.errors import TDCError
from tdc_core.run.layout import RunLayout

__all__ = ["LOCK_NAME", "TOKEN_ENV", "RunFolderBusy", "RunLock", "hold_run_folder"]

LOCK_NAME = ".tdc-lock"
TOKEN_ENV = "TDC_RUN_LOCK_TOKEN"


class RunFolderBusy(TDCError):
    """Another process owns the run folder."""


class RunLock:
    """The lock of one run folder (``group=None``) or of one group's folder within it.

    Args:
        root: the run folder; created if missing.
        command: what the owner runs, recorded for the message others see (e.g. ``tdc run``).
        group: for a group fine-tune: hold ``root`` shared and ``groups/group-<g>`` exclusively.
    """

    def __init__(self, root: str | Path, *, command: str, group: int | None = None) -> None:
        self.root = Path(root)
        self.command = command
        self.group = group
        self.took_over: dict | None = None  # the vanished owner's record, when its lock was taken over
        self.delegated = False              # acting under an owner's token (no lock of our own on root)
        self._files: list[tuple] = []   # (open lock file, whether our record is in it)
        self._token: str | None = None
        self._outer_token: str | None = None  # an enclosing lock's token, given back on release

    # --- taking and releasing ------------------------------------------------------------------

    def acquire(self, *, wait: bool = False, poll_s: float = 1.0,
                on_wait: Callable[[str], None] | None = None) -> RunLock:
        """Take the lock, or raise :class:`RunFolderBusy` (``wait=False``), or wait for it
        (``on_wait`` is called once with the busy message).

        Raises:
            RunFolderBusy: the folder (or the group) is held by another process.
        """
        told = False
        while True:
            try:
                self._try_acquire()
                return self
            except RunFolderBusy as busy:
                if not wait:
                    raise
                if on_wait is not None and not told:
                    on_wait(f"{busy}; waiting for it")
                    told = True
                time.sleep(poll_s)

    def release(self) -> None:
        """Give the lock back. A record is emptied first: a record left in the file means its
        owner died holding it (a taken-over lock is reported as such)."""
        for f, claimed in reversed(self._files):
            with contextlib.suppress(OSError):
                if claimed:
                    f.seek(0)
                    f.truncate()
                    f.flush()
                fcntl.flock(f, fcntl.LOCK_UN)
            f.close()
        self._files = []
        if self._token is not None and os.environ.get(TOKEN_ENV) == self._token:
            if self._outer_token is None:
                os.environ.pop(TOKEN_ENV, None)
            else:  # a lock taken inside another (a stage-1 folder inside a run's): its workers need it back
                os.environ[TOKEN_ENV] = self._outer_token

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # --- internals -----------------------------------------------------------------------------

    def _try_acquire(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        root_file = self.root / LOCK_NAME
        mode = fcntl.LOCK_EX if self.group is None else fcntl.LOCK_SH
        f = _open(root_file)
        if not _flock(f, mode):
            holder = _read(root_file)
            if holder and holder.get("token") and holder.get("token") == os.environ.get(TOKEN_ENV):
                f.close()  # a worker of the owner: it acts under the owner's lock
                self.delegated = True
            else:
                f.close()
                raise RunFolderBusy(self._busy_message(holder))
        else:
            self._files.append((f, self.group is None))
        if self.group is None:
            if not self.delegated:
                self._claim(f, root_file)
            return
        group_file = RunLayout(self.root).group_dir(self.group) / LOCK_NAME
        group_file.parent.mkdir(parents=True, exist_ok=True)
        g = _open(group_file)
        if not _flock(g, fcntl.LOCK_EX):
            holder = _read(group_file)
            g.close()
            self.release()
            raise RunFolderBusy(self._busy_message(holder, what=f"group {self.group} of run folder {self.root}"))
        self._files.append((g, True))
        self._claim(g, group_file)

    def _claim(self, f, path: Path) -> None:
        """Record ourselves as the holder; note a vanished holder whose lock we took over."""
        previous = _read(path)
        if previous and previous.get("pid") != os.getpid():
            self.took_over = previous
        self._token = uuid.uuid4().hex
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "since": datetime.now(UTC).isoformat(timespec="seconds"), "token": self._token}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(record))
        f.flush()
        if path.parent == self.root:
            self._outer_token = os.environ.get(TOKEN_ENV)
            os.environ[TOKEN_ENV] = self._token  # inherited by this owner's worker processes

    def _busy_message(self, holder: dict | None, *, what: str | None = None) -> str:
        what = what or f"run folder {self.root}"
        if holder and _alive(holder):
            return (f"{what} is in use by pid {holder.get('pid')} on host {holder.get('host')} since "
                    f"{holder.get('since')} ({holder.get('command')})")
        # Held, but not by the process the file names: shared holders (group fine-tunes) write
        # their records into their group folders.
        for group_lock in sorted(RunLayout(self.root).groups_dir.glob(f"group-*/{LOCK_NAME}")):
            rec = _read(group_lock)
            if rec and _alive(rec):
                return (f"{what} is in use by pid {rec.get('pid')} on host {rec.get('host')} since "
                        f"{rec.get('since')} ({rec.get('command')})")
        return f"{what} is in use by another process"


@contextlib.contextmanager
def hold_run_folder(root: str | Path, *, command: str, group: int | None = None, wait: bool = False,
                    warn: Callable[[str], None] | None = None) -> Iterator[RunLock]:
    """Hold the run folder's lock for the block; ``warn`` hears of a taken-over stale lock and
    of waiting."""
    lock = RunLock(root, command=command, group=group).acquire(wait=wait, on_wait=warn)
    try:
        if lock.took_over and warn is not None:
            old = lock.took_over
            warn(f"run folder {lock.root} was held by pid {old.get('pid')} on host {old.get('host')} since "
                 f"{old.get('since')} ({old.get('command')}), which is gone; taking it over")
        yield lock
    finally:
        lock.release()


def _open(path: Path):
    return path.open("a+", encoding="utf-8")


def _flock(f, mode: int) -> bool:
    try:
        fcntl.flock(f, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read(path: Path) -> dict | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def _alive(record: dict) -> bool:
    """Whether the process a record names still runs (always assumed for another host)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True
