"""MLflow lineage of a pipeline run: one parent run, one child run per stage and per group.

Everything goes through :class:`mlflow.MlflowClient` with explicit run ids, never through
MLflow's thread-local "active run": Prefect runs tasks in worker threads (and groups in
subprocesses), where the active run would be missing or wrong.

Runs are found by tags before they are created, so re-running a failed pipeline with the same
config reuses its parent run and every finished stage's child run: the run tree gets neither
duplicates nor gaps.

Metrics survive a killed process and a tracking store that goes away mid-run. A
:class:`MlflowReporter` appends every report to a journal in the run folder
(``<run>/tracking-backlog/<mlflow run id>.jsonl``) before sending it, and empties the journal
once MLflow has accepted everything. A failed send is retried at later flushes and at the end
of the stage; values still unsent then stay in the journal (a warning and
:attr:`MlflowReporter.unsent` say how many), and :func:`open_tracking` replays them the next
time the pipeline opens that run folder. Metric values are kept once per (metric, step) and
run: a point already in MLflow (sent before a kill, or reported again by training that
resumed from an earlier checkpoint) is not sent again.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict

from tasks.console import say
from tasks.tracking_check import TrackingError, check_tracking, default_tracking_uri
from tasks.tracking_check import reason as _reason
from tdc_core.config import PipelineConfig, flatten
from tdc_core.errors import first_line

__all__ = [
    "MlflowReporter",
    "RegisteredVersion",
    "TrackingError",
    "TrackingRef",
    "check_tracking",
    "open_study_tracking",
    "default_tracking_uri",
    "open_tracking",
    "replay_backlog",
]

EXPERIMENT = "tdc"
# MLflow's UI (3.x) opens an experiment without this tag in its GenAI view (traces, prompts);
# with it, on the runs table, where TDC and the baseline are compared.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
BACKLOG_DIR = "tracking-backlog"
_BATCH = 200  # metrics per log_batch call (MLflow accepts up to 1000)
# MLflow error codes of a store that is down, overloaded or busy: worth retrying later.
_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}

if sys.platform != "win32":
    import fcntl
else:  # pragma: no cover - no flock; several runs must not create one SQLite store at once there
    fcntl = None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` says the store is unreachable or busy (retry later), not that the request
    itself is wrong. Connection errors of ``requests`` are :class:`OSError` subclasses."""
    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES
    return isinstance(exc, OSError)


class RegisteredVersion(BaseModel):
    """A model version registered by :meth:`TrackingRef.register_version`."""

    model_config = ConfigDict(frozen=True)

    version: str
    holds_alias: bool               # whether the alias now points at this version
    previous_score: float | None    # the score of the alias's previous holder, if any


