"""Security: untrusted files never run code, servers listen on 127.0.0.1 unless told otherwise,
secrets stay in the environment, and names from configs cannot point outside their folder."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tdc_core.config import DataConfig, load_config
from tdc_core.errors import CheckpointError, ConfigError, DataError
from tdc_core.run.layout import RunLayout, safe_child
from tdc_core.training.checkpoint import load_checkpoint
from tdc_core.training.data import load_images
from tdc_core.training.trainer import load_model

ROOT = Path(__file__).resolve().parents[2]


# --- a. pickles from files never run code --------------------------------------------------------


class _Shell:
    """Unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    """Unpickling it runs Python (builtins.exec) that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _evil_checkpoints(folder: Path, marker: Path) -> dict[str, Path]:
    """Checkpoint files that run code when unpickled, in every format torch.load accepts."""
    files = {
        "zip-nested": ({"format_version": 1, "step": 1, "config": {"x": _Shell(marker)}}, {}),
        "zip-in-weights": ({"format_version": 1, "ema": {"w": _Exec(marker)}}, {}),
        "legacy-format": ({"format_version": 1, "step": _Shell(marker)}, {"_use_new_zipfile_serialization": False}),
    }
    out = {}
    for name, (payload, kwargs) in files.items():
        out[name] = folder / f"{name}.pt"
        torch.save(payload, out[name], pickle_module=pickle, **kwargs)
    out["bare-pickle"] = folder / "bare-pickle.pt"
    out["bare-pickle"].write_bytes(pickle.dumps(_Shell(marker), protocol=2))
    return out


def test_the_evil_checkpoints_are_live(tmp_path: Path) -> None:
    """Control: each payload does run when loaded the unsafe way, so the refusals below mean it."""
    for name, path in _evil_checkpoints(tmp_path, tmp_path / "marker").items():
        (tmp_path / "marker").unlink(missing_ok=True)
        if name == "bare-pickle":
            pickle.loads(path.read_bytes())
        else:
            torch.load(path, weights_only=False)
        assert (tmp_path / "marker").exists(), name


@pytest.mark.parametrize("loader", ["load_checkpoint", "load_model", "resume"])
def test_checkpoint_carrying_code_is_refused_and_not_run(tmp_path: Path, loader: str) -> None:
    from tdc_core.diffusion.gaussian import Diffusion
    from tdc_core.training.trainer import Trainer, init_model, spec_for

    marker = tmp_path / "marker"
    cfg = load_config(preset="smoke", overrides=["train.steps=1", "profile.profile_steps=0"])
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    loaders = {
        "load_checkpoint": load_checkpoint,
        "load_model": load_model,
        "resume": Trainer(model=init_model(spec_for(cfg), seed=cfg.train.seed),
                          diffusion=Diffusion.from_config(cfg.diffusion), config=cfg,
                          train_images=images, heldout_images=images).resume,
    }
    for name, path in _evil_checkpoints(tmp_path, marker).items():
        with pytest.raises(CheckpointError) as err:
            loaders[loader](path)
        assert str(path) in str(err.value) and "\n" not in str(err.value), name
        assert not marker.exists(), f"{name} ran its payload in {loader}"


def test_cli_sample_refuses_a_checkpoint_carrying_code(tmp_path: Path) -> None:
    """As a user meets it: `tdc sample --checkpoint evil.pt` exits 2 with one line, runs nothing."""
    marker = tmp_path / "marker"
    evil = _evil_checkpoints(tmp_path, marker)["zip-nested"]
    r = subprocess.run([sys.executable, "-m", "flows.cli", "sample", "--checkpoint", str(evil),
                        "--out", str(tmp_path / "grid.png")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1 and str(evil) in r.stderr
    assert "refused" in r.stderr
    assert not marker.exists() and not (tmp_path / "grid.png").exists()


def _cifar_payloads(marker: Path) -> dict[str, bytes]:
    """data_batch_* files that run code when unpickled: at top level, inside the dict, inside the
    array's place, in protocol 0 (GLOBAL opcode) and 5, and one naming a numpy function that is
    not an array constructor."""
    return {
        "top-level": pickle.dumps(_Shell(marker), protocol=2),
        "in-data": pickle.dumps({b"data": _Exec(marker), b"labels": [0]}, protocol=4),
        "protocol-0": pickle.dumps({b"data": _Shell(marker)}, protocol=0),
        "protocol-5": pickle.dumps([{b"data": _Shell(marker)}], protocol=5),
        "numpy-other": b"cnumpy\nsave\n(S'" + str(marker).encode() + b"'\nI0\ntR.",  # numpy.save(marker, 0)
    }


def test_the_evil_cifar_batches_are_live(tmp_path: Path) -> None:
    """Control: plain pickle.loads runs each payload."""
    for name, raw in _cifar_payloads(tmp_path / "marker").items():
        for m in tmp_path.glob("marker*"):
            m.unlink()
        pickle.loads(raw)
        assert list(tmp_path.glob("marker*")), name


@pytest.mark.parametrize("name", sorted(_cifar_payloads(Path("m"))))
def test_cifar_batch_carrying_code_is_refused_and_not_run(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(_cifar_payloads(tmp_path / "marker")[name])
    with pytest.raises(DataError) as err:
        load_images(DataConfig(source="cifar10", path=folder, image_size=32, channels=3))
    assert "data_batch_1" in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.glob("marker*"))


def test_npz_with_pickled_objects_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    arr = np.empty(1, dtype=object)
    arr[0] = _Shell(marker)
    np.savez(tmp_path / "evil.npz", images=arr)
    for source in ("npz", "imagenet64"):
        with pytest.raises(DataError, match="evil.npz"):
            load_images(DataConfig(source=source, path=tmp_path / "evil.npz", image_size=8))
    assert not marker.exists()
    np.load(tmp_path / "evil.npz", allow_pickle=True)["images"]  # control: live when allowed
    assert marker.exists()


# --- b. servers bind 127.0.0.1 unless configured -----------------------------------------------

_LOCAL = {"127.0.0.1", "localhost", "::1", "${TDC_BIND:-127.0.0.1}"}


def test_compose_publishes_ports_on_localhost_only() -> None:
    """Inside a container a server must listen on 0.0.0.0 to be reachable at all; what reaches
    the host is the published port, which binds 127.0.0.1 unless TDC_BIND says otherwise."""
    spec = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    published = 0
    for name, service in spec["services"].items():
        assert service.get("network_mode") != "host", f"{name} shares the host network"
        for port in service.get("ports", []):
            if isinstance(port, dict):  # long syntax
                host_ip = port.get("host_ip")
            else:
                parts = str(port).rsplit(":", 2)
                host_ip = parts[0] if len(parts) == 3 else None  # "4200:4200" binds every interface
            assert host_ip in _LOCAL, f"{name} publishes {port!r} beyond localhost"
            published += 1
    assert published >= 2  # the Prefect and MLflow UIs


def _text_files() -> list[Path]:
    skip = {".venv", ".git", "__pycache__", ".hypothesis", ".pytest_cache", "runs", "node_modules"}
    suffixes = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".cfg", ".txt", ".json"}
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip]  # never descend into the virtualenv
        out += [Path(folder, f) for f in files if Path(f).suffix in suffixes or f in {"Dockerfile", "Makefile"}]
    return out


_SERVER = re.compile(r"(prefect\W+server\W+start|mlflow\W+(?:server|ui)\b|uvicorn|http\.server|serve_forever|"
                     r"HTTPServer\(|\.bind\()")
# 0.0.0.0, "::", any --host but 127.0.0.1/localhost, and Python's ("", port) for "every interface".
_WIDE = re.compile(r"0\.0\.0\.0|(?<![\w.])::(?![\w:])|--host[= ,\"']+(?!127\.0\.0\.1|localhost)[\w.$]"
                   r"|\(\s*(?:\"\"|'')\s*,\s*\w")


def test_every_server_the_project_starts_binds_localhost_by_default() -> None:
    """README, CLI hints, deployments, tests...: a line that starts a server names no wider address
    than 127.0.0.1 (no --host, which defaults to 127.0.0.1 for prefect and mlflow, is fine). The
    one exception is a container's own command in docker/compose.yaml (see the test above)."""
    found = 0
    for path in _text_files():
        rel = path.relative_to(ROOT).as_posix()
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            window = "\n".join(lines[i:i + 3])  # a command's arguments may continue on the next lines
            if not _SERVER.search(line):
                continue
            found += 1
            if rel == "docker/compose.yaml" or rel == "tests/reliability/test_security.py":
                continue
            assert not _WIDE.search(window), f"{rel}:{i + 1} starts a server on a wide address: {line.strip()}"
    assert found >= 5  # README's prefect/mlflow commands, the CLI's hint, the test servers
    for path in _text_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel in ("docker/compose.yaml", "tests/reliability/test_security.py"):
            continue
        text = path.read_text(errors="replace")
        assert not re.search(r"(PREFECT_SERVER_API_HOST|MLFLOW_HOST)\W+0\.0\.0\.0", text), rel


