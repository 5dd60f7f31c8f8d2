"""A group's worker process dies (SIGKILL, as the OOM killer does): the other groups still
finish, the pipeline fails with one line naming the failed group, and the re-run redoes that
group only: the others' results are not recomputed and no MLflow run is duplicated."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

FINETUNE, LOG_EVERY = 40, 5
OVERRIDES = ["train.steps=20", "profile.profile_steps=10", "train.checkpoint_every=10",
             f"finetune.steps={FINETUNE}", f"train.log_every={LOG_EVERY}", "baseline.enabled=false",
             "eval.enabled=false"]


def _worker_pid(run_dir: Path, group: int) -> int | None:
    """The ``tdc finetune-group`` process of ``group`` in ``run_dir``, found by its command line."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"finetune-group" in argv and str(run_dir).encode() in argv
                and argv[argv.index(b"--group") + 1] == str(group).encode()):
            return int(proc.name)
    return None


def test_a_crashed_group_fails_the_run_by_name_and_only_it_is_redone(pipeline) -> None:
    p = pipeline(OVERRIDES, workers=2)
    run = p.run_dir
    result = lambda g: run / "groups" / f"group-{g}" / "result.json"  # noqa: E731
    proc = p.start()
    deadline = time.time() + 300
    try:
        # Group 1 (pruned first: budget < F) is killed once its pruning search is under way;
        # group 0 runs beside it, group 2 waits for a free worker slot.
        while (pid := _worker_pid(run, 1)) is None or not (run / "groups" / "group-1" / "prune" / "work").is_dir():
            assert proc.poll() is None, p.log()[-3000:]
            assert time.time() < deadline, "group 1 never started"
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        p.kill(proc)
    out = p.log()
    assert proc.returncode == 2, out[-3000:]
    assert ("tdc run: error: 1 of 3 group fine-tunes failed: group 1 fine-tune failed (killed by SIGKILL). "
            "Finished groups [0, 2] are kept; re-run the same command to redo only the failed groups") in out
    # A user-level failure (TDCError) is that one line on the terminal: no Prefect traceback.
    assert "Traceback" not in out and out.count("group 1 fine-tune failed") == 1, out[-3000:]
    assert result(0).is_file() and result(2).is_file() and not result(1).exists()  # the others finished
    client = MlflowClient(p.tracking_uri)
    exp = client.get_experiment_by_name("tdc").experiment_id
    status = {r.info.run_name: r.info.status for r in client.search_runs([exp])}
    assert (status["group-0"], status["group-1"], status["group-2"]) == ("FINISHED", "FAILED", "FINISHED")

    kept = {g: result(g).stat().st_mtime_ns for g in (0, 2)}
    done = p.run()
    assert done.returncode == 0, done.stdout[-3000:]
    assert {g: result(g).stat().st_mtime_ns for g in (0, 2)} == kept  # not recomputed
    assert result(1).is_file()
    runs = client.search_runs([exp])
    names = Counter(r.info.run_name for r in runs)
    assert names == Counter(["tdc-smoke", "profile", "group", "shared-train", "group-0", "group-1", "group-2"])
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        if r.info.run_name.startswith("group-"):
            steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
            assert sorted(steps) == list(range(LOG_EVERY, FINETUNE + 1, LOG_EVERY)), (r.info.run_name, steps)