class TrackingRef(BaseModel):
    """What a task needs to log into the run tree (small and hashable for Prefect caching)."""

    model_config = ConfigDict(frozen=True)

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    backlog_dir: str | None = None  # the run folder's journal of unsent metrics (None: none kept)

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

    def baseline_run(self, config: PipelineConfig, *, run_key: str, steps: int) -> str:
        """Find or create the baseline's own top-level run in the same experiment (side by side
        with TDC's parent run in the UI), with the run's params and its ``train.steps``."""
        client = self.client()
        key = f"{run_key}-baseline"
        found = client.search_runs([self.experiment_id], filter_string=f"tags.`tdc.run_key` = '{key}'",
                                   max_results=1)
        if found:
            return found[0].info.run_id
        run_id = client.create_run(self.experiment_id, run_name=f"{config.name}-{config.preset}-baseline", tags={
            "tdc.run_key": key, "tdc.kind": "baseline", "tdc.pipeline_run_id": self.parent_run_id,
        }).info.run_id
        self.log_params(run_id, {**training_params(config), "train.steps": str(steps)})
        self.set_tags(self.parent_run_id, {"tdc.baseline_run_id": run_id})
        return run_id

    def adopt(self, run_ids: Iterable[str], *, tags: Mapping[str, str] | None = None) -> None:
        """Put existing runs beneath this ref's parent run (a study's pipeline and baseline runs),
        so the UI nests them there."""
        for run_id in run_ids:
            self.set_tags(run_id, {"mlflow.parentRunId": self.parent_run_id, **(tags or {})})

    def finish(self, run_id: str, *, ok: bool = True) -> None:
        self.client().set_terminated(run_id, status="FINISHED" if ok else "FAILED")

    @contextmanager
    def child_run(self, *, key: str, name: str) -> Iterator[str]:
        """The child run ``key`` for the duration of a stage: FINISHED when the block ends,
        FAILED when it raises (the stage's own error propagates even if the store is down)."""
        run_id = self.child(key=key, name=name)
        try:
            yield run_id
        except BaseException:
            try:
                self.finish(run_id, ok=False)
            except Exception:  # noqa: BLE001 - e.g. the store is down: the stage's own error matters
                pass
            raise
        self.finish(run_id, ok=True)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], *, step: int = 0) -> None:
        """Log ``metrics`` at ``step``, skipping any (metric, step) the run already holds (a
        re-run of a stage that was interrupted after logging)."""
        ts = int(time.time() * 1000)
        self.log_metric_items(run_id, [Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def log_points(self, run_id: str, points: Iterable[tuple[str, float, int]]) -> int:
        """Log (metric, value, step) points the run does not hold yet; returns how many were sent."""
        ts = int(time.time() * 1000)
        return self.log_metric_items(run_id, [Metric(k, float(v), ts, int(step)) for k, v, step in points])

    def log_metric_items(self, run_id: str, items: list[Metric]) -> int:
        """Send the metrics the run does not hold yet (by metric and step); returns how many."""
        client = self.client()
        have = logged_points(client, run_id, keys={m.key for m in items})
        return self.send(client, run_id, [m for m in items if (m.key, m.step) not in have])

    def send(self, client: MlflowClient, run_id: str, items: list[Metric], *,
             on_batch: Callable[[list[Metric]], None] | None = None) -> int:
        """Send ``items`` as they are, in ``log_batch`` calls of at most ``_BATCH`` values;
        ``on_batch`` sees each batch once MLflow has accepted it."""
        for i in range(0, len(items), _BATCH):
            batch = items[i:i + _BATCH]
            client.log_batch(run_id, metrics=batch)
            if on_batch is not None:
                on_batch(batch)
        return len(items)

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

    def register_version(self, *, name: str, description: str, run_id: str, artifact_path: str,
                         tags: Mapping[str, str], score: float, alias: str) -> RegisteredVersion:
        """Register ``run_id``'s ``artifact_path`` as a version of model ``name`` (once per run: a
        re-run finds its version) and move ``alias`` to it when its ``score`` tag is lower than
        the current holder's (or there is none, or that score is not a number)."""
        client = self.client()
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description=description)
        existing = [v for v in client.search_model_versions(f"name = '{name}'") if v.run_id == run_id]
        version = existing[0] if existing else client.create_model_version(
            name, source=f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}", run_id=run_id,
            tags={**tags, "score": repr(score)},
        )
        previous = None
        try:
            current = client.get_model_version_by_alias(name, alias)
            previous = float(current.tags.get("score", "nan"))
        except MlflowException:
            current = None
        better = (current is None or current.version == version.version or not math.isfinite(previous)
                  or score < previous)
        if better:
            client.set_registered_model_alias(name, alias, version.version)
        return RegisteredVersion(version=str(version.version), holds_alias=better, previous_score=previous)

    def journal(self, run_id: str) -> Path | None:
        """Where unsent metrics of ``run_id`` wait (None when this ref keeps no backlog)."""
        return Path(self.backlog_dir) / f"{run_id}.jsonl" if self.backlog_dir else None


def training_params(config: PipelineConfig) -> dict[str, str]:
    """The config as MLflow params, without ``eval.*``: a run's params are fixed once logged, and
    a re-evaluation of the same run may change its evaluation settings (logged as tags)."""
    return {k: v for k, v in flatten(config).items() if not k.startswith("eval.")}


def logged_points(client: MlflowClient, run_id: str, *, keys: set[str] | None = None) -> set[tuple[str, int]]:
    """(metric, step) pairs the run holds, for ``keys`` (default all its metrics): one
    ``get_run`` plus one history query per metric the run already has."""
    present = set(client.get_run(run_id).data.metrics)
    have: set[tuple[str, int]] = set()
    for key in sorted(present if keys is None else present & keys):
        have.update((key, m.step) for m in client.get_metric_history(run_id, key))
    return have


