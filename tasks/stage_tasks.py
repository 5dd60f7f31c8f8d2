"""Prefect tasks: one per pipeline stage, each a thin wrapper over :mod:`tdc_core.run.stages`.

A task takes the config, the run folder and a :class:`TrackingRef` (paths and small records,
never tensors), runs its stage inside its own MLflow child run, logs the stage's metrics and
artifacts, and returns a small pydantic record.

Caching: finished stages are cached on (task source, inputs) with persisted results, so
re-running a failed pipeline with the same config skips them; ``run_uid`` (a random id written
once into the run folder) is an input, so deleting the folder invalidates the cache.
Training stages are not cached when they fail and resume from their own checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy
from prefect.utilities.hashing import hash_objects
from pydantic import BaseModel, ConfigDict

from tasks.console import say
from tasks.progress import StageProgress
from tasks.tracking import MlflowReporter, TrackingRef
from tdc_core.config import PipelineConfig, flatten, write_run_config
from tdc_core.errors import TDCError, TrainingError
from tdc_core.evaluation.curves import Curve, plot_curve
from tdc_core.evaluation.results import Comparison
from tdc_core.method.profiling import DifficultyProfile
from tdc_core.records import load_record, save_record
from tdc_core.reporter import MultiReporter
from tdc_core.run.curve import single_model_curve
from tdc_core.run.evaluation import compare_run
from tdc_core.run.layout import RunLayout
from tdc_core.run.stage1 import hold_stage1
from tdc_core.run.stages import (
    CostReport,
    GroupingResult,
    GroupResult,
    baseline_config,
    baseline_snapshot_steps,
    baseline_stage,
    cost_stage,
    group_stage,
    profile_stage,
    shared_stage,
    stage1_snapshot_steps,
    start_baseline_from_shared,
)
from tdc_core.run.worker import finetune_group_command, train_command
from tdc_core.run.worker_reports import JsonlTail, read_jsonl_metrics
from tdc_core.training.device import peak_memory_gib, reset_peak_memory, resolve_device
from tdc_core.training.trainer import TrainResult

__all__ = [
    "GroupFailed",
    "TrainSummary",
    "baseline_task",
    "costs_task",
    "evaluate_task",
    "finetune_group_task",
    "group_task",
    "profile_task",
    "shared_train_task",
]



def _inputs_but_eval(context: object, parameters: dict) -> str | None:
    """Cache key of a stage that never reads ``eval.*``: its inputs with the config's ``eval``
    section left out, so changing an evaluation setting re-runs the evaluation alone. The
    ``orchestration`` section (where groups run) is left out too: it changes no result."""
    rest = {k: v for k, v in parameters.items() if k != "config"}
    config = parameters["config"].model_dump(mode="json", exclude={"eval", "orchestration"})
    return hash_objects(config, rest)


# Training stages: keyed by what they read (not eval.*) and their code; the evaluation: by all
# its inputs and its code.
CACHED = {"cache_policy": CacheKeyFnPolicy(cache_key_fn=_inputs_but_eval) + TASK_SOURCE, "persist_result": True}
EVAL_CACHED = {"cache_policy": INPUTS + TASK_SOURCE, "persist_result": True}
_RELAY_EVERY_S = 1.0  # how often a worker's progress is replayed to the user


class GroupFailed(TDCError):
    """A group's fine-tune process failed (crashed, was killed, or raised)."""


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def _last_error(output: str) -> list[str]:
    """The line that says what went wrong: the last non-empty line of the process's output
    (the exception, or the CLI's one-line error)."""
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    return lines[-1:]


