"""The TDC stages (docs/METHOD.md steps 1–4, 6, 7), each a plain function over a run folder.

Each stage reads what earlier stages wrote (paths from :class:`RunLayout`), computes, writes its
own outputs atomically and returns a small JSON-friendly record, so an orchestrator can wrap
each one in a task and pass only paths and records between them. Nothing here talks to Prefect
or MLflow; progress goes to the caller's :class:`Reporter`.

Order: :func:`profile_stage` (trains the probe = the first ``profile_steps`` of shared training,
then profiles it) → :func:`group_stage` → :func:`shared_stage` (continues the same run to
``train.steps``) → :func:`finetune_group_stage` per group (independent; any process or GPU) →
:func:`assemble_router` / :func:`cost_stage`.

A group whose budget is below F is pruned to it before its fine-tune (step 5, proxy-guided
progressive rounds, :mod:`tdc_core.method.pruning.search`), unless ``prune.enabled`` is false: then it is
fine-tuned at full width and its result says ``budget_met = False``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from tdc_core.atomic import atomic_write
from tdc_core.config import PipelineConfig
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.diffusion.samplers import sampling_timesteps
from tdc_core.errors import CheckpointError, ConfigError
from tdc_core.evaluation.plots import plot_grouping, plot_profile
from tdc_core.method.budgets import BudgetPlan, assign_budgets
from tdc_core.method.costs import SamplingCost, TrainingCost, sampling_cost, training_cost
from tdc_core.method.grouping import Grouping, group_timesteps
from tdc_core.method.profiling import DifficultyProfile, profile_difficulty
from tdc_core.method.pruning.proxies.records import MemoryBank
from tdc_core.method.pruning.search import plot_prune_rounds, prune_to_budget
from tdc_core.method.pruning.space import count_spec_flops, prune_space, uniform_widths
from tdc_core.method.routing import ExpertRouter, load_router
from tdc_core.method.sensitivity import bucket_sensitivity, uniformly_pruned_losses
from tdc_core.model.flops import count_forward_flops
from tdc_core.model.unet import UNetSpec
from tdc_core.records import load_record, save_record
from tdc_core.reporter import NullReporter, Reporter
from tdc_core.run.layout import RunLayout
from tdc_core.training.checkpoint import load_checkpoint
from tdc_core.training.device import resolve_device
from tdc_core.training.trainer import (
    Trainer,
    TrainPlan,
    TrainResult,
    init_model,
    load_model,
    prepare_data,
    run_training,
    spec_for,
)

__all__ = [
    "CostReport",
    "baseline_config",
    "baseline_snapshot_steps",
    "baseline_stage",
    "stage1_snapshot_steps",
    "start_baseline_from_shared",
    "GroupResult",
    "GroupingResult",
    "assemble_router",
    "cost_stage",
    "finetune_group_stage",
    "finetune_lr",
    "finetune_steps",
    "group_stage",
    "profile_stage",
    "shared_stage",
]

class GroupingResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    grouping: Grouping
    plan: BudgetPlan


class GroupResult(BaseModel):
    """Outcome of one group's fine-tune (written to ``groups/group-<g>/result.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: int
    lo: int                        # first timestep of the group
    hi: int                        # one past its last timestep
    rank: int                      # 1 = easiest … N = hardest
    steps: int                     # fine-tuning steps done
    flops: int                     # FLOPs of one forward pass of the group's model
    budget_flops: float            # its budget
    budget_met: bool               # flops ≤ budget·(1 + prune.tolerance)
    pruned: bool                   # whether channels were removed
    pruning_flops: float = 0.0     # compute of the pruning search (scoring + recovery), FLOPs
    heldout_loss_shared: float     # shared model's held-out ε-MSE on [lo, hi)
    heldout_loss_pruned: float | None = None  # the pruned model before fine-tuning, same samples
    heldout_loss: float            # the fine-tuned model's, same samples
    seconds: float
    started_at: float              # wall clock (Unix time, s) when the stage began
    finished_at: float             # and when it ended: lets a caller check parallel overlap
    checkpoint: str


class CostReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sampling: SamplingCost
    training: TrainingCost
    sampler: str
    sampling_steps: int
    budgets_met: bool
    # Set when stage 1 was imported (train.init_from): its FLOPs are IDDPM's published training,
    # charged as if run here, and this says so wherever the cost is shown.
    stage1_imported: str | None = None


# Where a dense run keeps its EMA weights on the way (the single-model quality-vs-compute curve,
# tdc_core.run.curve): at these fractions of stage 1, and of the baseline's steps beyond stage 1.
CURVE_FRACTIONS = (0.25, 0.5, 0.75)


def _fractions_of(lo: int, hi: int) -> list[int]:
    return sorted({lo + round(f * (hi - lo)) for f in CURVE_FRACTIONS} - {lo, hi})


def stage1_snapshot_steps(config: PipelineConfig) -> list[int]:
    """Steps of the shared run whose EMA weights are kept: 25/50/75 % of ``train.steps``."""
    return _fractions_of(0, config.train.steps)


def baseline_snapshot_steps(config: PipelineConfig, *, steps: int) -> list[int]:
    """Steps of the baseline kept beyond the shared run's end: 25/50/75 % of the way from
    ``train.steps`` to ``steps`` (all of its length when it is not longer than stage 1, or when
    ``train.lr_schedule=cosine`` makes it a run of its own)."""
    continued = steps > config.train.steps and config.train.length_free
    lo = config.train.steps if continued else 0
    return _fractions_of(lo, steps)


def profile_stage(
    config: PipelineConfig, layout: RunLayout, *, reporter: Reporter | None = None,
    device: torch.device | None = None, reuse: bool = False,
) -> DifficultyProfile:
    """Train the probe (shared training up to ``profile.profile_steps``, resumable), profile the
    EMA model's difficulty per timestep bucket, write ``profile.json`` and ``profile.png`` (in
    the stage-1 folder, :attr:`RunLayout.stage1_root`).

    A finished profile is returned as it is when ``reuse`` is set, and always in a stage-1
    folder shared with other runs (their groupings rest on it). Otherwise, if the shared run is
    already past ``profile_steps``, the current model is profiled and its step is recorded in
    the profile (nothing is retrained).
    """
    if (reuse or layout.shares_stage1) and layout.profile_json.is_file():
        return DifficultyProfile.load(layout.profile_json)
    run_training(config, run_dir=layout.stage1_root, reporter=reporter, steps=config.profile.profile_steps,
                 device=device, snapshot_steps=stage1_snapshot_steps(config))
    loaded = load_model(layout.shared_checkpoint, device=device or "cpu")
    _, heldout = prepare_data(config)
    diffusion = Diffusion.from_config(config.diffusion)
    profile = profile_difficulty(
        model=loaded.model, diffusion=diffusion, heldout_images=heldout,
        config=config.profile, device=next(loaded.model.parameters()).device, model_step=loaded.step,
        reporter=reporter,
    )
    keep = config.profile.sensitivity_keep
    if keep is not None:
        (reporter or NullReporter()).message(f"profiling: held-out ε-loss again with the probe pruned to {keep:g} "
                                             f"of every width (pruning sensitivity)")
        pruned_loss, fraction = uniformly_pruned_losses(
            model=loaded.model, diffusion=diffusion, heldout_images=heldout,
            config=config.profile, keep=keep, device=next(loaded.model.parameters()).device)
        profile = profile.model_copy(update={"pruned_loss_mean": pruned_loss, "pruned_flops_fraction": fraction})
    profile.save(layout.profile_json)
    plot_profile(profile, layout.profile_png)
    return profile


