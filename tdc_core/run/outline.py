"""The pipeline's stages in order, written once.

:data:`STAGES` is the outline every other place follows: the Prefect flow's body
(``flows/pipeline.py``, checked against it by a test), the stage commands' "next:" hints
(``flows/cli.py``) and :func:`run_stages`, which calls the stages directly in this order with no
orchestrator (benchmarks compare the flow against it; tests build a run folder with it).

Stage by stage (docs/METHOD.md): ``profile`` trains the probe and profiles difficulty (step 1);
``group`` groups timesteps and assigns FLOPs budgets (steps 2-3); ``shared`` continues the probe
to the shared model (step 4); ``finetune`` prunes and fine-tunes each group's copy (steps 5-6,
independent per group); ``costs`` counts sampling and training FLOPs (step 7); ``baseline``
trains the single model at TDC's training cost; ``evaluate`` compares the two.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from tdc_core.config import PipelineConfig
from tdc_core.evaluation.results import Comparison
from tdc_core.method.profiling import DifficultyProfile
from tdc_core.reporter import Reporter
from tdc_core.run.evaluation import compare_run
from tdc_core.run.layout import RunLayout
from tdc_core.run.stages import (
    CostReport,
    GroupingResult,
    GroupResult,
    baseline_stage,
    cost_stage,
    finetune_group_stage,
    group_stage,
    profile_stage,
    shared_stage,
)
from tdc_core.training.trainer import TrainResult

__all__ = ["STAGES", "StagesResult", "next_stage", "run_stages"]

STAGES: tuple[str, ...] = ("profile", "group", "shared", "finetune", "costs", "baseline", "evaluate")

T = TypeVar("T")


def next_stage(stage: str) -> str | None:
    """The stage after ``stage`` (None after the last)."""
    i = STAGES.index(stage)
    return STAGES[i + 1] if i + 1 < len(STAGES) else None


@dataclass
class StagesResult:
    """What :func:`run_stages` produced, and each stage's wall time in seconds."""

    profile: DifficultyProfile
    grouped: GroupingResult
    shared: TrainResult
    groups: list[GroupResult]
    costs: CostReport
    baseline: TrainResult | None = None
    comparison: Comparison | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def _in_process(config: PipelineConfig, layout: RunLayout, groups: list[int]) -> list[GroupResult]:
    return [finetune_group_stage(config, layout, group=g) for g in groups]


def run_stages(
    config: PipelineConfig, layout: RunLayout, *,
    finetune: Callable[[PipelineConfig, RunLayout, list[int]], list[GroupResult]] = _in_process,
    until: str = STAGES[-1], reporter: Reporter | None = None,
    on_stage: Callable[[str, float], None] | None = None,
) -> StagesResult:
    """Every stage of :data:`STAGES` up to ``until`` (inclusive), called directly in order.

    Args:
        finetune: runs the groups' fine-tunes and returns their results in group order;
            default one after another in this process (the flow runs each in its own process).
        until: the last stage to run; ``baseline`` runs only when ``baseline.enabled``, and
            ``evaluate`` when ``eval.enabled`` (TDC against the baseline, or alone).
        on_stage: called with (stage, seconds) after each stage.
    """
    last = STAGES.index(until)
    seconds: dict[str, float] = {}

    def timed(stage: str, fn: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        out = fn()
        seconds[stage] = time.perf_counter() - t0
        if on_stage is not None:
            on_stage(stage, seconds[stage])
        return out

    def wanted(stage: str) -> bool:
        return STAGES.index(stage) <= last

    profile = timed("profile", lambda: profile_stage(config, layout, reporter=reporter))
    grouped = timed("group", lambda: group_stage(config, layout)) if wanted("group") else None
    shared = timed("shared", lambda: shared_stage(config, layout, reporter=reporter)) if wanted("shared") else None
    result = StagesResult(profile=profile, grouped=grouped, shared=shared, groups=[], costs=None, seconds=seconds)
    if not wanted("finetune"):
        return result
    result.groups = timed("finetune", lambda: finetune(config, layout, list(range(grouped.grouping.num_groups))))
    if not wanted("costs"):
        return result
    result.costs = timed("costs", lambda: cost_stage(config, layout))
    if config.baseline.enabled and wanted("baseline"):
        steps = config.baseline.steps or result.costs.training.baseline_steps
        result.baseline = timed("baseline", lambda: baseline_stage(config, layout, steps=steps, reporter=reporter))
    if config.eval.enabled and wanted("evaluate"):
        baseline = result.baseline
        result.comparison = timed("evaluate", lambda: compare_run(
            config, layout, baseline_checkpoint=baseline.checkpoint if baseline is not None else None,
            reporter=reporter))
    return result