def run_worker(cmd: list[str], *, env: dict[str, str], what: str, error: type[TDCError],
                relay: JsonlTail | None = None) -> None:
    """Run a worker process of the project (``tdc finetune-group``, ``torchrun ... tdc train``),
    replaying its progress (``relay``) while it runs.

    Raises:
        error: ``"<what> failed (<exit code or signal>): <its last line of output>"``.
    """
    with tempfile.TemporaryFile("w+") as out:  # a file, not a pipe: a chatty worker never blocks
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                cwd=Path(__file__).resolve().parents[1])
        try:
            while True:
                try:
                    proc.wait(timeout=_RELAY_EVERY_S)
                    break
                except subprocess.TimeoutExpired:
                    if relay is not None:
                        relay.poll()
        except BaseException:
            proc.kill()  # this thread is being torn down: the worker must not outlive it
            proc.wait()
            raise
        if relay is not None:
            relay.poll()
        if proc.returncode != 0:
            out.seek(0)
            # Killed by a signal: its output ends wherever it was, so it says nothing about why.
            detail = _last_error(out.read()) if proc.returncode > 0 else []
            raise error(f"{what} failed ({_exit_reason(proc.returncode)})" + "".join(f": {line}" for line in detail))


class TrainSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    step: int
    checkpoint: str
    train_loss: float
    heldout_loss: float
    initial_heldout_loss: float
    seconds: float
    resumed_from: int

    @classmethod
    def of(cls, r: TrainResult) -> TrainSummary:
        return cls(step=r.step, checkpoint=str(r.checkpoint), train_loss=r.train_loss, heldout_loss=r.heldout_loss,
                   initial_heldout_loss=r.initial_heldout_loss, seconds=r.seconds, resumed_from=r.resumed_from)


def _train_metrics(s: TrainSummary) -> dict[str, float]:
    return {"final_heldout_loss": s.heldout_loss, "final_train_loss": s.train_loss, "steps": s.step,
            "train_seconds": s.seconds}


def _tag_stage1(tracking: TrackingRef, run_id: str, layout: RunLayout) -> None:
    """Say on the stage's MLflow run where stage 1 lives: runs sharing it show the same folder."""
    tracking.set_tags(run_id, {"stage1_dir": str(layout.stage1_root)})


@task(name="profile", **CACHED)
def profile_task(config: PipelineConfig, run_dir: str, run_uid: str, tracking: TrackingRef) -> DifficultyProfile:
    """Probe training (start of shared training) + difficulty profile (docs/METHOD.md step 1)."""
    layout = RunLayout(Path(run_dir))
    if config.train.init_from is not None:
        say(f"stage 1: the IDDPM checkpoint {config.train.init_from} as the shared model (step {config.train.steps}), "
            f"then its difficulty profile ({config.profile.num_buckets} buckets)")
    else:
        say(f"probe: shared training to step {config.profile.profile_steps}, then difficulty profile "
            f"({config.profile.num_buckets} buckets)")
    with tracking.child_run(key="stage.profile", name="profile") as run_id:
        device = resolve_device(config.train.device)
        reset_peak_memory(device)
        _tag_stage1(tracking, run_id, layout)
        with (hold_stage1(layout, command="flow tdc: probe", warn=say),
              MlflowReporter(tracking, run_id, prefix="probe_") as reporter, StageProgress("probe") as progress):
            profile = profile_stage(config, layout, reporter=MultiReporter(reporter, progress), reuse=True)
        _log_peak_memory(tracking, run_id, device)
        edges = profile.bucket_edges
        # One point per bucket, at the bucket's first timestep: the UI plots the profile.
        tracking.log_points(run_id, [
            (k, v, edges[b]) for b in range(profile.num_buckets)
            for k, v in (("bucket_loss_mean", profile.loss_mean[b]), ("bucket_loss_std", profile.loss_std[b]),
                         ("bucket_snr_db", profile.snr_db[b]))
        ])
        tracking.log_metrics(run_id, {"profile_seconds": profile.seconds, "probe_step": profile.model_step})
        tracking.log_artifact(run_id, layout.profile_json, artifact_path="profile")
        tracking.log_artifact(run_id, layout.profile_png, artifact_path="profile")
    say(f"profiled the model at step {profile.model_step}: ε-MSE {profile.loss_mean[0]:.3f} at t≈0 … "
        f"{profile.loss_mean[-1]:.3f} at t≈T  ({layout.profile_png})")
    return profile


