"""Real servers in tests: a free local port, waiting until a URL answers, stopping them after."""

from __future__ import annotations

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


def stop_process_groups(procs: list[subprocess.Popen], *, grace_s: float) -> None:
    """SIGTERM the process group of every process still running (last started first, so that
    workers go before their servers), wait up to ``grace_s`` seconds for each, then SIGKILL the
    group of any that has not exited. Each process must have been started with
    ``start_new_session=True``, so its group holds it and its children only."""
    for p in reversed(procs):
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def _signal_group(p: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:  # exited between the check and the signal
        pass
