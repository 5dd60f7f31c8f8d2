"""The real path: a Prefect server, an MLflow server, a work pool, `deploy`, a worker, and
`prefect deployment run tdc/full-pipeline`, all on 127.0.0.1 (free ports), torn down after.

Runs in CI; skip it locally with TDC_SKIP_SERVER_TESTS=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers.servers import free_port, stop_process_groups, wait_http

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("TDC_SKIP_SERVER_TESTS") == "1", reason="TDC_SKIP_SERVER_TESTS=1"),
]




def test_full_pipeline_deployment_on_a_real_server_and_worker(tmp_path):
    pport, mport = free_port(), free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{pport}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mport}",
        "TDC_PROJECT_DIR": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    procs: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, args: list[str]) -> subprocess.Popen:
        out = (logs / f"{name}.log").open("w")
        p = subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=timeout)
        assert r.returncode == 0, f"prefect {' '.join(args)}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        return r

    try:
        server = start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                          "--port", str(pport)])
        mlflow = start("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mport),
                                  "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                                  "--artifacts-destination", str(tmp_path / "mlartifacts"), "--workers", "1"])
        wait_http(f"http://127.0.0.1:{pport}/api/health", timeout=180, proc=server)
        wait_http(f"http://127.0.0.1:{mport}/health", timeout=180, proc=mlflow)
        cli("work-pool", "create", "gpu", "--type", "process")
        cli("work-pool", "create", "cpu", "--type", "process")
        cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml", timeout=180)
        start("worker", [str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--type", "process"])
        params = {"preset": "smoke", "run_dir": str(tmp_path / "run"),
                  "overrides": ["train.steps=12", "profile.profile_steps=6", "finetune.steps=4"]}
        run = cli("deployment", "run", "tdc/full-pipeline", "--params", json.dumps(params), "--watch",
                  "--watch-timeout", "480", timeout=540)
        assert "Completed" in run.stdout + run.stderr

        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        exp = client.get_experiment_by_name("tdc")
        runs = client.search_runs([exp.experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get("tdc.kind") == "pipeline"]
        assert parent.info.status == "FINISHED"
        children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert children == {"profile", "group", "shared-train", "group-0", "group-1", "group-2"}
        assert any(r.data.tags.get("tdc.kind") == "baseline" for r in runs)
        assert "sampling_flops_ratio" in parent.data.metrics
        assert parent.data.tags["prefect.flow_run_id"]
        assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"report.md", "costs.json"}
    finally:
        stop_process_groups(procs, grace_s=5)  # test servers: no need to wait out a graceful shutdown