@task(name="group", **CACHED)
def group_task(config: PipelineConfig, run_dir: str, run_uid: str, tracking: TrackingRef) -> GroupingResult:
    """Timestep groups and FLOPs budgets (docs/METHOD.md steps 2-3)."""
    layout = RunLayout(Path(run_dir))
    with tracking.child_run(key="stage.group", name="group") as run_id:
        res = group_stage(config, layout)
        tracking.log_points(run_id, [
            (k, v, b.group) for b in res.plan.budgets
            for k, v in (("group_lo", b.lo), ("group_hi", b.hi), ("group_rank", b.rank),
                         ("group_budget_fraction", b.fraction), ("group_difficulty", res.grouping.difficulty[b.group]))
        ])
        tracking.log_metrics(run_id, {"base_flops": res.plan.base_flops, "grouping_cost": res.grouping.total_cost})
        tracking.set_tags(run_id, {"boundaries": str(res.grouping.boundaries)})
        tracking.set_tags(tracking.parent_run_id, {"tdc.boundaries": str(res.grouping.boundaries)})
        for p in (layout.grouping_json, layout.budgets_json, layout.grouping_png):
            tracking.log_artifact(run_id, p, artifact_path="grouping")
    budgets = ", ".join(f"[{b.lo},{b.hi})→{b.fraction:.2f}F" for b in res.plan.budgets)
    say(f"{res.grouping.num_groups} groups: {budgets}  ({layout.grouping_png})")
    return res


@task(name="shared", **CACHED)
def shared_train_task(config: PipelineConfig, run_dir: str, run_uid: str, tracking: TrackingRef) -> TrainSummary:
    """Stage 1: the shared model, continuing the probe's run to ``train.steps``."""
    layout = RunLayout(Path(run_dir))
    say(f"shared training to step {config.train.steps}")
    with tracking.child_run(key="stage.shared", name="shared-train") as run_id:
        _tag_stage1(tracking, run_id, layout)
        with hold_stage1(layout, command="flow tdc: shared training", warn=say), \
                StageProgress("shared training") as progress:
            if train_processes(config) > 1:
                summary = _train_under_torchrun(config, layout.stage1_root, tracking=tracking, run_id=run_id,
                                                progress=progress, snapshot_steps=stage1_snapshot_steps(config))
            else:
                with MlflowReporter(tracking, run_id) as reporter:
                    summary = TrainSummary.of(shared_stage(config, layout, reporter=MultiReporter(reporter, progress)))
        tracking.log_metrics(run_id, _train_metrics(summary), step=summary.step)
        tracking.log_artifact(run_id, layout.shared_checkpoint, artifact_path="checkpoints")
    say(f"shared model: {summary.step} steps ({summary.seconds:.0f} s)")
    return summary


def _log_jsonl_metrics(tracking: TrackingRef, run_id: str, path: Path) -> None:
    """Log a subprocess's metrics file (:class:`tdc_core.run.worker_reports.JsonlReporter`) to ``run_id``.

    The whole file, not only this attempt's lines: an attempt that was killed reported steps
    that its resumed successor does not report again. One value per (metric, step), the latest
    attempt's; ``log_metric_items`` skips what MLflow already holds.
    """
    points = {(k, step): v for step, m in read_jsonl_metrics(path) for k, v in m.items()}
    tracking.log_points(run_id, [(k, v, step) for (k, step), v in points.items()])


def _log_peak_memory(tracking: TrackingRef, run_id: str, device, *, name: str = "peak_gpu_memory_gib") -> None:
    """Log the stage's peak CUDA memory in GiB (training stages log theirs from the trainer)."""
    peak = peak_memory_gib(device)
    if peak is not None:
        tracking.log_metrics(run_id, {name: peak})


