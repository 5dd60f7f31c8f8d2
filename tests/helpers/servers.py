"""Real servers in tests: a free local port, waiting until a URL answers, stopping them after."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request

__all__ = ["free_port", "stop_process_groups", "wait_http"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, *, timeout: float, proc: subprocess.Popen) -> None:
    """Wait until ``url`` answers 200, failing early if the server process exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"server for {url} exited early"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} not healthy after {timeout} s")


def stop_process_groups(procs: list[subprocess.Popen], *, grace_s: float, settle_s: float = 60.0) -> None:
    """SIGTERM the process group of every process still running (last started first, so that
    workers go before their servers), wait up to ``grace_s`` seconds for each, then SIGKILL the
    group of any that has not exited; return once no process of these groups runs (children
    included: a signal is delivered asynchronously, so on a loaded machine a child can still be
    running for a moment after its group was signalled). Each process must have been started with
    ``start_new_session=True``, so its group holds it and its children only.

    Raises:
        AssertionError: a process of these groups still runs ``settle_s`` seconds after SIGKILL.
    """
    running = [p for p in procs if p.poll() is None]
    for p in reversed(running):
        _signal_group(p, signal.SIGTERM)
    for p in running:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()
    groups = {p.pid for p in running}  # not an exited one's: its pid may belong to another process by now
    deadline = time.monotonic() + settle_s
    while (left := _running_in(groups)) and time.monotonic() < deadline:
        for pid in left:  # e.g. a child that outlived its parent's SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    assert not left, f"processes {sorted(left)} of groups {sorted(groups)} still run {settle_s} s after SIGKILL"


def _running_in(groups: set[int]) -> list[int]:
    """The pids of processes in ``groups`` that have not exited (zombies have), from /proc (Linux);
    empty where /proc is absent."""
    if not os.path.isdir("/proc"):
        return []
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, ...
        except OSError:  # exited while we looked
            continue
        if fields[0] not in "ZX" and int(fields[2]) in groups:
            pids.append(int(name))
    return pids


def _signal_group(p: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:  # exited between the check and the signal
        pass