# --- c. secrets stay in the environment ----------------------------------------------------------

SENTINELS = {
    "TDC_TEST_LLM_SECRET": "sk-tdc-SENTINEL-llm-7f3a9c",  # named by prune.llm_api_key_env below
    "MLFLOW_TRACKING_PASSWORD": "SENTINEL-mlflow-password-51d2",
    "MLFLOW_TRACKING_TOKEN": "SENTINEL-mlflow-token-a8e4",
    "AWS_SECRET_ACCESS_KEY": "SENTINEL-aws-secret-c90b",
}


def _scan(roots: list[Path], texts: dict[str, str]) -> tuple[list[str], int, set[str]]:
    """Where any sentinel occurs (raw bytes, as UTF-16 too) in every file under ``roots`` and in
    ``texts``; also how many files were read and their names."""
    needles = [s.encode() for s in SENTINELS.values()]
    needles += [s.encode("utf-16-le") for s in SENTINELS.values()]
    hits, names, count = [], set(), 0
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                count += 1
                names.add(path.name)
                hits += [f"{path}: {n[:12]!r}" for n in needles if n in data]
    for label, text in texts.items():
        hits += [f"{label}: {s[:12]}" for s in SENTINELS.values() if s in text]
    return hits, count, names


@pytest.mark.slow
def test_secrets_never_reach_params_tags_logs_or_artifacts(tmp_path: Path) -> None:
    """A whole pipeline run (smoke, LLM pruning proxy configured) with API keys and store
    passwords in the environment: afterwards no file it wrote (run folder, MLflow database and
    artifacts, Prefect's home and database, HOME, TMPDIR) and nothing it printed holds one."""
    home, tmp = tmp_path / "home", tmp_path / "tmpdir"
    home.mkdir()
    tmp.mkdir()
    env = {
        "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(home), "TMPDIR": str(tmp),
        "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_USERNAME": "tdc-test", **SENTINELS,
    }
    overrides = [
        "train.steps=12", "profile.profile_steps=6", "finetune.steps=4", "baseline.enabled=false", "eval.enabled=false",
        "prune.proxy=llm", "prune.llm_url=http://127.0.0.1:9/v1",  # nothing listens on port 9
        "prune.llm_api_key_env=TDC_TEST_LLM_SECRET", "prune.llm_timeout_s=2",
        f"eval.cache_dir={tmp_path / 'cache'}",
    ]
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--run-dir",
                        str(tmp_path / "run"), "--workers", "2", "--verbose", *overrides],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]

    # The LLM proxy really ran with the key: it reached for the endpoint (not "key not set")
    # and fell back, recording why, in each pruned group's memory.
    memories = list((tmp_path / "run").rglob("memory.json"))
    assert memories, "no group was pruned: the LLM proxy never ran"
    for memory in memories:
        text = memory.read_text()
        assert "cannot reach the endpoint" in text and "TDC_TEST_LLM_SECRET is not set" not in text

    hits, count, names = _scan([tmp_path], {"stdout": r.stdout, "stderr": r.stderr})
    assert not hits, "secrets leaked:\n" + "\n".join(hits)
    # The scan saw what matters: the MLflow and Prefect databases, artifacts, checkpoints, logs.
    assert count > 40
    assert {"mlflow.db", "prefect.db", "config.yaml", "last.pt", "memory.json"} <= names, sorted(names)
    assert any((tmp_path / "mlartifacts").rglob("*.pt"))
    # Control: the same scan finds a planted secret, in a file and in printed text.
    (tmp_path / "run" / "planted.bin").write_bytes(b"\x00junk" + SENTINELS["AWS_SECRET_ACCESS_KEY"].encode())
    hits, _, _ = _scan([tmp_path], {"stdout": "x" + SENTINELS["MLFLOW_TRACKING_TOKEN"]})
    assert len(hits) == 2 and "planted.bin" in hits[0] and hits[1].startswith("stdout")


