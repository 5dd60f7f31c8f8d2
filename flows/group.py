"""The Prefect flow ``tdc-group``: one group's prune + fine-tune, on whichever worker picks it up.

The pipeline (flow ``tdc`` with ``orchestration.groups=deployment``) submits one flow run of this
flow's deployment (``tdc-group/group`` in ``deployments/prefect.yaml``) per group. The worker
shares nothing with the pipeline but the storage root: it downloads the group's inputs (config,
grouping, budgets, shared model; every file checked against its SHA-256), fine-tunes the group in
a local work folder exactly as a local run does (the same worker process, :mod:`tdc_core.run.worker`),
and uploads the group's folder, its manifest last.

A group already stored from the same inputs is not redone, so a flow run that is retried, or
submitted twice, costs nothing the second time.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger

from tasks.handoff import finished_group, group_prefix, inputs_prefix, push_group
from tasks.stage_tasks import GroupFailed, run_worker
from tasks.storage import StorageError, host_identity, open_store
from tdc_core.records import load_record
from tdc_core.run.layout import RunLayout
from tdc_core.run.stages import GroupResult
from tdc_core.run.worker import finetune_group_command
from tdc_core.run.worker_reports import JsonlTail

__all__ = ["default_work_dir", "tdc_group"]


def default_work_dir() -> Path:
    """Where a worker keeps its local copies: ``$TDC_WORK_DIR``, else ``<temp dir>/tdc-work``."""
    return Path(os.environ.get("TDC_WORK_DIR") or Path(tempfile.gettempdir()) / "tdc-work")


class _LogProgress:
    """A :class:`tdc_core.reporter.Reporter` that logs a group's progress to the flow run's log
    about every tenth of the way (what the Prefect UI shows for the worker)."""

    def __init__(self, what: str) -> None:
        self.what, self._last = what, -1

    def log_metrics(self, metrics, *, step: int) -> None:
        pass

    def progress(self, *, step: int, total: int) -> None:
        tenth = 10 * step // max(total, 1)
        if tenth != self._last:
            self._last = tenth
            get_run_logger().info("%s: step %d/%d", self.what, step, total)

    def message(self, text: str) -> None:
        get_run_logger().info("%s: %s", self.what, text)


@flow(name="tdc-group")
def tdc_group(storage: str, run_key: str, group: int, work_dir: str | None = None) -> GroupResult:
    """Prune + fine-tune group ``group`` of the run ``run_key`` whose inputs are in ``storage``.

    Args:
        storage: the storage root (local folder or fsspec URL) the pipeline published to.
        run_key: the run's key there (``<config hash>-<run folder id>``).
        group: the group index.
        work_dir: local folder for this worker's copies (default :func:`default_work_dir`).

    Raises:
        StorageError: the run's inputs are not in ``storage``.
        GroupFailed: the fine-tune process failed.
    """
    logger = get_run_logger()
    store = open_store(storage)
    inputs = store.manifest(inputs_prefix(run_key))
    if inputs is None:
        raise StorageError(f"storage {storage}: run {run_key} has no published inputs ({inputs_prefix(run_key)}/"
                           f"manifest.json); the pipeline publishes them after shared training")
    if finished_group(store, run_key=run_key, group=group, inputs=inputs) is not None:
        logger.info("group %d of %s is already stored from these inputs: nothing to do", group, run_key)
        return GroupResult.model_validate(store.read_json(f"{group_prefix(run_key, group)}/result.json"))
    local = (Path(work_dir) if work_dir else default_work_dir()) / run_key
    store.get_bundle(inputs_prefix(run_key), local)  # verified against the manifest's SHA-256
    layout = RunLayout(local)
    logger.info("group %d of %s: inputs in %s (shared model SHA-256 %s…)", group, run_key, local,
                inputs.files["checkpoints/last.pt"][0][:12])
    metrics = layout.group_metrics(group)
    metrics.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, *finetune_group_command(run_dir=layout.root, group=group, metrics_file=metrics)]
    run_worker(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, what=f"group {group} fine-tune", error=GroupFailed,
               relay=JsonlTail(metrics, _LogProgress(f"group {group}")))
    manifest = push_group(store, run_key=run_key, layout=layout, group=group, inputs=inputs,
                          ran_on=host_identity(local))
    logger.info("group %d: %d files stored under %s", group, len(manifest.files),
                store.url_of(group_prefix(run_key, group)))
    return load_record(layout.group_result(group), GroupResult, what="group result")