def train_processes(config: PipelineConfig) -> int:
    """Processes for dense training: ``train.processes``, else one per visible GPU (1 on CPU)."""
    if config.train.processes is not None:
        return config.train.processes
    return torch.cuda.device_count() if config.train.device != "cpu" and torch.cuda.is_available() else 1


def _train_under_torchrun(config: PipelineConfig, out: Path, *, tracking: TrackingRef, run_id: str,
                          progress: StageProgress, snapshot_steps: list[int]) -> TrainSummary:
    """Dense training of ``config`` in ``out`` as a DDP job: ``torchrun`` starts one ``tdc train``
    process per GPU (or CPU share); rank 0 writes the checkpoint, metrics (JSON lines, logged to
    ``run_id`` here) and the result. Resumes from ``out``'s checkpoint like the in-process path.
    """
    n = train_processes(config)
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(RunLayout(out), config)  # every process reads the config from the folder
    metrics_file, result_file = RunLayout(out).train_metrics, RunLayout(out).train_result
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           *train_command(out_dir=out, metrics_file=metrics_file, result_file=result_file,
                         snapshot_steps=snapshot_steps)]
    run_worker(cmd, env=env, what=f"training in {out} under torchrun ({n} processes)", error=TrainingError,
                relay=JsonlTail(metrics_file, progress))
    _log_jsonl_metrics(tracking, run_id, metrics_file)
    record = json.loads(result_file.read_text())
    return TrainSummary(**{k: record[k] for k in TrainSummary.model_fields})