# --- d. names that become paths cannot escape their folder ---------------------------------------

_names = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["..", ".", "../x", "a/../../b", "/etc", "~root", "a\\..\\b", "a\x00b", ".hidden", "ok-name.v2",
                     "C:\\x", "a" * 101, "-rf"]),
)


@settings(max_examples=150, deadline=None, database=None)
@given(name=_names)
def test_config_name_is_refused_or_stays_a_single_folder_name(name: str) -> None:
    """The pipeline's default run folder is runs/<name>-<preset>-<hash>."""
    try:
        cfg = load_config(preset="smoke", overrides=[f"name={name}"] if "\n" not in name else [])
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    folder = Path("/runs") / f"{cfg.name}-{cfg.preset}-0123456789"
    assert folder.parent == Path("/runs") and os.path.normpath(folder) == str(folder)
    assert not cfg.name.startswith(".") and re.fullmatch(r"[A-Za-z0-9._-]+", cfg.name)


@settings(max_examples=150, deadline=None, database=None)
@given(name=_names)
def test_safe_child_is_refused_or_one_level_below(name: str) -> None:
    base = Path("/srv/runs")
    try:
        child = safe_child(base, name, what="artifact")
    except ConfigError as exc:
        assert "artifact=" in str(exc) and "\n" not in str(exc)
        return
    assert child.parent == base and os.path.normpath(child) == str(child) and child.name == name


@pytest.mark.parametrize("group", [-1, True, 1.0, "0", "../0", None, 2**70])
def test_group_folders_come_from_non_negative_ints_only(group) -> None:
    layout = RunLayout(Path("/srv/run"))
    if isinstance(group, int) and not isinstance(group, bool) and group >= 0:
        assert layout.group_dir(group).parent == Path("/srv/run/groups")
        return
    with pytest.raises(ConfigError, match="group index"):
        layout.group_dir(group)
    with pytest.raises(ValueError):  # ConfigError is a ValueError: older callers keep working
        layout.group_checkpoint(group)
