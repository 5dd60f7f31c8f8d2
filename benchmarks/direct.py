"""The pipeline's stages called directly: no Prefect, no MLflow. The reference that
``bench_orchestration`` compares the flow against, doing exactly the flow's work."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tdc_core.config import PipelineConfig, write_run_config
from tdc_core.evaluation.evaluate import compare_run
from tdc_core.run.layout import RunLayout
from tdc_core.run.stages import cost_stage, group_stage, profile_stage, shared_stage
from tdc_core.training.trainer import run_training

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["finetune_groups", "run_direct"]


def finetune_groups(run_dir: Path, groups: list[int], *, workers: int, threads: int) -> float:
    """Fine-tune ``groups`` as the flow does (one ``tdc finetune-group`` process each, ``workers``
    at a time, ``threads`` torch threads each); returns the wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}

    def one(g: int) -> None:
        cmd = [sys.executable, "-m", "flows.cli", "finetune-group", "--run-dir", str(run_dir), "--group", str(g),
               "--quiet"]
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"group {g} failed: {done.stderr[-2000:]}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, groups))
    return time.perf_counter() - t0


def run_direct(config: PipelineConfig, run_dir: Path, *, workers: int = 2) -> dict[str, float]:
    """Every stage of the flow, in the flow's order, called directly; seconds per stage."""
    layout = RunLayout(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(layout, config)
    times: dict[str, float] = {}

    def timed(name: str, fn):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t0
        print(f"  direct {name}: {times[name]:.1f} s", flush=True)
        return out

    timed("profile", lambda: profile_stage(config, layout))
    grouped = timed("group", lambda: group_stage(config, layout))
    timed("shared", lambda: shared_stage(config, layout))
    threads = max(1, (os.cpu_count() or 1) // workers)
    times["groups"] = finetune_groups(run_dir, list(range(grouped.grouping.num_groups)), workers=workers,
                                      threads=threads)
    print(f"  direct groups: {times['groups']:.1f} s", flush=True)
    costs = timed("costs", lambda: cost_stage(config, layout))
    if config.baseline.enabled:
        steps = config.baseline.steps or costs.training.baseline_steps
        cfg = config.model_copy(update={"train": config.train.model_copy(update={"steps": steps})})
        baseline = timed("baseline", lambda: run_training(cfg, run_dir=run_dir / "baseline"))
        timed("evaluate", lambda: compare_run(config, layout, baseline_checkpoint=baseline.checkpoint))
    return times