def group_stage(config: PipelineConfig, layout: RunLayout) -> GroupingResult:
    """Partition [0, T) into groups from the saved profile and assign FLOPs budgets."""
    profile = DifficultyProfile.load(layout.profile_json)
    a = profile.arrays()
    sensitivity = None if a.pruned_loss_mean is None else bucket_sensitivity(
        loss_mean=a.loss_mean, pruned_loss_mean=a.pruned_loss_mean, pruned_flops_fraction=a.pruned_flops_fraction,
        snr_db=a.snr_db)
    grouping = group_timesteps(
        bucket_edges=a.bucket_edges, snr_db=a.snr_db, loss_mean=a.loss_mean, affinity=a.affinity,
        config=config.grouping, difficulty=config.budget.difficulty, sensitivity=sensitivity,
    )
    base_flops = count_spec_flops(spec_for(config))  # counted on the meta device: no weights
    budget = config.budget
    plan = BudgetPlan(
        base_flops=float(base_flops), k=budget.k, difficulty_measure=budget.difficulty, reverse=budget.reverse,
        budgets=assign_budgets(grouping=grouping, k=budget.k, base_flops=base_flops, reverse=budget.reverse),
    )
    save_record(layout.grouping_json, grouping)
    save_record(layout.budgets_json, plan)
    plot_grouping(profile, grouping, layout.grouping_png, budgets=plan.budgets)
    return GroupingResult(grouping=grouping, plan=plan)


def shared_stage(
    config: PipelineConfig, layout: RunLayout, *, reporter: Reporter | None = None,
    device: torch.device | None = None,
) -> TrainResult:
    """Continue the probe's run to ``train.steps`` (stage 1, in the stage-1 folder; resumes from
    its checkpoint, and returns at once when another run sharing the folder finished it)."""
    return run_training(config, run_dir=layout.stage1_root, reporter=reporter, device=device,
                        snapshot_steps=stage1_snapshot_steps(config))


def one_stage_spec(config: PipelineConfig, *, flops_budget: float) -> UNetSpec:
    """The one-stage ablation's expert for a budget: the dense UNet with one keep ratio for every
    unit, the widest whose FLOPs meet the budget (within ``prune.tolerance``; the full model when
    pruning is off); see :func:`uniform_widths`."""
    dense = spec_for(config)
    if not config.prune.enabled:
        return dense
    space = prune_space(dense, min_keep=config.prune.min_keep, width_multiple=config.prune.width_multiple)
    res, attn = space.split(uniform_widths(space, budget_flops=flops_budget, tolerance=config.prune.tolerance))
    return dataclasses.replace(dense, res_inner=list(res), attn_inner=list(attn))


def load_plan(layout: RunLayout) -> BudgetPlan:
    return load_record(layout.budgets_json, BudgetPlan, what="budget plan")


def load_grouping(layout: RunLayout) -> Grouping:
    return load_record(layout.grouping_json, Grouping, what="grouping")


def _from_until_t(config: PipelineConfig, *, lo: int) -> bool:
    """Whether the group whose first timestep is ``lo`` is at or above ``finetune.until_t``."""
    return config.finetune.until_t is not None and lo >= config.finetune.until_t


def finetune_steps(config: PipelineConfig, *, lo: int) -> int:
    """Fine-tune steps of the group whose first timestep is ``lo``: ``finetune.steps``, or 0 for
    a group at or above ``finetune.until_t`` without ``finetune.lr_from_until_t`` (it keeps the
    shared model, pruned to its budget)."""
    skipped = _from_until_t(config, lo=lo) and config.finetune.lr_from_until_t is None
    return 0 if skipped else config.finetune.steps


def finetune_lr(config: PipelineConfig, *, lo: int) -> float:
    """Learning rate of the fine-tune of the group whose first timestep is ``lo``:
    ``finetune.lr``, or ``finetune.lr_from_until_t`` (when set) from ``finetune.until_t`` on."""
    ft = config.finetune
    return ft.lr_from_until_t if _from_until_t(config, lo=lo) and ft.lr_from_until_t is not None else ft.lr


