"""Stage 1 by content: one probe, profile and shared model for every run that reads the same
stage-1 settings.

Stage 1 reads only :data:`tdc_core.config.STAGE1_SECTIONS` (data, model, diffusion, train,
profile). Runs that differ elsewhere — grouping, budgets, pruning, fine-tuning, baseline,
evaluation — are variants of stage 2, so they share one stage-1 folder,
``<runs>/stage1-<stage1_key>`` beside their run folders: the first run trains it, the others find
it finished (or wait for it, see :func:`hold_stage1`). Grouping and budgets are not shared as
files: they are recomputed per run from the shared profile in milliseconds, and equal settings
give equal results.

A run folder made before stage-1 folders existed keeps its stage 1 in itself and resumes as
before: :func:`attach_stage1` never points a folder that already holds stage-1 outputs elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from tdc_core.atomic import atomic_write_bytes
from tdc_core.config import PipelineConfig, stage1_key, write_run_config
from tdc_core.run.layout import RunLayout
from tdc_core.run.runlock import RunLock, hold_run_folder

__all__ = ["attach_stage1", "hold_stage1", "holds_stage1", "stage1_dir"]


def stage1_dir(config: PipelineConfig, *, runs_root: str | Path) -> Path:
    """The stage-1 folder of ``config`` under ``runs_root`` (the folder holding run folders)."""
    return Path(runs_root) / f"stage1-{stage1_key(config)}"


def holds_stage1(root: Path) -> bool:
    """Whether ``root`` holds stage-1 outputs (a shared checkpoint or a profile), finished or not."""
    return (root / "checkpoints" / "last.pt").exists() or (root / "profile" / "profile.json").exists()


def attach_stage1(layout: RunLayout, config: PipelineConfig) -> Path:
    """Point the run folder at its config's stage-1 folder (``stage1.json``, relative, written
    atomically) and return where stage 1 lives. A folder already holding stage-1 outputs of its
    own keeps them (old run folders resume unchanged)."""
    if holds_stage1(layout.root):
        return layout.root
    target = stage1_dir(config, runs_root=layout.root.resolve().parent)
    target.mkdir(parents=True, exist_ok=True)
    record = {"dir": os.path.relpath(target, layout.root.resolve()), "key": stage1_key(config)}
    if not layout.stage1_pointer.is_file() or json.loads(layout.stage1_pointer.read_text()) != record:
        atomic_write_bytes(layout.stage1_pointer, json.dumps(record).encode())
    stage1 = RunLayout(target)
    if not stage1.config.is_file():  # so tdc train/profile/sample can be pointed at the folder
        write_run_config(stage1, config)
    return target


@contextlib.contextmanager
def hold_stage1(layout: RunLayout, *, command: str,
                warn: Callable[[str], None] | None = None) -> Iterator[RunLock | None]:
    """Hold the run's stage-1 folder while stage 1 is written, waiting while another run trains
    it (its stage then finds the work done). Nothing to hold when stage 1 lives in the run
    folder, whose own lock the caller holds."""
    if not layout.shares_stage1:
        yield None
        return
    with hold_run_folder(layout.stage1_root, command=command, wait=True, warn=warn) as lock:
        yield lock
