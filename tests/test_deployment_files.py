"""The deployment files: Prefect deployments, worker image, compose stack (linted, not built)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_declares_the_four_deployments():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"full-pipeline", "scheduled-retraining", "cpu-smoke", "group"}
    for d in deps.values():
        path, func = d["entrypoint"].split(":")
        assert (ROOT / path).is_file() and f"def {func}(" in (ROOT / path).read_text()
    assert deps["full-pipeline"]["work_pool"]["name"] == "gpu"
    (schedule,) = deps["scheduled-retraining"]["schedules"]
    assert schedule["active"] is False and schedule["cron"]
    assert deps["cpu-smoke"]["parameters"]["preset"] == "smoke"
    # The per-group flow, on the GPU pool, under the name the pipeline submits by default.
    from tdc_core.config import OrchestrationConfig

    assert deps["group"]["entrypoint"] == "flows/group.py:tdc_group" and deps["group"]["work_pool"]["name"] == "gpu"
    assert OrchestrationConfig().group_deployment == "tdc-group/group"
    assert '@flow(name="tdc-group")' in (ROOT / "flows" / "group.py").read_text()


def test_compose_binds_localhost_by_default():
    spec = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = spec["services"]
    assert {"prefect-server", "mlflow", "object-store", "worker-gpu0", "worker-gpu1"} <= set(services)
    ports = [p for s in services.values() for p in s.get("ports", [])]
    assert ports and all(p.startswith("${TDC_BIND:-127.0.0.1}:") for p in ports)
    gpus = [services[w]["deploy"]["resources"]["reservations"]["devices"][0] for w in ("worker-gpu0", "worker-gpu1")]
    assert all(g["capabilities"] == ["gpu"] for g in gpus) and [g["device_ids"] for g in gpus] == [["0"], ["1"]]
    # The workers share the object store and nothing on disk: no volume is mounted by both.
    mounts = [{v.split(":")[0] for v in services[w].get("volumes", [])} for w in ("worker-gpu0", "worker-gpu1")]
    assert not mounts[0] & mounts[1]
    assert all(services[w]["environment"]["AWS_ENDPOINT_URL"] == "http://object-store:9000"
               for w in ("worker-gpu0", "worker-gpu1"))


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_dockerfile_passes_hadolint():
    out = subprocess.run(["hadolint", str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
