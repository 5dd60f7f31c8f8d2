"""A user's mistake, typed into ``tdc run``, is refused before anything is spent.

Each case runs ``tdc run`` as a user would (a subprocess, no Prefect server configured, so the
command would start Prefect's temporary one) and checks: exit code 2, exactly one line on
stderr naming the field or file, no traceback, and nothing left behind: no run folder, no
checkpoint, no MLflow store, and no Prefect server started (its database in ``PREFECT_HOME``
is created when the temporary server starts, so its absence shows the refusal came first).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "TDC_"))}
    env.update({"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp / "prefect-home"), "OMP_NUM_THREADS": "1",
                "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'store' / 'mlflow.db'}", **extra})
    return env


def tdc_run(tmp: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "run", "--run-dir", str(tmp / "run"), *args],
                          cwd=tmp, env=env or _env(tmp), capture_output=True, text=True, timeout=300)


def assert_refused_cleanly(tmp: Path, done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("tdc run: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp / "run").exists(), "a refused run must not create its run folder"
    assert not (tmp / "store").exists(), "nothing refused may reach MLflow"
    assert not (tmp / "prefect-home" / "prefect.db").exists(), "refused before Prefect's server started"
    assert not list(tmp.rglob("*.pt")), "no checkpoint"


@pytest.fixture
def rgb16(tmp_path: Path) -> Path:
    path = tmp_path / "rgb16.npz"
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (300, 16, 16, 3), dtype=np.uint8))
    return path


RGB16 = ["--preset", "smoke", "data.source=npz", "data.image_size=16", "data.channels=3",
         "model.attention_resolutions=[8]"]


@pytest.mark.parametrize(("args", "needles"), [
    # Seen in the issue: a data path that does not exist.
    (["--preset", "smoke", "data.source=npz", "data.path=/nope.npz"], ["data.path /nope.npz does not exist"]),
    # A key that does not exist, a value out of range.
    (["--preset", "smoke", "train.lrr=1e-3"], ["train.lrr"]),
    (["--preset", "smoke", "grouping.num_groups=0"], ["grouping.num_groups"]),
    # Too few images for a held-out set evaluation can score.
    (["--preset", "smoke", "data.max_images=2"], ["data.heldout_fraction", "at least 2"]),
    # A CUDA device on a machine without one (CI has none).
    (["--preset", "smoke", "train.device=cuda"], ["train.device=cuda"]),
    # The LLM proxy without its key.
    (["--preset", "smoke", "prune.proxy=llm", "prune.llm_url=http://127.0.0.1:9/v1",
      "prune.llm_api_key_env=TDC_TEST_NO_SUCH_KEY"], ["TDC_TEST_NO_SUCH_KEY", "prune.llm_api_key_env"]),
])
def test_a_mistake_is_one_line_before_anything_runs(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    assert_refused_cleanly(tmp_path, tdc_run(tmp_path, *args), *needles)


def test_images_of_the_wrong_size_are_refused_naming_the_file(tmp_path: Path, rgb16: Path) -> None:
    args = ["--preset", "smoke", "data.source=npz", f"data.path={rgb16}", "data.image_size=32", "data.channels=3",
            "model.attention_resolutions=[16]"]
    assert_refused_cleanly(tmp_path, tdc_run(tmp_path, *args), str(rgb16), "16x16", "data.image_size=32")


def test_rgb_data_without_inception_weights_is_refused_before_training(tmp_path: Path, rgb16: Path) -> None:
    """The run would train every stage and only then need Inception at evaluation."""
    from tdc_core.evaluation.features import _cleanfid_default_path

    if _cleanfid_default_path("clean").is_file():
        pytest.skip("this machine has clean-fid's Inception weights in their default place")
    # Downloads go through a proxy that refuses at once: "no internet", deterministically.
    env = _env(tmp_path, https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    done = tdc_run(tmp_path, *RGB16, f"data.path={rgb16}", f"eval.cache_dir={tmp_path / 'cache'}", env=env)
    assert_refused_cleanly(tmp_path, done, "Inception weights", "eval.inception_weights")


def test_a_run_folder_inside_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--run-dir",
                           str(blocker / "run")], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert_refused_cleanly(tmp_path, done, str(blocker), "is a file, not a folder")


def test_an_unwritable_tracking_store_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    env = _env(tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{blocker / 'mlflow.db'}")
    done = tdc_run(tmp_path, "--preset", "smoke", env=env)
    assert_refused_cleanly(tmp_path, done, f"sqlite:///{blocker / 'mlflow.db'}", "cannot be written")
