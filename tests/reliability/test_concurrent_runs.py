"""Several pipeline runs at once against one MLflow store (one SQLite file, created by whichever
run gets there first) and one Prefect server: every run finishes, every run's metrics are
complete, and nothing crosses over: each run's children, params and tags are its own."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

RUNS, LOG_EVERY = 4, 5
# One torch thread each: four runs (and their group workers) share two cores.
TINY = ["train.steps=20", "profile.profile_steps=10", "finetune.steps=10", f"train.log_every={LOG_EVERY}",
        "grouping.num_groups=2", "baseline.enabled=false", "eval.enabled=false", "train.num_threads=1"]
CHILDREN = {"profile", "group", "shared-train", "group-0", "group-1"}


def test_four_runs_at_once_share_one_store_without_cross_talk(pipeline) -> None:
    runs = [pipeline([f"name=c{i}", f"train.seed={i}", *TINY], name=f"c{i}", workers=2) for i in range(RUNS)]
    procs = [p.start() for p in runs]  # all at once, on a store that does not exist yet
    deadline = time.time() + 400
    try:
        for p, proc in zip(runs, procs):
            proc.wait(timeout=max(1.0, deadline - time.time()))
            assert proc.returncode == 0, f"{p.name}:\n{p.log()[-3000:]}"
            assert "Traceback" not in p.log(), f"{p.name}:\n{p.log()[-3000:]}"
    finally:
        for p, proc in zip(runs, procs):
            p.kill(proc)

    client = MlflowClient(runs[0].tracking_uri)
    exp = client.get_experiment_by_name("tdc").experiment_id
    every = client.search_runs([exp], max_results=1000)
    parents = {r.data.params["name"]: r for r in every if r.data.tags.get("tdc.kind") == "pipeline"}
    assert sorted(parents) == [f"c{i}" for i in range(RUNS)] and len(every) == RUNS * (1 + len(CHILDREN))
    for i, p in enumerate(runs):
        parent = parents[f"c{i}"]
        assert parent.info.status == "FINISHED" and parent.info.run_name == f"c{i}-smoke"
        assert parent.data.params["train.seed"] == str(i)  # its own config, not a neighbour's
        assert parent.data.tags["tdc.run_dir"] == str(p.run_dir)
        children = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert Counter(r.info.run_name for r in children) == Counter(CHILDREN)
        assert all(r.info.status == "FINISHED" for r in children)
        by_name = {r.info.run_name: r for r in children}
        # The grouping its children report is the one in its own run folder.
        boundaries = str(json.loads((p.run_dir / "grouping" / "grouping.json").read_text())["boundaries"])
        assert by_name["group"].data.tags["boundaries"] == parent.data.tags["tdc.boundaries"] == boundaries
        for r in children:
            for key in r.data.metrics:
                steps = Counter(m.step for m in client.get_metric_history(r.info.run_id, key))
                assert max(steps.values()) == 1, (p.name, r.info.run_name, key, steps)
        def hist(name: str, key: str, by_name=by_name) -> list[int]:
            return sorted(m.step for m in client.get_metric_history(by_name[name].info.run_id, key))
        assert hist("profile", "probe_loss") == [5, 10]
        assert hist("shared-train", "loss") == [15, 20]
        assert hist("group-0", "loss") == hist("group-1", "loss") == [5, 10]
        assert "groups_heldout_eps_mse" in parent.data.metrics and "sampling_flops_ratio" in parent.data.metrics
    versions = client.search_model_versions("name = 'tdc-ensemble-smoke'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in parents.values())