def finetune_group_stage(
    config: PipelineConfig, layout: RunLayout, *, group: int, reporter: Reporter | None = None,
    device: torch.device | None = None,
) -> GroupResult:
    """Fine-tune group ``group``'s copy of the shared EMA model on its timesteps only; a group whose
    budget is below F is first pruned to it (docs/METHOD.md step 5, :func:`prune_to_budget`).

    Independent of the other groups (own folder, own seed), so groups can run in separate
    processes or on separate GPUs; resumes from the group's own checkpoint, which records the
    pruned widths (the search is not redone: a step-0 checkpoint is written right after it).
    With ``finetune.init=scratch`` (the one-stage ablation) the expert is instead a fresh
    initialisation at :func:`one_stage_spec`'s widths, trained on the group's timesteps alone.
    """
    started_at = time.time()
    plan = load_plan(layout)
    if not 0 <= group < len(plan.budgets):
        raise ConfigError(f"group={group} does not exist; this run has groups 0..{len(plan.budgets) - 1}")
    budget = plan.budgets[group]
    if not layout.shared_checkpoint.is_file():
        raise CheckpointError(f"shared checkpoint {layout.shared_checkpoint} does not exist; run shared training first")
    train_images, heldout = prepare_data(config)
    # A distinct data/noise stream per group, reproducible from the run's seed.
    steps = finetune_steps(config, lo=budget.lo)
    plan = TrainPlan.finetune(config, t_range=(budget.lo, budget.hi), seed=config.train.seed + 1000 * (group + 1),
                              steps=steps).replace(lr=finetune_lr(config, lo=budget.lo))
    diffusion = Diffusion.from_config(config.diffusion)
    device = device or resolve_device(config.train.device)
    ckpt = layout.group_checkpoint(group)
    scratch = config.finetune.init == "scratch"
    prune = config.prune.enabled and budget.fraction < 1.0 and not scratch
    # Read once: the start, the reference, and (carried) AdamW's state.
    loaded = load_model(layout.shared_checkpoint, device=device, keep_optimizer=config.finetune.optimizer == "shared")
    shared = loaded.model
    if ckpt.exists():
        spec, start = UNetSpec.from_dict(load_checkpoint(ckpt)["spec"]), None  # pruned widths live there
    elif scratch:  # the one-stage ablation: no stage 1 in the expert, its budget's widths from the start
        spec, start = one_stage_spec(config, flops_budget=budget.flops_budget), None
    else:
        start = shared  # prune_to_budget does not modify it
        if prune:
            result = prune_to_budget(
                model=start, diffusion=diffusion, train_images=train_images, heldout_images=heldout,
                t_range=(budget.lo, budget.hi), budget_flops=budget.flops_budget, config=config,
                seed=plan.seed, device=device, reporter=reporter, work_dir=layout.prune_work_dir(group),
            )
            result.memory.save(layout.prune_memory(group))
            plot_prune_rounds(result.memory, layout.prune_png(group))
            start = result.model
    # The trainer trains its model in place: a copy of the start (its EMA starts as the same weights).
    model = init_model(spec, seed=plan.seed) if start is None else copy.deepcopy(start)
    trainer = Trainer(model=model, diffusion=diffusion, config=config, plan=plan, train_images=train_images,
                      heldout_images=heldout, device=device)
    if start is None and ckpt.exists():
        trainer.resume(ckpt)  # its optimizer state too, carried or not
    else:
        if config.finetune.optimizer == "shared":
            carried, total = trainer.carry_optimizer_state(loaded.optimizer_state, source=layout.shared_checkpoint)
            loaded.optimizer_state = None  # not needed past here
            if reporter is not None:
                reporter.message(f"AdamW state of the shared model carried for {carried} of {total} parameters"
                                 + (" (pruned tensors start fresh)" if carried < total else ""))
        if prune:
            trainer.save(layout.pruned_checkpoint(group))  # the pruned model before fine-tuning
            trainer.save(ckpt)  # step 0: a crash from here on resumes without redoing the search
    shared_loss = trainer.heldout_loss(shared)
    pruned_loss = (trainer.heldout_loss(load_model(layout.pruned_checkpoint(group), device=device).model)
                   if prune else None)
    result = trainer.fit(until_step=steps, checkpoint_path=ckpt, reporter=reporter)
    flops = count_forward_flops(trainer.model, in_channels=config.data.channels, image_size=config.data.image_size)
    memory = MemoryBank.load(layout.prune_memory(group)) if prune else None
    out = GroupResult(
        group=group, lo=budget.lo, hi=budget.hi, rank=budget.rank, steps=result.step, flops=flops,
        budget_flops=budget.flops_budget, budget_met=flops <= budget.flops_budget * (1 + config.prune.tolerance),
        pruned=prune, pruning_flops=memory.search_flops if memory is not None else 0.0,
        heldout_loss_shared=shared_loss, heldout_loss_pruned=pruned_loss, heldout_loss=result.heldout_loss,
        seconds=result.seconds, started_at=started_at, finished_at=time.time(), checkpoint=str(ckpt),
    )
    save_record(layout.group_result(group), out)
    return out


