"""The deployment files: Prefect deployments, worker image, compose stack (linted, not built)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_declares_the_three_deployments():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"full-pipeline", "scheduled-retraining", "cpu-smoke"}
    for d in deps.values():
        path, func = d["entrypoint"].split(":")
        assert (ROOT / path).is_file() and f"def {func}(" in (ROOT / path).read_text()
    assert deps["full-pipeline"]["work_pool"]["name"] == "gpu"
    (schedule,) = deps["scheduled-retraining"]["schedules"]
    assert schedule["active"] is False and schedule["cron"]
    assert deps["cpu-smoke"]["parameters"]["preset"] == "smoke"


def test_compose_binds_localhost_by_default():
    spec = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert {"prefect-server", "mlflow", "worker"} <= set(spec["services"])
    ports = [p for s in spec["services"].values() for p in s.get("ports", [])]
    assert ports and all(p.startswith("${TDC_BIND:-127.0.0.1}:") for p in ports)
    gpu = spec["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_dockerfile_passes_hadolint():
    out = subprocess.run(["hadolint", str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
