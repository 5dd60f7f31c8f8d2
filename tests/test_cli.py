"""The `tdc` command as a user runs it: real subprocesses, real files, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tdc_core.training.trainer import load_model


def tdc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_train_then_sample(tmp_path):
    out = tmp_path / "run"
    r = tdc("train", "--preset", "smoke", "--out-dir", str(out), "train.steps=12", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "trained 12 steps" in r.stdout and "Traceback" not in r.stderr
    ckpt = out / "checkpoints" / "last.pt"
    assert load_model(ckpt).step == 12
    assert (out / "config.yaml").is_file()
    assert Image.open(out / "samples.png").size[0] > 64

    # Same folder again: resumes to the new budget instead of starting over.
    r = tdc("train", "--preset", "smoke", "--out-dir", str(out), "train.steps=12", "--no-samples", cwd=tmp_path)
    assert r.returncode == 0 and "resuming from" in r.stdout

    grid = tmp_path / "grid.png"
    r = tdc("sample", "--checkpoint", str(ckpt), "--out", str(grid), "--num", "9", "--steps", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    img = Image.open(grid)
    assert img.size == (3 * 64 + 4 * 4, 3 * 64 + 4 * 4)  # 3×3 tiles of 8 px ×8, 4 px borders


def test_default_run_folder_is_under_runs(tmp_path):
    r = tdc("train", "--preset", "smoke", "train.steps=10", "--no-samples", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "checkpoints" / "last.pt").is_file()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--preset", "smoke", "train.lr=-1"], "train.lr"),
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "--preset", "smoke", "data.source=npz", "data.path=/no/such.npz"], "/no/such.npz"),
        (["sample", "--checkpoint", "/no/such.pt"], "/no/such.pt does not exist"),
        (["config", "--preset", "smoke", "model.bogus=1"], "model.bogus"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, needle):
    r = tdc(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_config_prints_the_resolved_config(tmp_path):
    r = tdc("config", "--preset", "digits", "train.lr=0.5", cwd=tmp_path)
    assert r.returncode == 0
    assert "lr: 0.5" in r.stdout and "source: digits" in r.stdout