def load_group_result(layout: RunLayout, group: int) -> GroupResult:
    return load_record(layout.group_result(group), GroupResult, what="group result")


def assemble_router(layout: RunLayout, *, device: torch.device | str = "cpu",
                    experts: Sequence[int] | None = None, elsewhere: Path | None = None) -> ExpertRouter:
    """The routed ensemble: one fine-tuned expert per group, from checkpoints + boundaries.

    With ``experts`` (group indices) only those groups get their expert and every other group's
    timesteps are served by the checkpoint ``elsewhere`` (e.g. the run's baseline): one expert
    swapped into the single model shows how much that group's expert moves sample quality.

    Raises:
        ConfigError: ``experts`` without ``elsewhere``, or naming a group the run lacks.
        CheckpointError: a checkpoint it needs is missing.
    """
    grouping = load_grouping(layout)
    checkpoints = [layout.group_checkpoint(g) for g in range(grouping.num_groups)]
    if experts is not None:
        bad = sorted(set(experts) - set(range(grouping.num_groups)))
        if bad:
            raise ConfigError(f"experts {bad}: {layout.root} has groups 0..{grouping.num_groups - 1}")
        if elsewhere is None:
            raise ConfigError("experts needs the checkpoint that serves the other groups (elsewhere)")
        if not Path(elsewhere).is_file():
            raise CheckpointError(f"{elsewhere} is not a checkpoint file (it serves the groups other than {experts})")
        checkpoints = [c if g in experts else Path(elsewhere) for g, c in enumerate(checkpoints)]
    missing = [str(p) for p in checkpoints if not p.is_file()]
    if missing:
        raise CheckpointError(f"group checkpoints missing (fine-tune these groups first): {', '.join(missing)}")
    return load_router(checkpoints=checkpoints, boundaries=grouping.boundaries, device=device)


