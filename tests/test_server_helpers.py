"""The helper that stops the test servers: a polite SIGTERM first, SIGKILL for what ignores it,
children included (the server tests rely on it to leave no process behind)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.servers import stop_process_groups

# A parent that starts a child in its own process group, prints the child's pid, then sleeps.
# With IGNORE set, both ignore SIGTERM: only the SIGKILL of the whole group stops them.
_TREE = """
import os, signal, subprocess, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\\n"
                          "if sys.argv[1] == 'ignore': signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
                          "time.sleep(600)", sys.argv[1]])
print(child.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_a_group_that_ignores_sigterm_is_killed_with_its_children_and_a_polite_one_just_exits():
    polite, stubborn = (subprocess.Popen([sys.executable, "-c", _TREE, mode], stdout=subprocess.PIPE, text=True,
                                         start_new_session=True) for mode in ("exit", "ignore"))
    children = [int(p.stdout.readline()) for p in (polite, stubborn)]
    done = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    done.wait()  # already exited: stopping it must not fail
    stop_process_groups([polite, stubborn, done], grace_s=1)
    assert polite.returncode == -15  # SIGTERM was enough
    assert stubborn.returncode == -9  # SIGTERM ignored: SIGKILL after the grace period
    assert not any(_alive(pid) for pid in children), "a child outlived its group"