def open_tracking(
    *, config: PipelineConfig, run_key: str, run_dir: Path, tracking_uri: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> TrackingRef:
    """Find or create the experiment and this pipeline's parent run (keyed by ``run_key``).

    A local SQLite store keeps its artifacts beside it (``mlartifacts/``), not in whatever
    folder MLflow's default would pick.
    """
    uri = tracking_uri or default_tracking_uri()
    check_tracking(uri)
    try:
        ref = _open(config=config, run_key=run_key, run_dir=run_dir, uri=uri, tags=tags)
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise TrackingError(f"MLflow tracking store {uri} failed while opening the run: {_reason(exc)}") from exc
    replay_backlog(ref)
    return ref


_CREATE_LOCK = threading.Lock()


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """One process at a time opens a SQLite store for the first time (an exclusive ``flock`` on
    ``<db>.lock`` beside it). On an empty file MLflow runs its schema migrations, and several
    pipeline runs starting together would otherwise see each other's half-migrated schema
    ("no such column") or both create the experiment."""
    if not uri.startswith("sqlite:///") or fcntl is None:
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _open(*, config: PipelineConfig, run_key: str, run_dir: Path, uri: str,
          tags: Mapping[str, str] | None) -> TrackingRef:
    client, experiment_id = _experiment(uri)
    found = client.search_runs([experiment_id], filter_string=f"tags.`tdc.run_key` = '{run_key}'", max_results=1)
    if found:
        parent = found[0].info.run_id
        client.update_run(parent, status="RUNNING")
    else:
        parent = client.create_run(
            experiment_id, run_name=f"{config.name}-{config.preset}",
            tags={"tdc.run_key": run_key, "tdc.run_dir": str(run_dir), "tdc.kind": "pipeline", **(tags or {})},
        ).info.run_id
    ref = TrackingRef(tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent,
                      backlog_dir=str(Path(run_dir) / BACKLOG_DIR))
    ref.log_params(parent, training_params(config))
    return ref


def open_study_tracking(*, name: str, study_key: str, tracking_uri: str | None, params: Mapping[str, str],
                        out_dir: Path) -> TrackingRef:
    """Find or create a study's MLflow run (keyed by ``study_key``, so a resumed study reuses it);
    its pipeline runs are put beneath it with :meth:`TrackingRef.adopt`."""
    uri = tracking_uri or default_tracking_uri()
    check_tracking(uri)
    try:
        client, experiment_id = _experiment(uri)
        found = client.search_runs([experiment_id], filter_string=f"tags.`tdc.study_key` = '{study_key}'",
                                   max_results=1)
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(experiment_id, run_name=f"study-{name}", tags={
                "tdc.study_key": study_key, "tdc.kind": "study", "tdc.study_dir": str(out_dir)}).info.run_id
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise TrackingError(f"MLflow tracking store {uri} failed while opening the study run: {_reason(exc)}") from exc
    ref = TrackingRef(tracking_uri=uri, experiment_id=experiment_id, parent_run_id=run_id)
    ref.log_params(run_id, params)
    return ref


def _experiment(uri: str) -> tuple[MlflowClient, str]:
    """The client and the experiment ``tdc``'s id, created on first use."""
    with _CREATE_LOCK, _store_lock(uri):  # the store's first use and the experiment: one at a time
        client = MlflowClient(tracking_uri=uri)  # opens (and on an empty file, creates) the store
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
            experiment_id = client.create_experiment(EXPERIMENT, artifact_location=location, tags=EXPERIMENT_TAGS)
        else:
            experiment_id = exp.experiment_id
            for key, value in EXPERIMENT_TAGS.items():
                if exp.tags.get(key) != value:
                    client.set_experiment_tag(experiment_id, key, value)
    return client, experiment_id


def _read_journal(path: Path) -> Iterator[Metric]:
    """Metric points of a journal file; a torn last line (killed mid-write) is skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    for line in text.splitlines():
        try:
            rec = json.loads(line)
            step, ts = int(rec["step"]), int(rec["ts"])
            values = {str(k): float(v) for k, v in rec["metrics"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        for k, v in values.items():
            yield Metric(k, v, ts, step)


def replay_backlog(ref: TrackingRef) -> int:
    """Send the metrics that earlier attempts on this run folder could not deliver; returns how
    many values were sent. A journal is removed once MLflow holds all of it.

    Raises:
        TrackingError: the store is still unreachable; the journals stay for the next run.
    """
    if not ref.backlog_dir or not Path(ref.backlog_dir).is_dir():
        return 0
    sent = 0
    for path in sorted(Path(ref.backlog_dir).glob("*.jsonl")):
        run_id = path.stem
        items = list(_read_journal(path))
        try:
            sent += ref.log_metric_items(run_id, _unique(items))
        except Exception as exc:
            if is_transient(exc):
                raise TrackingError(f"could not replay {len(items)} unsent metric values from {path} to MLflow "
                                    f"({ref.tracking_uri}): {_reason(exc)}") from exc
            # Refused for good (e.g. the run was deleted): set aside, never retried forever.
            rejected = path.with_suffix(".rejected")
            path.replace(rejected)
            say(f"warning: MLflow refused {len(items)} unsent metric values of run {run_id} "
                f"({first_line(exc)}); they are kept in {rejected}")
            continue
        path.unlink(missing_ok=True)
    if sent:
        say(f"sent {sent} metric values that an earlier attempt could not deliver to MLflow")
    return sent


def _unique(items: list[Metric]) -> list[Metric]:
    """One point per (metric, step): the first reported, as MLflow would keep it."""
    seen: set[tuple[str, int]] = set()
    out = []
    for m in items:
        if (m.key, m.step) not in seen:
            seen.add((m.key, m.step))
            out.append(m)
    return out


class MlflowReporter:
    """A :class:`tdc_core.reporter.Reporter` that batches metrics into MLflow without losing any.

    Training reports every ``log_every`` steps; this buffers those reports and sends them in
    ``log_batch`` calls every ``flush_every`` reports (and on :meth:`close`), so logging costs
    no measurable training time. Every report is first appended to the run's journal (when the
    :class:`TrackingRef` keeps one), so a killed process loses none; the journal is emptied
    whenever everything reached MLflow. A failed send (store unreachable) keeps the values for
    the next flush, tried again after a back-off; on :meth:`close` they stay in the journal
    for :func:`replay_backlog`. A (metric, step) MLflow already holds is not sent again.

    Attributes:
        logged: metric values MLflow accepted from this reporter.
        unsent: values still waiting after :meth:`close` (in the journal), 0 when all arrived.
    """

    def __init__(self, ref: TrackingRef, run_id: str, *, prefix: str = "", flush_every: int = 20,
                 retry_after_s: float = 5.0) -> None:
        self.ref, self.run_id, self.prefix, self.flush_every = ref, run_id, prefix, flush_every
        self.retry_after_s = retry_after_s
        self._client = ref.client()
        self._pending: list[Metric] = []
        self._reports = 0                       # reports in _pending
        self._have: set[tuple[str, int]] | None = None  # (metric, step) MLflow holds; read at first send
        self._failures = 0
        self._retry_at = 0.0
        self.logged = 0
        self.unsent = 0
        self._journal_path = ref.journal(run_id)
        self._journal = None
        if self._journal_path is not None:
            # An earlier process's leftovers for this run go first (kept if still unsendable).
            self._pending.extend(_read_journal(self._journal_path))
            self._journal_path.parent.mkdir(parents=True, exist_ok=True)
            self._journal = self._journal_path.open("a", encoding="utf-8")

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        ts = int(time.time() * 1000)
        values = {f"{self.prefix}{k}": float(v) for k, v in metrics.items()}
        if self._journal is not None:
            self._journal.write(json.dumps({"step": step, "ts": ts, "metrics": values}) + "\n")
            self._journal.flush()  # in the OS's hands: survives a SIGKILL of this process
        self._pending.extend(Metric(k, v, ts, step) for k, v in values.items())
        self._reports += 1
        if self._reports >= self.flush_every and time.monotonic() >= self._retry_at:
            self.flush()

    def progress(self, *, step: int, total: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def flush(self) -> bool:
        """Send what is pending; True when nothing is left. A store that is down is not an
        error here: the values wait (in memory and the journal) for the next attempt."""
        if not self._pending:
            return True
        try:
            if self._have is None:
                self._have = logged_points(self._client, self.run_id)
            todo = [m for m in _unique(self._pending) if (m.key, m.step) not in self._have]
            self.ref.send(self._client, self.run_id, todo, on_batch=self._accepted)
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._failures += 1
            self._retry_at = time.monotonic() + min(self.retry_after_s * 2 ** (self._failures - 1), 300.0)
            if self._failures == 1:
                say(f"warning: MLflow ({self.ref.tracking_uri}) is not accepting metrics ({_reason(exc)}); "
                    f"keeping them and retrying" + (f" (journal {self._journal_path})" if self._journal_path else ""))
            return False
        if self._failures:
            say(f"MLflow accepts metrics again; sent the {len(todo)} values kept meanwhile")
        self._pending.clear()
        self._reports, self._failures, self._retry_at = 0, 0, 0.0
        if self._journal is not None:
            self._journal.truncate(0)  # everything in it has arrived ("a" mode: writes go to the end)
        return True

    def _accepted(self, batch: list[Metric]) -> None:
        assert self._have is not None
        self._have.update((m.key, m.step) for m in batch)
        self.logged += len(batch)

    def __enter__(self) -> MlflowReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Last attempt to send; what cannot be sent stays in the journal and is counted."""
        done = self.flush()
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if done:
            if self._journal_path is not None:
                self._journal_path.unlink(missing_ok=True)
            return
        self.unsent = len(_unique(self._pending))
        where = (f"kept in {self._journal_path}; they are sent when the pipeline is re-run on this folder"
                 if self._journal_path else "lost (no run folder to keep them in)")
        say(f"warning: {self.unsent} metric values of MLflow run {self.run_id} could not be sent "
            f"to {self.ref.tracking_uri}; {where}")
