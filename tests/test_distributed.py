"""Group fine-tunes spread over Prefect workers that share no disk, through an S3 storage root.

A Prefect server, an MLflow server, an S3-compatible server (moto) and process workers, all on 127.0.0.1,
each worker in its own temporary folder (its work folder, temp folder and Prefect home): the only
thing the pipeline and the workers share is the object store. The pipeline itself is `tdc run`
in a third folder, as on a laptop.

Runs in CI; skip it locally with TDC_SKIP_SERVER_TESTS=1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tdc_core.config import load_config
from tests.helpers.servers import free_port, stop_process_groups, wait_http

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OVERRIDES = ["train.steps=12", "profile.profile_steps=6", "finetune.steps=4", "eval.num_samples=16", "eval.seeds=[0]"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("TDC_SKIP_SERVER_TESTS") == "1", reason="TDC_SKIP_SERVER_TESTS=1"),
]


class Cluster:
    """The servers and workers of one test; every process is stopped at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.procs, self.workers = tmp, [], {}
        pport, sport, mport = free_port(), free_port(), free_port()
        self.env = {
            **os.environ,
            "PREFECT_API_URL": f"http://127.0.0.1:{pport}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            # Every flow run here sends a heartbeat each 30 s, so the automation's window can be
            # 90 s (the shipped 300 s allows for Prefect's default of 180 s).
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{sport}",
            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mport}",
            "TDC_PROJECT_DIR": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.ports = (pport, sport, mport)

    def up(self) -> None:
        """Start the Prefect, S3 and MLflow servers; create the pools and deploy."""
        tmp, (pport, sport, mport) = self.tmp, self.ports
        (tmp / "logs").mkdir()
        server = self.start("prefect-server", [BIN / "prefect", "server", "start", "--host", "127.0.0.1",
                                               "--port", str(pport)], env=self._own("server"))
        s3 = self.start("s3", [BIN / "moto_server", "-H", "127.0.0.1", "-p", str(sport)], env=self.env)
        mlflow = self.start("mlflow", [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(mport),
                                       "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                                       "--artifacts-destination", str(tmp / "mlartifacts"), "--workers", "1"],
                            env=self.env)
        wait_http(f"http://127.0.0.1:{pport}/api/health", timeout=180, proc=server)
        wait_http(f"http://127.0.0.1:{mport}/health", timeout=180, proc=mlflow)
        wait_http(f"http://127.0.0.1:{sport}/moto-api/", timeout=60, proc=s3)
        for pool in ("gpu", "cpu"):
            self.prefect("work-pool", "create", pool, "--type", "process")
        self.prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml", timeout=180)

    def _own(self, name: str) -> dict[str, str]:
        """The shared environment with a folder of this process's own as home, work and temp dir."""
        home = self.tmp / name
        for sub in ("prefect", "work", "tmp"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        return {**self.env, "PREFECT_HOME": str(home / "prefect"), "TDC_WORK_DIR": str(home / "work"),
                "TDC_RUNS_DIR": str(home / "runs"), "TMPDIR": str(home / "tmp")}

    def start(self, name: str, args: list, *, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        out = (self.tmp / "logs" / f"{name}.log").open("a")
        p = subprocess.Popen([str(a) for a in args], env=env, cwd=cwd or self.tmp, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def start_worker(self, name: str) -> subprocess.Popen:
        env = self._own(name)
        p = self.start(name, [BIN / "prefect", "worker", "start", "--pool", "gpu", "--type", "process",
                              "--limit", "1", "--name", name], env=env, cwd=self.tmp / name)
        self.workers[name] = p
        return p

    def prefect(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([str(BIN / "prefect"), *args], env=self._own("cli"), cwd=ROOT, capture_output=True,
                           text=True, timeout=timeout)
        assert r.returncode == 0, f"prefect {' '.join(args)}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        return r

    def tdc_run(self, run_dir: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
        env = self._own("laptop")
        return subprocess.run([str(BIN / "tdc"), "run", "--preset", "smoke", "--run-dir", str(run_dir), *OVERRIDES,
                               "orchestration.groups=deployment", "orchestration.storage=s3://tdc-test/runs", *extra],
                              env=env, cwd=self.tmp / "laptop", capture_output=True, text=True, timeout=timeout)

    def close(self) -> None:
        stop_process_groups(self.procs, grace_s=5)  # a test cluster: no need to wait out a graceful shutdown

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.tmp / "logs").iterdir()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.up()  # a failed start still stops what it started (below)
        yield c
    finally:
        c.close()


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant at once, as when its machine dies (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _store():
    import s3fs

    return s3fs.S3FileSystem()


def _manifests(cluster: Cluster) -> dict[str, dict[int, dict]]:
    """Every stored group manifest, by run key and group index."""
    old = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update({k: cluster.env[k] for k in old})
    try:
        fs = _store()
        fs.invalidate_cache()
        out: dict[str, dict[int, dict]] = {}
        for p in fs.glob("tdc-test/runs/*/groups/group-*/manifest.json"):
            run_key, group = p.split("/")[2], int(p.split("group-")[-1].split("/")[0])
            out.setdefault(run_key, {})[group] = json.loads(fs.cat_file(p))
        return out
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_groups_run_as_flow_runs_on_two_workers_sharing_only_an_s3_store(cluster):
    import torch
    from threadpoolctl import threadpool_limits

    from tdc_core.run.layout import RunLayout
    from tdc_core.run.outline import run_stages

    tmp_path = cluster.tmp
    cluster.start_worker("worker-a")
    cluster.start_worker("worker-b")
    run_dir = tmp_path / "laptop" / "run"
    r = cluster.tdc_run(run_dir)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}\n{cluster.logs()}"
    assert "as flow runs of tdc-group/group" in r.stdout

    # Each group ran as its own flow run, on both workers, each in its own folder.
    (manifests,) = _manifests(cluster).values()
    assert sorted(manifests) == [0, 1, 2]
    work_dirs = {m["ran_on"]["work_dir"] for m in manifests.values()}
    assert {Path(w).parents[0] for w in work_dirs} == {tmp_path / "worker-a" / "work", tmp_path / "worker-b" / "work"}
    assert not (run_dir / "store").exists()  # nothing went through the laptop's disk

    # The same config run locally gives the same boundaries, budgets and per-group held-out losses.
    cfg = load_config(preset="smoke", overrides=OVERRIDES)
    local = RunLayout(tmp_path / "local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the pipeline's processes ran (OMP_NUM_THREADS=1): the same arithmetic
    try:
        with threadpool_limits(limits=1):
            done = run_stages(cfg, local, until="finetune")
    finally:
        torch.set_num_threads(threads)
    remote = RunLayout(run_dir)
    assert json.loads(remote.grouping_json.read_text()) == json.loads(local.grouping_json.read_text())
    assert json.loads(remote.budgets_json.read_text()) == json.loads(local.budgets_json.read_text())
    for g in done.groups:
        got = json.loads(remote.group_result(g.group).read_text())
        assert (got["flops"], got["heldout_loss_shared"]) == (g.flops, g.heldout_loss_shared)
        assert got["heldout_loss"] == pytest.approx(g.heldout_loss, rel=1e-5)
        assert remote.group_checkpoint(g.group).is_file()  # downloaded and verified: the router reads it here


def test_a_killed_worker_costs_only_its_group(cluster):
    """Kill a worker (and its processes) mid-fine-tune, start another: the pipeline finishes,
    only the killed group ran twice, every other group once."""
    tmp = cluster.tmp
    for name in ("worker-a", "worker-b"):  # started by the test above, unless it was deselected
        if name not in cluster.workers:
            cluster.start_worker(name)
    import yaml

    automation = yaml.safe_load((ROOT / "deployments" / "automations.yaml").read_text())
    assert automation["trigger"]["within"] > 180  # the shipped window outlasts Prefect's default heartbeat (180 s)
    automation["trigger"]["within"] = 90  # the test's flow runs beat every 30 s (Cluster.env)
    cluster.prefect("automation", "create", "--from-json", json.dumps(automation))
    before = set(_manifests(cluster))
    run_dir = tmp / "laptop" / "run-kill"
    out = (tmp / "logs" / "laptop-kill.log").open("w")
    env = cluster._own("laptop")
    laptop = subprocess.Popen(
        [str(BIN / "tdc"), "run", "--preset", "smoke", "--run-dir", str(run_dir), *OVERRIDES, "train.seed=1",
         "finetune.steps=400", "baseline.enabled=false", "eval.enabled=false", "orchestration.groups=deployment",
         "orchestration.storage=s3://tdc-test/runs"], env=env, cwd=tmp / "laptop", stdout=out, stderr=subprocess.STDOUT)
    try:
        # Wait until worker-a's fine-tune process of this run is writing progress, then kill it all.
        deadline, victim = time.time() + 400, None
        while victim is None and time.time() < deadline and laptop.poll() is None:
            started = [p for p in (tmp / "worker-a" / "work").glob("*/groups/group-*/metrics.jsonl")
                       if p.parents[2].name not in before and p.stat().st_size > 0]
            if started:
                victim, run_key = int(started[0].parent.name.split("-")[1]), started[0].parents[2].name
            time.sleep(0.3)
        assert victim is not None, f"worker-a never started a group of the run\n{cluster.logs()}"
        _kill_tree(cluster.workers["worker-a"].pid)
        assert victim not in _manifests(cluster).get(run_key, {})  # killed before it stored anything
        cluster.start_worker("worker-c")
        assert laptop.wait(timeout=600) == 0, f"{(tmp / 'logs' / 'laptop-kill.log').read_text()[-3000:]}"
    finally:
        if laptop.poll() is None:
            laptop.kill()
    log = (tmp / "logs" / "laptop-kill.log").read_text()
    manifests = _manifests(cluster)[run_key]
    assert sorted(manifests) == [0, 1, 2]
    assert "worker-a" not in manifests[victim]["ran_on"]["work_dir"]  # redone elsewhere
    # Prefect's record: the killed group's flow run crashed and was resubmitted; no other group was.
    runs = _group_flow_runs(cluster, run_key)
    assert sorted(len(v) for v in runs.values()) == [1, 1, 2], runs
    assert sorted(runs[victim]) == ["COMPLETED", "CRASHED"], (runs, log[-2000:])
    assert f"group {victim}: flow run" in log and "No heartbeat" in log and "resubmitting it (retry 1 of 1)" in log
    # Flow runs that kept beating were never crashed (the window outlasts their heartbeats).
    assert all(states.count("CRASHED") == 0 for g, states in runs.items() if g != victim), runs


def _group_flow_runs(cluster: Cluster, run_key: str) -> dict[int, list[str]]:
    """The final state types of each group's flow runs of ``run_key`` on the Prefect server."""
    r = subprocess.run([str(BIN / "python"), "-c", f"""
import json
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
with get_client(sync_client=True) as c:
    runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_={run_key!r})))
    print(json.dumps([[r.name, r.state_type.value] for r in runs]))
"""], env=cluster._own("cli"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out: dict[int, list[str]] = {}
    for name, state in json.loads(r.stdout.strip().splitlines()[-1]):
        if "-group-" in name:
            out.setdefault(int(name.rsplit("-", 1)[1]), []).append(state)
    return out


def test_study_replicates_run_as_flow_runs_and_come_back_through_the_store(cluster):
    """A study with `replicates: deployment`: one flow run of tdc/full-pipeline per replicate, on
    the workers; the study reads their results back from the store and summarises them here."""
    import yaml

    tmp = cluster.tmp
    live = [n for n, p in cluster.workers.items() if p.poll() is None]
    for name in ("worker-d", "worker-e")[: max(0, 2 - len(live))]:
        cluster.start_worker(name)
    live = [n for n, p in cluster.workers.items() if p.poll() is None]
    spec = {"name": "on-workers", "seeds": [0], "replicates": "deployment", "storage": "s3://tdc-test/studies",
            "arms": [{"name": "a", "preset": "smoke", "overrides": OVERRIDES},
                     {"name": "b", "preset": "smoke", "overrides": [*OVERRIDES, "finetune.steps=6"]}]}
    laptop = tmp / "laptop"
    (laptop / "study.yaml").write_text(yaml.safe_dump(spec))
    r = subprocess.run([str(BIN / "tdc"), "study", "study.yaml", "--out-dir", "out"], env=cluster._own("laptop"),
                       cwd=laptop, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}\n{cluster.logs()}"
    assert "2 replicates submitted as flow runs of tdc/full-pipeline" in r.stdout
    study = json.loads((laptop / "out" / "study.json").read_text())
    assert {a["arm"] for a in study["arms"]} == {"a", "b"}
    # Each replicate ran on a worker, in that worker's own runs folder; nothing was trained here.
    ran = {w: sorted((tmp / w / "runs").glob("tdc-smoke-*/summary.json")) for w in live}
    assert sum(len(v) for v in ran.values()) == 2 and all(ran.values()), ran
    replicates = json.loads((laptop / "out" / "replicates.json").read_text())
    for rep in replicates:
        local = Path(rep["run_dir"])
        assert local.is_relative_to(laptop / "runs") and (local / "eval" / "comparison.json").is_file()
    assert not list((laptop / "runs").rglob("*.pt"))
