"""The Prefect flow ``tdc``: the whole TDC pipeline, with the single-model baseline beside it.

Run it with ``tdc run`` (in-process, no server) or as the deployment
``prefect deployment run tdc/full-pipeline`` (see ``deployments/prefect.yaml``).

The same config always maps to the same run folder and MLflow parent run, so re-running a
failed or killed pipeline skips every finished stage (Prefect cache) and resumes unfinished
training from its checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict

from flows.checks import check_before_run
from tasks.console import install_quiet_console, say
from tasks.on_workers import group_on_worker_task, publish_inputs_task, publish_results_task
from tasks.registry import Registration, register_task
from tasks.run_report import report_task
from tasks.stage_tasks import (
    DEVICE_SLOTS,
    GroupFailed,
    TrainSummary,
    baseline_task,
    costs_task,
    evaluate_task,
    finetune_group_task,
    group_task,
    profile_task,
    shared_train_task,
    worker_slots,
)
from tasks.tracking import TrackingRef, open_tracking
from tdc_core.atomic import atomic_write_bytes
from tdc_core.config import PipelineConfig, config_key, load_config, write_run_config
from tdc_core.evaluation.results import Comparison
from tdc_core.run.layout import RunLayout, default_run_dir
from tdc_core.run.runlock import hold_run_folder
from tdc_core.run.stage1 import attach_stage1
from tdc_core.run.stages import CostReport, GroupResult

__all__ = ["PipelineSummary", "run_pipeline", "tdc"]


class PipelineSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_dir: str
    mlflow_run_id: str
    baseline_run_id: str | None
    tracking_uri: str
    experiment_id: str = ""
    boundaries: list[int]
    groups: list[GroupResult]
    shared: TrainSummary
    baseline: TrainSummary | None
    costs: CostReport
    comparison: Comparison | None
    registration: Registration


def prepare_run_folder(config: PipelineConfig, root: Path) -> str:
    """Create the run folder ``root``, write its config and point it at its stage-1 folder
    (shared with every run of equal stage-1 settings); return its unique id.

    The id is written once; a deleted and recreated folder gets a new one, which invalidates
    cached stage results that pointed into the old folder.
    """
    root.mkdir(parents=True, exist_ok=True)
    uid_file = RunLayout(root).run_uid
    if not uid_file.is_file():
        uid_file.write_text(uuid.uuid4().hex)
    write_run_config(RunLayout(root), config)
    attach_stage1(RunLayout(root), config)
    return uid_file.read_text().strip()


def _resolve(preset: str, overrides: list[str] | None, config: PipelineConfig | None) -> PipelineConfig:
    return config if config is not None else load_config(preset=preset, overrides=overrides or [])


@flow(name="tdc", task_runner=ThreadPoolTaskRunner(max_workers=8))
def tdc(
    preset: str = "digits",
    overrides: list[str] | None = None,
    config: PipelineConfig | None = None,
    run_dir: str | None = None,
    tracking_uri: str | None = None,
    workers: int | None = None,
) -> PipelineSummary:
    """Profile → group → shared training → per-group prune + fine-tune (parallel, here or on
    the workers of the group deployment: ``orchestration.groups``) → costs → baseline → FID
    comparison (of TDC alone without a baseline) → registry.

    Args:
        preset, overrides: build the config (ignored when ``config`` is given).
        config: the full pipeline config (Prefect renders it as a form).
        run_dir: run folder; default derived from the config (under ``$TDC_RUNS_DIR`` when set), so
            a re-run resumes.
        tracking_uri: MLflow store; default ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db``.
        workers: parallel group fine-tunes: default one per GPU, or 2 on a CPU machine.
    """
    install_quiet_console()  # a user error is one line on the console; its traceback stays in the run's log
    cfg = _resolve(preset, overrides, config)
    root = Path(run_dir or _default_root(cfg)).resolve()
    # Every input a stage needs, before any training and before anything reaches MLflow.
    for line in check_before_run(cfg, run_dir=root, tracking_uri=tracking_uri):
        get_run_logger().info("checked %s", line)
    with hold_run_folder(root, command=f"flow tdc ({flow_run.name or 'local'})", warn=say):
        return _run(cfg, root=root, tracking_uri=tracking_uri, workers=workers)


def _default_root(cfg: PipelineConfig) -> Path:
    """``runs/<name>-<preset>-<hash>`` in the working folder, or in ``$TDC_RUNS_DIR`` when set (a
    worker's own disk: a deployment's flow runs start in the project folder)."""
    base = os.environ.get("TDC_RUNS_DIR")
    return Path(base) / default_run_dir(cfg).name if base else default_run_dir(cfg)


def _run(cfg: PipelineConfig, *, root: Path, tracking_uri: str | None, workers: int | None) -> PipelineSummary:
    """The flow's body once the run folder is ours: tracking around the stages."""
    slots = worker_slots(workers)
    DEVICE_SLOTS.configure(slots)
    threads = max(1, (os.cpu_count() or 1) // len(slots))
    run_uid = prepare_run_folder(cfg, root)
    run_key = f"{config_key(cfg)}-{run_uid}"
    tracking = open_tracking(config=cfg, run_key=run_key, run_dir=root, tracking_uri=tracking_uri,
                             tags={"prefect.flow_run_id": str(flow_run.id or ""),
                                   "prefect.flow_run_url": str(flow_run.ui_url or "")})
    get_run_logger().info("run folder %s; MLflow run %s", root, tracking.parent_run_id)
    try:
        return _stages(cfg, root=root, run_uid=run_uid, run_key=run_key, tracking=tracking, slots=slots,
                       threads=threads)
    except Exception:
        # The parent run shows FAILED in the UI until a re-run finishes it (then FINISHED).
        with contextlib.suppress(Exception):
            tracking.finish(tracking.parent_run_id, ok=False)
        raise


def _stages(cfg: PipelineConfig, *, root: Path, run_uid: str, run_key: str, tracking: TrackingRef,
            slots: list[str | None], threads: int) -> PipelineSummary:
    """The pipeline's stages in order (the body of the flow ``tdc``)."""
    args = (cfg, str(root), run_uid, tracking)

    profile = profile_task(*args)
    grouped = group_task(*args, wait_for=[profile])
    shared = shared_train_task(*args, wait_for=[grouped])
    n = grouped.grouping.num_groups
    if cfg.orchestration.groups == "deployment":  # one flow run per group, on any worker of the pool
        futures = _submit_to_workers(cfg, args=args, num_groups=n, run_key=run_key, after=shared)
    else:
        say(f"fine-tuning {n} group experts, {len(slots)} at a time "
            f"({'one per GPU' if slots[0] is not None else f'{threads} CPU thread(s) each'})")
        futures = [finetune_group_task.submit(*args, group=g, threads=threads, wait_for=[shared]) for g in range(n)]
    groups = _all_groups(futures)
    costs = costs_task(*args, groups=groups)
    baseline, baseline_run_id, comparison = None, None, None
    if cfg.baseline.enabled:
        steps = cfg.baseline.steps or costs.training.baseline_steps
        baseline_run_id = tracking.baseline_run(cfg, run_key=run_key, steps=steps)
        baseline = baseline_task(*args, steps=steps, baseline_run_id=baseline_run_id)
    if cfg.eval.enabled:  # TDC against the baseline, or alone
        comparison = evaluate_task(*args, baseline_run_id=baseline_run_id, baseline=baseline)
    if baseline_run_id is not None:
        tracking.finish(baseline_run_id)
    score_name, score = registry_score(comparison, groups, num_timesteps=cfg.diffusion.num_timesteps)
    tracking.log_metrics(tracking.parent_run_id, {score_name: score})
    registration = register_task(tracking=tracking, run_dir=str(root), preset=cfg.preset, num_groups=len(groups),
                                 score_name=score_name, score=score)
    summary = PipelineSummary(
        run_dir=str(root), mlflow_run_id=tracking.parent_run_id, baseline_run_id=baseline_run_id,
        tracking_uri=tracking.tracking_uri, experiment_id=tracking.experiment_id,
        boundaries=grouped.grouping.boundaries, groups=groups,
        shared=shared, baseline=baseline, costs=costs, comparison=comparison,
        registration=registration,
    )
    report_task(summary_json=summary.model_dump_json(), tracking=tracking)
    atomic_write_bytes(RunLayout(root).summary_json, summary.model_dump_json(indent=1).encode())
    if cfg.orchestration.storage:  # for whoever reads this run from elsewhere (a study on workers)
        publish_results_task(cfg, str(root))
    tracking.finish(tracking.parent_run_id)
    return summary


def _submit_to_workers(cfg: PipelineConfig, *, args: tuple, num_groups: int, run_key: str, after: object) -> list:
    """Publish the groups' inputs to the storage root, then one future per group: a flow run of
    ``orchestration.group_deployment`` (resubmitted ``orchestration.group_retries`` times)."""
    published = publish_inputs_task(cfg, args[1], run_key, wait_for=[after])
    say(f"fine-tuning {num_groups} group experts as flow runs of {cfg.orchestration.group_deployment} "
        f"(inputs in {published.storage})")
    remote = group_on_worker_task.with_options(retries=cfg.orchestration.group_retries)
    return [remote.submit(*args, group=g, published=published) for g in range(num_groups)]


def _all_groups(futures: list) -> list[GroupResult]:
    """Every group's result, once every group has finished or failed.

    A failed group does not stop the others: they run to the end and are cached, so the
    re-run redoes only the failed ones.

    Raises:
        GroupFailed: naming each failed group and why.
    """
    wait(futures)
    results, failures = [], []
    for g, f in enumerate(futures):
        try:
            results.append(f.result())
        except Exception as exc:  # noqa: BLE001 - collected and reported together below
            failures.append((g, exc))
    if failures:
        done = [g for g in range(len(futures)) if g not in {g for g, _ in failures}]
        reasons = "; ".join(str(exc) if f"group {g}" in str(exc) else f"group {g}: {exc}" for g, exc in failures)
        raise GroupFailed(
            f"{len(failures)} of {len(futures)} group fine-tunes failed: {reasons}. "
            + (f"Finished groups {done} are kept; " if done else "")
            + "re-run the same command to redo only the failed groups"
        )
    return results


def registry_score(comparison: Comparison | None, groups: list[GroupResult], *,
                   num_timesteps: int) -> tuple[str, float]:
    """What the registry ranks ensembles by (lower is better): held-out bits/dim when the
    evaluation ran (it needs no feature extractor and is stable at small n, unlike FID), else each
    expert's own held-out ε-MSE estimate weighted by its interval's share of [0, T) (a training
    diagnostic, not comparable across models: see the evaluation for that)."""
    if comparison is not None and comparison.likelihood:
        return "bits_per_dim", next(lk.bpd for lk in comparison.likelihood if lk.name == "tdc")
    if comparison is not None:
        return "fid_mean", comparison.tdc.eval.fid_mean
    return "groups_heldout_eps_mse", sum(g.heldout_loss * (g.hi - g.lo) for g in groups) / num_timesteps


def run_pipeline(
    config: PipelineConfig, *, run_dir: str | None = None, workers: int | None = None,
    tracking_uri: str | None = None,
) -> PipelineSummary:
    """Run the flow in this process (no Prefect server needed). The caller has run
    :func:`flows.checks.check_before_run` (``tdc run`` does, before starting Prefect's
    temporary server); the flow runs it again, which costs little the second time."""
    return tdc(config=config, run_dir=run_dir, tracking_uri=tracking_uri, workers=workers)
