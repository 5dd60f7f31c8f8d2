"""The kill ladder: one pipeline, SIGKILLed (with its group workers) once in each stage in turn,
profiling → shared training → pruning → group fine-tuning → evaluation, and re-launched after
each kill. The last launch finishes; nothing a killed launch had finished was recomputed
(file times), the MLflow run tree has no duplicates, and every metric history is complete
with each point exactly once.

Stages are recognised by files each launch writes into the run folder (newer than the launch).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tdc_core.errors import CheckpointError
from tdc_core.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

# Long enough for each stage to be caught (checkpoints every 20 steps), short enough for CI.
# Two groups: one at full width, one pruned first; with two workers they run side by side.
TRAIN, PROBE, FINETUNE, BASELINE, LOG_EVERY, HELDOUT_EVERY = 120, 40, 60, 20, 5, 20
SEEDS = [0, 1, 2]
OVERRIDES = [f"train.steps={TRAIN}", "train.checkpoint_every=20", f"train.heldout_every={HELDOUT_EVERY}",
             f"train.log_every={LOG_EVERY}", f"profile.profile_steps={PROBE}", f"finetune.steps={FINETUNE}",
             "grouping.num_groups=2", f"baseline.steps={BASELINE}", f"eval.seeds={SEEDS}"]


def _step(path: Path) -> int | None:
    try:
        return int(load_checkpoint(path)["step"])
    except CheckpointError:
        return None


def _newer(path: Path, t: float) -> bool:
    try:
        return path.stat().st_mtime > t
    except FileNotFoundError:
        return False


def _kill_when(p, proc: subprocess.Popen, stage: str, seen: Callable[[float], str | None]) -> str:
    """Poll until ``seen(launch_time)`` names what it saw, then SIGKILL the launch's process group."""
    t0, deadline = p.launches[-1], time.time() + 300
    try:
        while True:
            what = seen(t0)
            if what:
                return what
            assert proc.poll() is None, f"launch {len(p.launches)} ended before {stage}:\n{p.log()[-3000:]}"
            assert time.time() < deadline, f"{stage} never seen"
            time.sleep(0.05)
    finally:
        p.kill(proc)


def _stamps(paths) -> dict[Path, int]:
    return {q: q.stat().st_mtime_ns for q in paths if q.exists()}


