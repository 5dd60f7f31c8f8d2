"""MLflow lineage of a pipeline run: one parent run, one child run per stage and per group.

Everything goes through :class:`mlflow.MlflowClient` with explicit run ids, never through
MLflow's thread-local "active run": Prefect runs tasks in worker threads (and groups in
subprocesses), where the active run would be missing or wrong.

Runs are found by tags before they are created, so re-running a failed pipeline with the same
config reuses its parent run and every finished stage's child run: the run tree gets neither
duplicates nor gaps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from pydantic import BaseModel, ConfigDict

from tdc_core.config import PipelineConfig, flatten

__all__ = ["MlflowReporter", "TrackingRef", "default_tracking_uri", "open_tracking"]

EXPERIMENT = "tdc"
_BATCH = 200  # metrics per log_batch call (MLflow accepts up to 1000)


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else a SQLite store ``./mlflow.db`` in the current folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


class TrackingRef(BaseModel):
    """What a task needs to log into the run tree (small and hashable for Prefect caching)."""

    model_config = ConfigDict(frozen=True)

    tracking_uri: str
    experiment_id: str
    parent_run_id: str

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    def child(self, *, key: str, name: str, tags: Mapping[str, str] | None = None) -> str:
        """Find or create the child run ``key`` (e.g. ``stage.profile``, ``group.3``)."""
        client = self.client()
        found = client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and tags.`tdc.key` = '{key}'",
            max_results=1,
        )
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        run = client.create_run(
            self.experiment_id, run_name=name,
            tags={"mlflow.parentRunId": self.parent_run_id, "tdc.key": key, **(tags or {})},
        )
        return run.info.run_id

    def finish(self, run_id: str, *, ok: bool = True) -> None:
        self.client().set_terminated(run_id, status="FINISHED" if ok else "FAILED")

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], *, step: int = 0) -> None:
        ts = int(time.time() * 1000)
        self.log_metric_items(run_id, [Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def log_metric_items(self, run_id: str, items: list[Metric]) -> None:
        """Send metrics in ``log_batch`` calls of at most ``_BATCH`` values, one client."""
        client = self.client()
        for i in range(0, len(items), _BATCH):
            client.log_batch(run_id, metrics=items[i:i + _BATCH])

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        client = self.client()
        existing = client.get_run(run_id).data.params
        items = [p for p in items if p.key not in existing]  # params are immutable in MLflow
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i:i + 100])

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: str | Path, *, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client().log_artifacts(run_id, str(path), artifact_path=artifact_path)
        elif path.is_file():
            self.client().log_artifact(run_id, str(path), artifact_path=artifact_path)


def open_tracking(
    *, config: PipelineConfig, run_key: str, run_dir: Path, tracking_uri: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> TrackingRef:
    """Find or create the experiment and this pipeline's parent run (keyed by ``run_key``).

    A local SQLite store keeps its artifacts beside it (``mlartifacts/``), not in whatever
    folder MLflow's default would pick.
    """
    uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        experiment_id = client.create_experiment(EXPERIMENT, artifact_location=location)
    else:
        experiment_id = exp.experiment_id
    found = client.search_runs([experiment_id], filter_string=f"tags.`tdc.run_key` = '{run_key}'", max_results=1)
    if found:
        parent = found[0].info.run_id
        client.update_run(parent, status="RUNNING")
    else:
        parent = client.create_run(
            experiment_id, run_name=f"{config.name}-{config.preset}",
            tags={"tdc.run_key": run_key, "tdc.run_dir": str(run_dir), "tdc.kind": "pipeline", **(tags or {})},
        ).info.run_id
    ref = TrackingRef(tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent)
    ref.log_params(parent, flatten(config))
    return ref


class MlflowReporter:
    """A :class:`tdc_core.reporting.Reporter` that batches metrics into MLflow.

    Training reports every ``log_every`` steps; this buffers those reports and sends them in
    one ``log_batch`` call every ``flush_every`` reports (and on :meth:`close`), so logging
    costs no measurable training time. ``logged`` counts metric values actually sent.
    """

    def __init__(self, ref: TrackingRef, run_id: str, *, prefix: str = "", flush_every: int = 20) -> None:
        self.ref, self.run_id, self.prefix, self.flush_every = ref, run_id, prefix, flush_every
        self._buffer: list[tuple[int, dict[str, float]]] = []
        self.logged = 0

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        self._buffer.append((step, {f"{self.prefix}{k}": float(v) for k, v in metrics.items()}))
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def progress(self, *, step: int, total: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def flush(self) -> None:
        if not self._buffer:
            return
        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, step) for step, m in self._buffer for k, v in m.items()]
        self.ref.log_metric_items(self.run_id, items)
        self.logged += len(items)
        self._buffer.clear()

    def close(self) -> None:
        self.flush()