def cost_stage(config: PipelineConfig, layout: RunLayout) -> CostReport:
    """Sampling and training cost of the run vs a single model of equal training cost.

    The baseline is charged ``ceil(TDC cost / (F · batch · 3))`` steps, the smallest budget that
    is at least TDC's total (docs/METHOD.md, "The baseline").
    """
    plan = load_plan(layout)
    results = [load_group_result(layout, g) for g in range(len(plan.budgets))]
    diffusion = Diffusion.from_config(config.diffusion).respaced(config.sample.steps)
    boundaries = [b.lo for b in plan.budgets] + [plan.budgets[-1].hi]
    group_flops = [float(r.flops) for r in results]
    sampling = sampling_cost(visited_timesteps=sampling_timesteps(diffusion), boundaries=boundaries,
                             group_flops=group_flops, base_flops=plan.base_flops)
    ft_batch = config.finetune.batch_size or config.train.batch_size
    # One-stage experts use nothing of stage 1 but the probe that profiled the timesteps.
    shared_steps = config.profile.profile_steps if config.finetune.init == "scratch" else config.train.steps
    kwargs = dict(shared_steps=shared_steps, base_flops=plan.base_flops, batch_size=config.train.batch_size,
                  finetune_steps=[r.steps for r in results], group_flops=group_flops,
                  finetune_batch_size=ft_batch, baseline_batch_size=config.train.batch_size,
                  pruning_flops=math.fsum(r.pruning_flops for r in results))
    tdc_only = training_cost(**kwargs, baseline_steps=1)
    per_step = plan.base_flops * config.train.batch_size * tdc_only.backward_factor
    training = training_cost(**kwargs, baseline_steps=math.ceil(tdc_only.tdc_flops / per_step))
    imported = None if config.train.init_from is None else (
        f"stage 1 imported from the IDDPM checkpoint {config.train.init_from}, charged as its published training "
        f"({config.train.steps:,} steps x batch {config.train.batch_size}), which did not run here")
    report = CostReport(sampling=sampling, training=training, sampler=config.sample.sampler,
                        sampling_steps=diffusion.num_steps, budgets_met=all(r.budget_met for r in results),
                        stage1_imported=imported)
    save_record(layout.costs_json, report)
    return report


def baseline_config(config: PipelineConfig, *, steps: int) -> PipelineConfig:
    """The run's config with ``train.steps = steps``; the probe length is capped at it, so the
    config stored in the baseline's checkpoint stays valid (a checkpoint must rebuild alone)."""
    return config.model_copy(update={
        "train": config.train.model_copy(update={"steps": steps}),
        "profile": config.profile.model_copy(update={"profile_steps": min(config.profile.profile_steps, steps)}),
    })


def start_baseline_from_shared(config: PipelineConfig, layout: RunLayout, *, steps: int) -> int | None:
    """Start the baseline at the shared model's checkpoint, when it has none of its own yet, the
    shared run is no longer than ``steps`` and the learning rate is constant; returns the step it
    starts from (None: not started this way).

    Under a constant schedule the baseline is the same dense run as the shared model (same seed,
    data order, optimiser) continued to ``steps``, and a resumed run continues bit for bit
    (checkpoints carry optimiser and RNG state; ``tests/test_stage1.py`` compares both ways), so
    its first ``train.steps`` steps need not be trained twice. It is still charged every step in
    the cost report. Under ``train.lr_schedule=cosine`` the shared model's learning rate has
    decayed to 0 at its last step while the baseline's decays over its own ``steps``: two runs.
    """
    out = RunLayout(layout.baseline_dir).shared_checkpoint
    src = layout.shared_checkpoint
    if not config.train.length_free or out.exists() or not src.is_file():
        return None
    step = int(load_checkpoint(src)["step"])
    if step > steps:
        return None
    with src.open("rb") as f:
        atomic_write(out, lambda dst: shutil.copyfileobj(f, dst), what="baseline checkpoint ")
    return step


def baseline_stage(
    config: PipelineConfig, layout: RunLayout, *, steps: int, reporter: Reporter | None = None,
    device: torch.device | None = None,
) -> TrainResult:
    """The single-model baseline (docs/METHOD.md, "The baseline"): the same data, model and
    optimiser, ``steps`` steps on all timesteps (the cost report's ``baseline_steps`` unless
    ``baseline.steps`` is set), in ``layout.baseline_dir``; continues the shared run under a
    constant schedule (:func:`start_baseline_from_shared`) and resumes from its own checkpoint."""
    start_baseline_from_shared(config, layout, steps=steps)
    return run_training(baseline_config(config, steps=steps), run_dir=layout.baseline_dir, reporter=reporter,
                        device=device, snapshot_steps=baseline_snapshot_steps(config, steps=steps))
