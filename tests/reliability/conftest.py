"""Fixtures for the fault tests: one real Prefect server for the session (started once, ~20 s,
instead of a temporary in-process one per pipeline launch), and pipeline launches as
subprocesses in their own process group, so a test can SIGKILL a run with its group workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.servers import free_port, stop_process_groups, wait_http

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent




@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``PREFECT_API_URL`` of a real Prefect server on 127.0.0.1 (a free port), torn down after."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    log = (home / "server.log").open("w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", timeout=180, proc=proc)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop_process_groups([proc], grace_s=20)
        log.close()


@dataclass
class Pipeline:
    """``tdc run`` on one run folder and one MLflow store, launched as often as a test likes."""

    tmp: Path
    api_url: str
    overrides: list[str]
    name: str = "run"
    workers: int = 2
    launches: list[float] = field(default_factory=list)  # wall-clock start of each launch

    @property
    def run_dir(self) -> Path:
        return self.tmp / self.name

    @property
    def stage1_dir(self) -> Path:
        """Where its stage 1 (probe, profile, shared model) lives: beside the run folder."""
        from tdc_core.config import load_config
        from tdc_core.run.stage1 import stage1_dir

        return stage1_dir(load_config(preset="smoke", overrides=self.overrides), runs_root=self.tmp)

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.tmp / 'mlflow.db'}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.tmp / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_TRACKING_URI": self.tracking_uri,
                "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def args(self) -> list[str]:
        return [sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--run-dir", str(self.run_dir),
                "--workers", str(self.workers), *self.overrides]

    def start(self) -> subprocess.Popen:
        """Launch in a new session: its group workers share its process group."""
        self.launches.append(time.time())
        log = (self.tmp / f"{self.name}-launch-{len(self.launches)}.log").open("w")
        return subprocess.Popen(self.args(), env=self.env(), cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def log(self, launch: int | None = None) -> str:
        return (self.tmp / f"{self.name}-launch-{launch or len(self.launches)}.log").read_text()

    def run(self, *, timeout: float = 400) -> subprocess.CompletedProcess:
        """One launch to its end; stdout holds its output (stdout and stderr)."""
        proc = self.start()
        try:
            proc.wait(timeout=timeout)
        finally:
            self.kill(proc)
        return subprocess.CompletedProcess(self.args(), proc.returncode, self.log(), "")

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL a launch and everything in its process group (its group fine-tune workers)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.fixture
def pipeline(tmp_path: Path, prefect_api: str):
    """A factory of :class:`Pipeline` on this test's folder and the session's Prefect server."""
    made: list[Pipeline] = []

    def make(overrides: list[str], **kwargs) -> Pipeline:
        p = Pipeline(tmp=tmp_path, api_url=prefect_api, overrides=overrides, **kwargs)
        made.append(p)
        return p

    return make