class _DeviceSlots:
    """At most one group per GPU (or per CPU worker) at a time, across task threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[str | None] | None = None
        self._cond = threading.Condition(self._lock)

    def configure(self, slots: list[str | None]) -> None:
        with self._lock:
            self._free = list(slots)

    @contextmanager
    def acquire(self) -> Iterator[str | None]:
        with self._cond:
            if self._free is None:
                self._free = [None]
            while not self._free:
                self._cond.wait()
            slot = self._free.pop(0)
        try:
            yield slot
        finally:
            with self._cond:
                self._free.append(slot)
                self._cond.notify()


DEVICE_SLOTS = _DeviceSlots()


def worker_slots(max_workers: int | None = None) -> list[str | None]:
    """One slot per visible GPU (its CUDA device id), else ``max_workers`` CPU slots (default:
    2, bounded by the core count)."""
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return [str(i) for i in range(n if max_workers is None else min(n, max_workers))]
    cores = os.cpu_count() or 1
    return [None] * max(1, min(cores, max_workers or 2))


@task(name="finetune", **CACHED)
def finetune_group_task(
    config: PipelineConfig, run_dir: str, run_uid: str, tracking: TrackingRef, group: int, threads: int = 1,
) -> GroupResult:
    """Stage 2 for one group, in its own process (crash isolation; memory freed at exit) on one
    GPU (``CUDA_VISIBLE_DEVICES``) or a share of the CPU cores."""
    layout = RunLayout(Path(run_dir))
    metrics_file = layout.group_metrics(group)
    with tracking.child_run(key=f"group.{group}", name=f"group-{group}") as run_id, DEVICE_SLOTS.acquire() as slot:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        else:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, *finetune_group_command(run_dir=layout.root, group=group, metrics_file=metrics_file)]
        with StageProgress(f"group {group}") as progress:
            run_worker(cmd, env=env, what=f"group {group} fine-tune", error=GroupFailed,
                       relay=JsonlTail(metrics_file, progress))
        result = load_record(layout.group_result(group), GroupResult, what="group result")
        log_group_result(tracking, run_id, layout=layout, result=result, tags={"device": slot or "cpu"})
    say_group(result, where=slot and "GPU " + slot or "CPU")
    return result


def log_group_result(tracking: TrackingRef, run_id: str, *, layout: RunLayout, result: GroupResult,
                     tags: dict[str, str]) -> None:
    """Log a finished group (its folder in ``layout``) on its MLflow run: the fine-tune's metric
    series, its result, pruning record and checkpoint."""
    group = result.group
    _log_jsonl_metrics(tracking, run_id, layout.group_metrics(group))
    tracking.log_metrics(run_id, {
        "flops": result.flops, "budget_flops": result.budget_flops, "budget_met": float(result.budget_met),
        "heldout_loss_shared": result.heldout_loss_shared, "heldout_loss": result.heldout_loss,
        "finetune_seconds": result.seconds, "lo": result.lo, "hi": result.hi, "rank": result.rank,
        "pruning_flops": result.pruning_flops,
        **({"heldout_loss_pruned": result.heldout_loss_pruned} if result.heldout_loss_pruned is not None else {}),
    }, step=result.steps)
    prune_dir = layout.prune_dir(group)
    for name in ("memory.json", "prune.png"):  # the pruning rounds' decision log and plot
        tracking.log_artifact(run_id, prune_dir / name, artifact_path="pruning")
    tracking.set_tags(run_id, {"interval": f"[{result.lo}, {result.hi})", **tags})
    tracking.log_artifact(run_id, layout.group_result(group), artifact_path="group")
    tracking.log_artifact(run_id, layout.group_checkpoint(group), artifact_path="checkpoints")


def say_group(result: GroupResult, *, where: str) -> None:
    """One console line per finished group."""
    # The ε-MSE here is the fine-tune's own check (a few held-out batches on the group's
    # timesteps), labelled as such: the evaluation scores every model on one held-out set.
    pruned = (f"pruned to {result.flops / 1e6:.1f} MFLOP (budget {result.budget_flops / 1e6:.1f}), "
              if result.pruned else "")
    check = (f"shared {result.heldout_loss_shared:.4f}"
             + (f" → pruned {result.heldout_loss_pruned:.4f}" if result.heldout_loss_pruned is not None else "")
             + f" → expert {result.heldout_loss:.4f}")
    say(f"group {result.group} [{result.lo}, {result.hi}): {pruned}{result.steps} fine-tune steps "
        f"({result.seconds:.0f} s, {where}); training check, ε-MSE on its timesteps: {check}")


@task(name="costs", **CACHED)
def costs_task(config: PipelineConfig, run_dir: str, run_uid: str, tracking: TrackingRef,
               groups: list[GroupResult]) -> CostReport:
    """Sampling and training cost of TDC vs a single model (logged on the parent run)."""
    layout = RunLayout(Path(run_dir))
    report = cost_stage(config, layout)
    s, t = report.sampling, report.training
    tracking.log_metrics(tracking.parent_run_id, {
        "sampling_flops_per_image": s.total_flops, "sampling_flops_ratio": s.ratio,
        "training_flops": t.tdc_flops, "training_flops_ratio": t.ratio, "budgets_met": float(report.budgets_met),
    })
    tracking.log_artifact(tracking.parent_run_id, layout.costs_json)
    return report


@task(name="baseline", **CACHED)
def baseline_task(config: PipelineConfig, run_dir: str, run_uid: str, tracking: TrackingRef,
                  steps: int, baseline_run_id: str) -> TrainSummary:
    """The single-model baseline: same data, model, optimiser; ``steps`` steps on all timesteps,
    in ``<run_dir>/baseline``, tracked as its own top-level MLflow run beside TDC's."""
    cfg = baseline_config(config, steps=steps)
    out = RunLayout(Path(run_dir)).baseline_dir
    say(f"baseline: one model, {steps} steps on all timesteps (≥ TDC's training FLOPs)")
    start = start_baseline_from_shared(config, RunLayout(Path(run_dir)), steps=steps)
    if start is not None:
        say(f"baseline: continues the shared run from its step {start} (the same run: not trained twice; "
            f"charged for all {steps} steps)")
        tracking.set_tags(baseline_run_id, {"started_from": f"shared checkpoint at step {start}"})
    elif not config.train.length_free:
        say(f"baseline: a run of its own, not the shared run continued (train.lr_schedule=cosine decays over "
            f"each run's length: {config.train.steps} steps for the shared model, {steps} for the baseline)")
    with StageProgress("baseline") as progress:
        if train_processes(cfg) > 1:
            summary = _train_under_torchrun(cfg, out, tracking=tracking, run_id=baseline_run_id, progress=progress,
                                            snapshot_steps=baseline_snapshot_steps(config, steps=steps))
        else:
            with MlflowReporter(tracking, baseline_run_id) as reporter:
                summary = TrainSummary.of(baseline_stage(config, RunLayout(Path(run_dir)), steps=steps,
                                                         reporter=MultiReporter(reporter, progress)))
    tracking.log_metrics(baseline_run_id, _train_metrics(summary), step=summary.step)
    tracking.log_artifact(baseline_run_id, RunLayout(out).shared_checkpoint, artifact_path="checkpoints")
    say(f"baseline: {summary.step} steps ({summary.seconds:.0f} s); every model is scored by the evaluation below")
    return summary


