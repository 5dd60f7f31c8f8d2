"""Work submitted to Prefect workers: group fine-tunes as flow runs of the ``tdc-group``
deployment (``orchestration.groups=deployment``), and a study's replicates as flow runs of
``tdc/full-pipeline`` (a study file's ``replicates: deployment``).

The pipeline publishes the groups' inputs to the storage root (:func:`publish_inputs_task`), then
submits one flow run per group (:func:`group_on_worker_task`); any worker of the deployment's work
pool may pick it up. How many run at once is Prefect's business: the work pool's concurrency
limit, or ``--limit`` on each worker (one per GPU), never a scheduler of ours. Each finished
group's folder is downloaded (verified) into the pipeline's run folder, so the stages after
stage 2 read it exactly as after a local fine-tune.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.deployments import run_deployment
from prefect.runtime import task_run
from pydantic import BaseModel, ConfigDict

from tasks.console import say
from tasks.handoff import finished_group, publish_inputs, publish_results, pull_group, pull_results, results_prefix
from tasks.stage_tasks import CACHED, GroupFailed, log_group_result, say_group
from tasks.storage import Manifest, open_store
from tasks.tracking import TrackingRef
from tdc_core.config import PipelineConfig
from tdc_core.records import load_record, save_record
from tdc_core.run.layout import RunLayout
from tdc_core.run.stages import GroupResult

__all__ = ["Published", "group_on_worker_task", "publish_inputs_task", "publish_results_task",
           "replicate_on_worker_task", "storage_root"]


class Published(BaseModel):
    """Where a run's group inputs are, and their manifest."""

    model_config = ConfigDict(frozen=True)

    storage: str
    run_key: str
    inputs: Manifest


def storage_root(config: PipelineConfig, *, run_dir: Path) -> str:
    """``orchestration.storage``, else ``<run folder>/store`` (reachable by workers on this machine)."""
    return config.orchestration.storage or str(Path(run_dir).resolve() / "store")


@task(name="publish-group-inputs")
def publish_inputs_task(config: PipelineConfig, run_dir: str, run_key: str) -> Published:
    """Upload config, grouping, budgets and the shared model (skipped when already stored)."""
    storage = storage_root(config, run_dir=Path(run_dir))
    inputs = publish_inputs(open_store(storage), run_key=run_key, layout=RunLayout(Path(run_dir)))
    return Published(storage=storage, run_key=run_key, inputs=inputs)


@task(name="group-on-worker", **CACHED)
def group_on_worker_task(
    config: PipelineConfig, run_dir: str, run_uid: str, tracking: TrackingRef, group: int, published: Published,
) -> GroupResult:
    """Stage 2 for one group as a flow run of ``orchestration.group_deployment``, unless the
    store already holds it from the same inputs; then its folder comes back into the run folder.

    Raises:
        GroupFailed: the flow run did not complete (crashed, failed, cancelled, or still
            running after ``orchestration.group_timeout_s``), naming it and its state.
    """
    layout = RunLayout(Path(run_dir))
    store = open_store(published.storage)
    orch = config.orchestration
    with tracking.child_run(key=f"group.{group}", name=f"group-{group}") as run_id:
        flow_run = None
        if finished_group(store, run_key=published.run_key, group=group, inputs=published.inputs) is None:
            flow_run = run_deployment(
                name=orch.group_deployment, timeout=orch.group_timeout_s, as_subflow=True,
                parameters={"storage": published.storage, "run_key": published.run_key, "group": group},
                flow_run_name=f"{published.run_key}-group-{group}", tags=["tdc", f"group-{group}"])
            state = flow_run.state
            if state is None or not state.is_completed():
                how = "is still running" if state is not None and not state.is_final() else \
                    f"ended {state.name if state else 'without a state'}"
                why = (f"group {group}: flow run {flow_run.name} ({flow_run.id}) of {orch.group_deployment} {how}"
                       + (f": {state.message}" if state is not None and state.message else "")
                       + ("" if state is None or state.is_final() else
                          f" after orchestration.group_timeout_s={orch.group_timeout_s:g}"))
                attempt = task_run.run_count or 1
                if attempt <= orch.group_retries:  # Prefect retries the task: say so on the console
                    say(f"{why}; resubmitting it (retry {attempt} of {orch.group_retries})")
                raise GroupFailed(why)
            if finished_group(store, run_key=published.run_key, group=group, inputs=published.inputs) is None:
                raise GroupFailed(f"group {group}: flow run {flow_run.name} completed but stored no result under "
                                  f"{published.storage}")
        manifest = pull_group(store, run_key=published.run_key, layout=layout, group=group)
        # The worker's result names its own local checkpoint; here the copy in this run folder counts.
        result = load_record(layout.group_result(group), GroupResult, what="group result").model_copy(
            update={"checkpoint": str(layout.group_checkpoint(group))})
        save_record(layout.group_result(group), result)
        where = manifest.ran_on.get("host", "?") + ":" + manifest.ran_on.get("work_dir", "?")
        log_group_result(tracking, run_id, layout=layout, result=result,
                         tags={"device": "worker", "worker": where, "storage": store.url_of(published.run_key),
                               **({"prefect.group_flow_run_id": str(flow_run.id)} if flow_run else {})})
    say_group(result, where=f"worker {where}" + ("" if flow_run else ", stored earlier"))
    return result


@task(name="publish-results")
def publish_results_task(config: PipelineConfig, run_dir: str) -> str:
    """Upload the finished run's results under ``results/<config key>`` of ``orchestration.storage``."""
    store = open_store(config.orchestration.storage)
    publish_results(store, layout=RunLayout(Path(run_dir)), config=config)
    return store.url_of(results_prefix(config))


@task(name="replicate-on-worker")
def replicate_on_worker_task(config: PipelineConfig, *, deployment: str, name: str, run_dir: str) -> Path:
    """One study replicate as a flow run of ``deployment`` (the pipeline on any worker of its
    pool), unless ``orchestration.storage`` already holds its results; they are then downloaded
    (verified) into ``run_dir`` here, whose ``summary.json`` and ``eval/`` the study reads.

    Raises:
        TDCError: the flow run did not complete, naming it and its state.
    """
    from tdc_core.errors import TDCError

    store = open_store(config.orchestration.storage)
    if store.manifest(results_prefix(config)) is None:
        flow_run = run_deployment(name=deployment, parameters={"config": config.model_dump(mode="json")},
                                  as_subflow=True, flow_run_name=name, tags=["tdc", "study"])
        state = flow_run.state
        if state is None or not state.is_completed():
            raise TDCError(f"replicate {name}: flow run {flow_run.name} ({flow_run.id}) of {deployment} ended "
                           f"{state.name if state else 'without a state'}"
                           + (f": {state.message}" if state is not None and state.message else ""))
        say(f"replicate {name}: finished on a worker (flow run {flow_run.name})")
    pull_results(store, config=config, dest=Path(run_dir))
    return Path(run_dir)
