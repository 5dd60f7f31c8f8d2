"""The one-stage ablation (finetune.init=scratch): each group's expert is trained from a fresh
initialisation at its budget's widths, nothing of the shared model in it, and the cost report
charges stage 1 only up to the probe."""

from __future__ import annotations

import pytest
import torch

from tdc_core.config import load_config
from tdc_core.method.pruning.space import prune_space, uniform_widths
from tdc_core.model.flops import count_forward_flops
from tdc_core.run.curve import single_model_curve
from tdc_core.run.evaluation import compare_run
from tdc_core.run.layout import RunLayout
from tdc_core.run.stages import (
    baseline_stage,
    cost_stage,
    finetune_group_stage,
    group_stage,
    load_plan,
    one_stage_spec,
    profile_stage,
    shared_stage,
)
from tdc_core.training.checkpoint import load_checkpoint
from tdc_core.training.trainer import init_model, spec_for

BASE = ["grouping.num_groups=2", "finetune.steps=2", "budget.k=0.5"]


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):
    """Tiny CPU workloads: see ``one_thread`` in conftest."""


def test_uniform_widths_are_the_widest_single_ratio_within_the_budget():
    cfg = load_config(preset="digits")
    space = prune_space(spec_for(cfg), min_keep=0.1, width_multiple=8)
    budget = 0.6 * space.dense_flops
    widths = uniform_widths(space, budget_flops=budget, tolerance=0.0)
    assert space.flops(widths) <= budget
    keep = widths[0] / space.units[0].dense_width
    assert all(w % 8 == 0 for w in widths)
    wider = space.widths([min(1.0, keep + 8 / u.dense_width) for u in space.units])  # one quantum more
    assert space.flops(wider) > budget
    assert uniform_widths(space, budget_flops=2 * space.dense_flops) == space.dense_widths.tolist()


def test_one_stage_experts_start_from_scratch_at_their_budgets_widths(tmp_path):
    cfg = load_config(preset="smoke", overrides=[*BASE, "finetune.init=scratch", "finetune.steps=0"])
    layout = RunLayout(tmp_path / "run")
    profile_stage(cfg, layout)
    group_stage(cfg, layout)
    shared_stage(cfg, layout)
    plan = load_plan(layout)
    small = min(range(2), key=lambda g: plan.budgets[g].fraction)
    result = finetune_group_stage(cfg, layout, group=small)
    ckpt = load_checkpoint(layout.group_checkpoint(small))
    spec = one_stage_spec(cfg, flops_budget=plan.budgets[small].flops_budget)
    dense_res = prune_space(spec_for(cfg), min_keep=0.1).split(prune_space(spec_for(cfg), min_keep=0.1).dense_widths)[0]
    assert ckpt["spec"]["res_inner"] == list(spec.res_inner) and list(spec.res_inner) != dense_res  # narrower
    assert result.budget_met and result.flops <= plan.budgets[small].flops_budget * (1 + cfg.prune.tolerance)
    # Zero steps: the expert is exactly a fresh initialisation of that spec (seeded per group), not the shared model.
    fresh = init_model(spec, seed=cfg.train.seed + 1000 * (small + 1)).state_dict()
    assert all(torch.equal(ckpt["model"][k], fresh[k]) for k in fresh)
    assert count_forward_flops(init_model(spec, seed=0), in_channels=1, image_size=8) == result.flops
    assert not layout.prune_memory(small).exists()  # no pruning search ran


def test_one_stage_cost_charges_stage_1_only_up_to_the_probe(tmp_path):
    costs = {}
    for init in ("shared", "scratch"):
        cfg = load_config(preset="smoke", overrides=[*BASE, f"finetune.init={init}", "prune.enabled=false"])
        layout = RunLayout(tmp_path / init)
        profile_stage(cfg, layout)
        group_stage(cfg, layout)
        shared_stage(cfg, layout)
        for g in range(2):
            finetune_group_stage(cfg, layout, group=g)
        costs[init] = cost_stage(cfg, layout).training
    assert costs["shared"].shared_steps == cfg.train.steps
    assert costs["scratch"].shared_steps == cfg.profile.profile_steps
    per_step = costs["shared"].base_flops * cfg.train.batch_size * costs["shared"].backward_factor
    assert costs["shared"].tdc_flops - costs["scratch"].tdc_flops == pytest.approx(
        (cfg.train.steps - cfg.profile.profile_steps) * per_step)


def test_the_one_stage_curve_places_the_shared_model_at_its_own_step(tmp_path):
    """One-stage TDC is charged stage 1 only up to the probe, but the single model's curve is the
    dense run the baseline continues: the shared model sits at train.steps, after stage 1's
    snapshots, not at the probe's FLOPs."""
    cfg = load_config(preset="smoke", overrides=[*BASE, "finetune.init=scratch", "train.steps=8",
                                                 "profile.profile_steps=4", "eval.num_samples=8", "eval.seeds=[0]"])
    layout = RunLayout(tmp_path / "run")
    profile_stage(cfg, layout)
    group_stage(cfg, layout)
    shared_stage(cfg, layout)
    for g in range(2):
        finetune_group_stage(cfg, layout, group=g)
    costs = cost_stage(cfg, layout)
    assert costs.training.shared_steps == cfg.profile.profile_steps  # charged up to the probe
    base = baseline_stage(cfg, layout, steps=costs.training.baseline_steps)
    curve = single_model_curve(cfg, layout, compare_run(cfg, layout, baseline_checkpoint=base.checkpoint))
    steps = {p.name: p.step for p in curve.single}
    assert steps["shared"] == cfg.train.steps
    assert {"single@2", "single@4", "single@6"} <= steps.keys()  # stage 1's snapshots: the same run
    assert [p.step for p in curve.single] == sorted(p.step for p in curve.single)