@task(name="evaluate", **EVAL_CACHED)
def evaluate_task(config: PipelineConfig, run_dir: str, run_uid: str, tracking: TrackingRef,
                  baseline_run_id: str | None, baseline: TrainSummary | None) -> Comparison:
    """FID/KID of the TDC ensemble and the baseline, evaluated identically (same sample count,
    seeds, sampler, steps and features), with sampling and training cost side by side, and the
    single model's curve; without a baseline (``baseline.enabled=false``), TDC's numbers alone."""
    layout = RunLayout(Path(run_dir))
    say(f"evaluating TDC{' and the baseline' if baseline is not None else ' alone (no baseline)'}: "
        f"{config.eval.num_samples} samples × seeds {list(config.eval.seeds)}")
    device = resolve_device(config.train.device)
    reset_peak_memory(device)
    with StageProgress("evaluation") as progress:
        c = compare_run(config, layout, baseline_checkpoint=Path(baseline.checkpoint) if baseline else None,
                        device=device, reporter=progress)
        # The single model's curve continues into the baseline's run: none without one.
        curve = single_model_curve(config, layout, c, device=device, reporter=progress) if baseline else None
    files = [c.markdown_path, c.json_path, c.plot_path]
    if curve is not None:
        save_record(layout.curve_json, curve)
        plot_curve(curve, layout.curve_png, title=f"Single model vs TDC — {layout.root.name}")
        files += [layout.curve_json, layout.curve_png]
    _log_peak_memory(tracking, tracking.parent_run_id, device, name="eval_peak_gpu_memory_gib")
    # eval.* are tags, not params: MLflow params cannot change, and a re-evaluation changes them.
    eval_tags = {f"eval.{k}": v for k, v in flatten(config.eval).items()}
    for run_id in (tracking.parent_run_id, baseline_run_id):
        if run_id is not None:
            tracking.set_tags(run_id, eval_tags)
    with tracking.child_run(key="stage.shared", name="shared-train") as shared_run_id:
        runs = {"tdc": tracking.parent_run_id, "shared": shared_run_id}
        _log_evaluation(c, tracking, runs=runs | ({"baseline": baseline_run_id} if baseline_run_id else {}))
    tracking.log_metrics(tracking.parent_run_id, {
        f"tdc_minus_{d.b}_{d.metric}{suffix}": value for d in (*c.heldout_differences, *c.likelihood_differences)
        for suffix, value in (("", d.difference), ("_ci_low", d.ci_low), ("_ci_high", d.ci_high))
    })
    for p in files:
        tracking.log_artifact(tracking.parent_run_id, p, artifact_path="comparison")
    if curve is not None:
        _log_curve(curve, tracking, baseline_run_id=baseline_run_id)
    say(f"FID ({c.comparability}): TDC {c.tdc.eval.fid_mean:.4f} ± {c.tdc.eval.fid_std:.4f}"
        + (f", baseline {c.baseline.eval.fid_mean:.4f} ± {c.baseline.eval.fid_std:.4f}" if c.baseline else ""))
    for d in (*c.heldout_differences, *c.likelihood_differences):
        if d.b == "baseline" or c.baseline is None:
            say(f"TDC − {d.b} {d.metric}: {d.difference:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}] (95 %, "
                f"{d.n} held-out images)")
    return c


