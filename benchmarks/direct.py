"""The pipeline's stages called directly: no Prefect, no MLflow. The reference that
``bench_orchestration`` compares the flow against, doing exactly the flow's work: the stages of
:data:`tdc_core.run.outline.STAGES` in order, with the groups fanned out to worker processes as
the flow does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tdc_core.config import PipelineConfig, write_run_config
from tdc_core.records import load_record
from tdc_core.run.layout import RunLayout
from tdc_core.run.outline import run_stages
from tdc_core.run.stages import GroupResult
from tdc_core.run.worker import finetune_group_command

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["finetune_groups", "run_direct"]


def finetune_groups(run_dir: Path, groups: list[int], *, workers: int, threads: int) -> float:
    """Fine-tune ``groups`` as the flow does (one worker process each, ``workers`` at a time,
    ``threads`` torch threads each); returns the wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    layout = RunLayout(run_dir)

    def one(g: int) -> None:
        cmd = [sys.executable, *finetune_group_command(run_dir=run_dir, group=g, metrics_file=layout.group_metrics(g))]
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
    threads = max(1, (os.cpu_count() or 1) // workers)

    def fan_out(cfg: PipelineConfig, lay: RunLayout, groups: list[int]) -> list[GroupResult]:
        finetune_groups(lay.root, groups, workers=workers, threads=threads)
        return [load_record(lay.group_result(g), GroupResult, what="group result") for g in groups]

    def show(stage: str, seconds: float) -> None:
        print(f"  direct {stage}: {seconds:.1f} s", flush=True)

    return run_stages(config, layout, finetune=fan_out, on_stage=show).seconds