def test_killed_in_every_stage_the_rerun_finishes_without_redoing_anything(pipeline) -> None:
    p = pipeline(OVERRIDES)
    run = p.run_dir
    stage1 = p.stage1_dir
    shared = stage1 / "checkpoints" / "last.pt"
    group_ckpt = lambda g: run / "groups" / f"group-{g}" / "checkpoints" / "last.pt"  # noqa: E731
    result = lambda g: run / "groups" / f"group-{g}" / "result.json"  # noqa: E731
    finished: dict[Path, int] = {}
    kills: dict[str, str] = {}

    # 1. Profiling: the probe (the start of shared training) has checkpointed, no profile yet.
    kills["profiling"] = _kill_when(p, p.start(), "profiling", lambda t0: (
        f"probe at step {s}" if (s := _step(shared)) is not None and s <= PROBE
        and not (stage1 / "profile" / "profile.json").exists() else None))

    # 2. Shared training: past the probe, checkpointed by this launch.
    kills["shared training"] = _kill_when(p, p.start(), "shared training", lambda t0: (
        f"shared at step {s}" if _newer(shared, t0) and (run / "grouping" / "budgets.json").exists()
        and (s := _step(shared)) is not None and PROBE < s < TRAIN else None))
    finished |= _stamps([stage1 / "profile" / "profile.json", stage1 / "profile" / "profile.png",
                         *(run / "grouping").glob("*")])

    # 3. Pruning: a group below F has started its search in this launch, not finished it.
    budgets = json.loads((run / "grouping" / "budgets.json").read_text())["budgets"]
    pruned = [b["group"] for b in budgets if b["fraction"] < 1.0]
    groups = range(len(budgets))
    assert pruned, budgets

    def pruning(t0: float) -> str | None:
        for g in pruned:
            prune = run / "groups" / f"group-{g}" / "prune"
            work = prune / "work"
            if (work.is_dir() and any(_newer(d, t0) for d in work.iterdir())
                    and not (prune / "memory.json").exists()):
                return f"group {g} pruning"
        return None

    kills["pruning"] = _kill_when(p, p.start(), "pruning", pruning)
    finished |= _stamps([shared, *(q for g in groups if result(g).exists() for q in (result(g), group_ckpt(g)))])

    # 4. Group fine-tuning: a group has checkpointed mid fine-tune in this launch.
    def finetuning(t0: float) -> str | None:
        for g in groups:
            if _newer(group_ckpt(g), t0) and not result(g).exists() and 0 < (_step(group_ckpt(g)) or 0) < FINETUNE:
                return f"group {g} fine-tuning at step {_step(group_ckpt(g))}"
        return None

    kills["fine-tuning"] = _kill_when(p, p.start(), "fine-tuning", finetuning)
    finished |= _stamps([*(q for g in groups if result(g).exists() for q in (result(g), group_ckpt(g))),
                         # A pruning search is committed by the group's step-0 checkpoint.
                         *(q for g in pruned if group_ckpt(g).exists()
                           for q in (run / "groups" / f"group-{g}" / "prune").glob("*.*"))])

    # 5. Evaluation: the ensemble's samples are scored, the comparison is not written yet.
    kills["evaluation"] = _kill_when(p, p.start(), "evaluation", lambda t0: (
        "evaluating" if _newer(run / "eval" / "tdc-samples.png", t0)
        and not (run / "eval" / "comparison.json").exists() else None))
    assert all(result(g).exists() for g in groups)
    finished |= _stamps([*(result(g) for g in groups), *(group_ckpt(g) for g in groups),
                         run / "baseline" / "checkpoints" / "last.pt"])

    # 6. The last launch finishes.
    done = p.run()
    assert done.returncode == 0, f"{kills}\n{done.stdout[-3000:]}"
    assert "Traceback" not in done.stdout
    assert (run / "eval" / "comparison.json").exists() and (run / "report.md").exists()
    changed = [str(q.relative_to(run)) for q, t in finished.items() if q.stat().st_mtime_ns != t]
    assert not changed, f"recomputed after {kills}: {changed}"
    _assert_run_tree_complete(p.tracking_uri, pruned=pruned, num_groups=len(budgets))


def _assert_run_tree_complete(uri: str, *, pruned: list[int], num_groups: int) -> None:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tdc").experiment_id], max_results=1000)
    names = Counter(r.info.run_name for r in runs)
    expected = {"tdc-smoke", "tdc-smoke-baseline", "profile", "group", "shared-train",
                *(f"group-{g}" for g in range(num_groups))}
    assert names == Counter(expected), names  # each run once: nothing duplicated
    assert all(r.info.status == "FINISHED" for r in runs), {r.info.run_name: r.info.status for r in runs}
    by_name = {r.info.run_name: r for r in runs}

    def steps(name: str, key: str) -> list[int]:
        return [m.step for m in client.get_metric_history(by_name[name].info.run_id, key)]

    # Every metric of every run: one point per step, never two.
    for r in runs:
        for key in r.data.metrics:
            dup = [s for s, n in Counter(steps(r.info.run_name, key)).items() if n > 1]
            assert not dup, f"{r.info.run_name}/{key} logged twice at steps {dup}"
    # And complete, however the kills cut the training.
    assert sorted(steps("profile", "probe_loss")) == list(range(LOG_EVERY, PROBE + 1, LOG_EVERY))
    assert sorted(steps("shared-train", "loss")) == list(range(PROBE + LOG_EVERY, TRAIN + 1, LOG_EVERY))
    assert sorted(steps("shared-train", "heldout_loss")) == [*range(PROBE + HELDOUT_EVERY, TRAIN, HELDOUT_EVERY),
                                                             TRAIN]
    for g in range(num_groups):
        assert sorted(steps(f"group-{g}", "loss")) == list(range(LOG_EVERY, FINETUNE + 1, LOG_EVERY)), g
        assert "flops" in by_name[f"group-{g}"].data.metrics
    for g in pruned:
        assert sorted(steps(f"group-{g}", "prune_flops_fraction")) == [1, 2]  # smoke: 2 rounds
    assert sorted(steps("tdc-smoke-baseline", "loss")) == list(range(LOG_EVERY, BASELINE + 1, LOG_EVERY))
    assert sorted(steps("tdc-smoke", "fid_per_seed")) == SEEDS
    assert len(steps("profile", "bucket_loss_mean")) == 10  # smoke: 10 buckets
