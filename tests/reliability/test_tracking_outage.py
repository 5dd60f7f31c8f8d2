"""The MLflow tracking store goes away.

At start: ``tdc run`` fails at once with one line naming the URI (no minutes of MLflow's own
retries, no traceback). Mid-run: metrics are kept, retried and, if the store is still down at
the end of the stage, left in the run folder's backlog and replayed by the next run; MLflow
ends up holding every metric point exactly once, and the training itself is never lost.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

import tasks.stage_tasks as stages
from tasks.tracking import BACKLOG_DIR, MlflowReporter, TrackingRef, check_tracking, open_tracking
from tdc_core.config import load_config
from tdc_core.training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["train.steps=40", "train.log_every=2", "train.checkpoint_every=10", "train.heldout_every=10"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_server_at_start_is_one_line_and_quick(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--run-dir",
                           str(tmp_path / "run")], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip() == (f"tdc run: error: MLflow tracking server {uri} is unreachable: [Errno 111] "
                                   f"Connection refused (start it, or set MLFLOW_TRACKING_URI to a reachable store)")
    assert "Traceback" not in done.stdout + done.stderr
    # Quick without a clock: one request and no retries (MLflow's default retries take about
    # four minutes), refused before Prefect's temporary server started (it creates its database
    # in PREFECT_HOME) and before the run folder existed.
    assert not (tmp_path / "prefect" / "prefect.db").exists()
    assert not (tmp_path / "run").exists()


def test_the_check_leaves_mlflow_retry_settings_as_they_were(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    with pytest.raises(Exception, match="is unreachable"):
        check_tracking(f"http://127.0.0.1:{_closed_port()}")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


class _Outage:
    """Makes ``MlflowClient.log_batch`` calls that carry metrics fail, as a tracking server that
    went down does, while ``down(n)`` is true for the n-th such call (1-based)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, down) -> None:
        self.calls, self.failed, self.down = 0, 0, down
        real = MlflowClient.log_batch

        def log_batch(client, run_id, metrics=(), params=(), tags=(), synchronous=None):
            if metrics:
                self.calls += 1
                if self.down(self.calls):
                    self.failed += 1
                    raise MlflowException(
                        "API request to http://tracking:5000/api/2.0/mlflow/runs/log-batch failed with exception "
                        "HTTPConnectionPool(host='tracking', port=5000): Max retries exceeded (Caused by "
                        "NewConnectionError('Failed to establish a new connection: [Errno 111] Connection refused'))",
                        error_code=TEMPORARILY_UNAVAILABLE)
            return real(client, run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

        monkeypatch.setattr(MlflowClient, "log_batch", log_batch)


class _Recording(MlflowReporter):
    """The real reporter, also remembering every value training reported (the oracle)."""

    reported: list[tuple[str, int]] = []
    options: dict = {}  # constructor options the test imposes (flush size, retry back-off)

    def __init__(self, ref: TrackingRef, run_id: str, **kwargs) -> None:
        super().__init__(ref, run_id, **{**kwargs, **self.options})

    def log_metrics(self, metrics, *, step: int) -> None:
        _Recording.reported += [(f"{self.prefix}{k}", step) for k in metrics]
        super().log_metrics(metrics, step=step)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One real SQLite store for the module (creating one costs seconds); runs are keyed apart."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def shared_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str, one_thread: None):
    """Shared training as the pipeline runs it (the Prefect task's function), on a real SQLite
    store, with the reporter recording what training reported."""
    cfg = load_config(preset="smoke", overrides=STEPS)
    run_dir = tmp_path / "run"
    ref = open_tracking(config=cfg, run_key=tmp_path.name, run_dir=run_dir, tracking_uri=store)
    _Recording.reported, _Recording.options = [], {}
    monkeypatch.setattr(stages, "MlflowReporter", _Recording)

    def run() -> stages.TrainSummary:
        return stages.shared_train_task.fn(cfg, str(run_dir), "uid", ref)

    return cfg, ref, run_dir, run


def _points(ref: TrackingRef) -> tuple[str, Counter]:
    """The shared-train run and how often MLflow holds each of its (metric, step) points."""
    client = ref.client()
    (run,) = client.search_runs([ref.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = "
                                f"'{ref.parent_run_id}' and tags.`tdc.key` = 'stage.shared'")
    counts = Counter()
    for key in run.data.metrics:
        counts.update((key, m.step) for m in client.get_metric_history(run.info.run_id, key))
    return run.info.run_id, counts


def test_metrics_survive_a_mid_run_outage_exactly_once(shared_run, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The store refuses the 2nd and 3rd metric batches and then recovers, mid-training."""
    cfg, ref, run_dir, run = shared_run
    outage = _Outage(monkeypatch, down=lambda n: n in (2, 3))
    _Recording.options = {"flush_every": 3, "retry_after_s": 0.0}
    summary = run()
    assert outage.failed == 2 and summary.step == cfg.train.steps
    _, counts = _points(ref)
    reported = set(_Recording.reported)
    assert len(reported) == len(_Recording.reported) > 50  # training reports each point once
    assert {p: c for p, c in counts.items() if p in reported} == dict.fromkeys(reported, 1)
    assert counts[("final_train_loss", cfg.train.steps)] == 1
    out = capsys.readouterr().out
    assert "is not accepting metrics" in out and "accepts metrics again" in out
    assert not list((run_dir / BACKLOG_DIR).glob("*.jsonl"))  # nothing left behind


def test_metrics_unsent_at_the_end_are_kept_and_replayed_by_the_rerun(
    shared_run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """The store goes down after the first metric batch and stays down past the end of shared
    training: the task fails, but the trained model is kept, the unsent values are counted and
    kept in the run folder, and the re-run (store back) delivers each point exactly once."""
    cfg, ref, run_dir, run = shared_run
    outage = _Outage(monkeypatch, down=lambda n: n >= 2)
    with pytest.raises(MlflowException):
        run()  # the stage's own summary metrics cannot be logged either
    assert outage.failed >= 2
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == cfg.train.steps  # training kept
    run_id, counts = _points(ref)
    reported = set(_Recording.reported)
    sent = {p for p in counts if p in reported}
    backlog = run_dir / BACKLOG_DIR / f"{run_id}.jsonl"
    out = capsys.readouterr().out
    unsent = len(reported - sent)
    assert 0 < unsent and f"warning: {unsent} metric values of MLflow run {run_id} could not be sent" in out
    assert str(backlog) in out and backlog.is_file()

    monkeypatch.undo()  # the store is back
    _Recording.reported = []
    monkeypatch.setattr(stages, "MlflowReporter", _Recording)
    ref2 = open_tracking(config=cfg, run_key=run_dir.parent.name, run_dir=run_dir, tracking_uri=ref.tracking_uri)
    assert ref2.parent_run_id == ref.parent_run_id
    assert f"sent {unsent} metric values that an earlier attempt could not deliver" in capsys.readouterr().out
    assert not backlog.exists()
    summary = stages.shared_train_task.fn(cfg, str(run_dir), "uid", ref2)  # resumes: nothing left to train
    assert summary.step == cfg.train.steps and summary.resumed_from == cfg.train.steps
    _, counts = _points(ref)
    assert {p: c for p, c in counts.items() if p in reported} == dict.fromkeys(reported, 1)
    assert counts[("final_train_loss", cfg.train.steps)] == 1
    # Opening the run folder again sends nothing twice.
    open_tracking(config=cfg, run_key=run_dir.parent.name, run_dir=run_dir, tracking_uri=ref.tracking_uri)
    assert _points(ref)[1] == counts


def test_reporter_counts_what_it_could_not_send_without_a_run_folder(tmp_path: Path, store: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(preset="smoke")
    ref = open_tracking(config=cfg, run_key="no-folder", run_dir=tmp_path / "run", tracking_uri=store)
    ref = ref.model_copy(update={"backlog_dir": None})
    _Outage(monkeypatch, down=lambda n: True)
    reporter = MlflowReporter(ref, ref.parent_run_id, flush_every=2)
    for step in range(1, 6):
        reporter.log_metrics({"a": step, "b": -step}, step=step)
    reporter.close()
    assert reporter.unsent == 10 and reporter.logged == 0


def test_a_backlog_mlflow_refuses_for_good_is_set_aside_not_retried_forever(
    tmp_path: Path, store: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """A journal whose MLflow run was deleted meanwhile: the next run says so, keeps the values
    in a ``.rejected`` file, and carries on."""
    cfg = load_config(preset="smoke")
    run_dir = tmp_path / "run"
    ref = open_tracking(config=cfg, run_key=tmp_path.name, run_dir=run_dir, tracking_uri=store)
    client = ref.client()
    gone = client.create_run(ref.experiment_id, run_name="deleted").info.run_id
    client.delete_run(gone)
    journal = run_dir / BACKLOG_DIR / f"{gone}.jsonl"
    journal.parent.mkdir(parents=True)
    journal.write_text('{"step": 1, "ts": 1, "metrics": {"loss": 0.5}}\n{"step": 2, "ts"')  # torn last line
    open_tracking(config=cfg, run_key=tmp_path.name, run_dir=run_dir, tracking_uri=store)
    assert f"warning: MLflow refused 1 unsent metric values of run {gone}" in capsys.readouterr().out
    assert not journal.exists() and journal.with_suffix(".rejected").is_file()