def _log_curve(curve: Curve, tracking: TrackingRef, *, baseline_run_id: str) -> None:
    """The single model's points on the baseline's run (MLflow step = optimizer steps, so the UI
    draws the curve), and where TDC sits against it, on both runs."""
    tracking.log_points(baseline_run_id, [
        (k, v, p.step) for p in curve.single if p.step is not None
        for k, v in (("curve_bits_per_dim", p.bits_per_dim), ("curve_heldout_eps_mse", p.eps_mse),
                     ("curve_training_flops", p.training_flops))])
    matched = curve.single_at(curve.tdc.training_flops)
    if matched is not None:
        gap = {"tdc_minus_single_at_equal_flops_bits_per_dim": curve.tdc.bits_per_dim - matched.bits_per_dim}
        tracking.log_metrics(tracking.parent_run_id, gap)
    pts = ", ".join(f"{p.bits_per_dim:.3f}" for p in curve.single)
    say(f"single model along its training ({len(curve.single)} points, {curve.single[0].step}→"
        f"{curve.single[-1].step} steps): bits/dim {pts}; TDC {curve.tdc.bits_per_dim:.3f} at "
        f"{curve.tdc.training_flops / curve.single[-1].training_flops:.0%} of the last point's training FLOPs")


def _log_evaluation(c: Comparison, tracking: TrackingRef, *, runs: dict[str, str]) -> None:
    """Each model's numbers, per-seed scores, tags and sample PNGs on its own MLflow run."""
    for name, run_id in runs.items():
        # The same metric names on every run: the MLflow UI compares them side by side.
        tracking.log_metrics(run_id, evaluation_metrics(c, name))
        row = {"tdc": c.tdc, "baseline": c.baseline}.get(name)
        if row is None:
            continue
        for s in row.eval.per_seed:
            tracking.log_metrics(run_id, {"fid_per_seed": s.fid, **({"kid_per_seed": s.kid} if s.kid is not None
                                                                   else {})}, step=s.seed)
        tracking.set_tags(run_id, {"fid.features": c.feature_extractor, "fid.mode": c.fid_mode,
                                   "fid.comparability": c.comparability})
        for png in (row.eval.grid_png, *(q.nearest_png for q in c.sample_quality if q.name == name)):
            if png:
                tracking.log_artifact(run_id, png, artifact_path="samples")


def evaluation_metrics(c: Comparison, name: str) -> dict[str, float]:
    """One model's numbers from a comparison, under the metric names every run shares."""
    out: dict[str, float] = {}
    row = {"tdc": c.tdc, "baseline": c.baseline}.get(name)
    if row is not None:
        e = row.eval
        out |= {"fid_mean": e.fid_mean, "fid_std": e.fid_std, "sampling_seconds_per_image": e.seconds_per_image,
                "sampling_flops_per_image": row.cost.sampling_flops_per_image}
        out |= {"kid_mean": e.kid_mean, "kid_std": e.kid_std} if e.kid_mean is not None else {}
        out |= {"training_flops": row.cost.training_flops} if row.cost.training_flops is not None else {}
    for h in c.heldout:
        if h.name == name:
            out |= {"heldout_eps_mse": h.eps_mse, "heldout_eps_mse_se": h.eps_mse_se, "heldout_x0_mse": h.x0_mse,
                    "heldout_eps_mse_min_snr": h.eps_mse_min_snr}
    for lk in c.likelihood:
        if lk.name == name:
            out |= {"bits_per_dim": lk.bpd, "bits_per_dim_se": lk.bpd_se}
    for q in c.sample_quality:
        if q.name == name:
            out |= {"precision": q.precision, "recall": q.recall}
            out |= {"memorized_share": q.memorized_share} if q.memorized_share is not None else {}
    return out
