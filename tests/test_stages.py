"""The TDC stages end to end on the smoke preset, through one run folder."""

from __future__ import annotations

import json

import pytest
import torch

from tdc_core.config import load_config
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.diffusion.samplers import sample
from tdc_core.errors import CheckpointError, DataError
from tdc_core.run import stages
from tdc_core.run.layout import RunLayout
from tdc_core.run.outline import run_stages
from tdc_core.training.trainer import Trainer, load_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """profile → group → shared → fine-tune every group, on the smoke preset."""
    cfg = load_config(preset="smoke", overrides=["train.steps=16", "profile.profile_steps=8", "finetune.steps=4"])
    layout = RunLayout(tmp_path_factory.mktemp("run"))
    done = run_stages(cfg, layout, until="finetune")
    return cfg, layout, done.profile, done.grouped, done.shared, done.groups


def test_probe_is_the_start_of_shared_training(run):
    cfg, layout, profile, _, shared, _ = run
    assert profile.model_step == cfg.profile.profile_steps
    assert shared.resumed_from == cfg.profile.profile_steps  # continued, not restarted
    assert shared.step == cfg.train.steps


def test_stage_outputs_exist_and_groups_cover_all_timesteps(run):
    cfg, layout, _, grouped, _, results = run
    for p in (layout.profile_json, layout.profile_png, layout.grouping_json, layout.grouping_png,
              layout.budgets_json):
        assert p.is_file() and p.stat().st_size > 0, p
    g = grouped.grouping
    assert g.boundaries[0] == 0 and g.boundaries[-1] == cfg.diffusion.num_timesteps
    assert g.num_groups == cfg.grouping.num_groups
    assert [(r.lo, r.hi) for r in results] == [g.interval(i) for i in range(g.num_groups)]
    saved = json.loads(layout.budgets_json.read_text())
    assert max(b["fraction"] for b in saved["budgets"]) == 1.0


def test_groups_below_f_are_pruned_to_their_budget(run):
    cfg, layout, _, grouped, _, results = run
    base = grouped.plan.base_flops
    for r, b in zip(results, grouped.plan.budgets):
        assert r.pruned == (b.fraction < 1.0)
        assert r.budget_met and r.flops <= b.flops_budget * (1 + cfg.prune.tolerance)
        if r.pruned:
            assert r.flops < base and r.pruning_flops > 0 and r.heldout_loss_pruned is not None
            assert (layout.group_dir(r.group) / "prune" / "memory.json").is_file()
            assert (layout.group_dir(r.group) / "prune" / "prune.png").is_file()
        else:
            assert r.flops == base
    # The pruned expert rebuilds from its own checkpoint (its widths are in the spec).
    hardest = min(results, key=lambda r: r.flops)
    assert load_model(layout.group_checkpoint(hardest.group)).spec.res_inner is not None


def test_without_pruning_budgets_below_f_are_reported_unmet(run, tmp_path):
    cfg, layout, *_ = run
    off = cfg.model_copy(update={"prune": cfg.prune.model_copy(update={"enabled": False})})
    other = RunLayout(tmp_path)
    for p in (layout.shared_checkpoint, layout.budgets_json):
        dest = other.root / p.relative_to(layout.root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(p.read_bytes())
    plan = stages.load_plan(other)
    g = min(range(len(plan.budgets)), key=lambda i: plan.budgets[i].fraction)
    r = stages.finetune_group_stage(off, other, group=g)
    assert r.pruned is False and r.budget_met is False and r.pruning_flops == 0


def test_router_serves_each_group_with_its_expert(run):
    cfg, layout, *_ = run
    router = stages.assemble_router(layout)
    experts = [load_model(layout.group_checkpoint(g)).model for g in range(router.num_groups)]
    x = torch.randn(router.num_groups * 2, 1, 8, 8)
    t = torch.tensor([lo for lo, _ in (stages.load_grouping(layout).interval(g) for g in range(router.num_groups))] * 2)
    out = router(x, t)
    for i in range(len(t)):
        g = router.expert_index(int(t[i]))
        torch.testing.assert_close(out[i:i + 1], experts[g](x[i:i + 1], t[i:i + 1]))
    xs = sample(router, Diffusion.from_config(cfg.diffusion).respaced(10), shape=(4, 1, 8, 8),
                generator=torch.Generator().manual_seed(0))
    assert xs.shape == (4, 1, 8, 8) and torch.isfinite(xs).all()


def test_costs_of_the_run_by_hand(run):
    """The cost report against the arithmetic written out here from the run's own numbers:
    which expert serves each of the 10 DDIM steps, and docs/METHOD.md's training-cost formula."""
    cfg, layout, _, grouped, _, results = run
    report = stages.cost_stage(cfg, layout)
    assert report.sampling.ratio < 1.0 and report.budgets_met
    base, flops = grouped.plan.base_flops, [r.flops for r in results]

    # Sampling: 10 of T = 100 steps, evenly spaced with 0 and 99 kept: stride 99 / 9 = 11.
    assert (cfg.diffusion.num_timesteps, cfg.sample.steps) == (100, 10)
    visited = list(range(99, -1, -11))
    serving = [next(r.group for r in results if r.lo <= t < r.hi) for t in visited]
    s = report.sampling
    assert s.steps == 10 and s.steps_per_group == [serving.count(g) for g in range(len(results))]
    assert s.total_flops == sum(flops[g] for g in serving)
    assert s.single_model_flops == 10 * base
    assert s.ratio == pytest.approx(sum(flops[g] for g in serving) / (10 * base), rel=1e-12)

    # Training: forward + backward = 3 x forward, per image, times batch and steps.
    t = report.training
    batch, ft_batch = cfg.train.batch_size, cfg.finetune.batch_size or cfg.train.batch_size
    assert [r.steps for r in results] == [cfg.finetune.steps] * len(results)
    pruning = sum(r.pruning_flops for r in results)
    assert pruning > 0 and t.pruning_flops == pytest.approx(pruning, rel=1e-12)
    tdc = cfg.train.steps * base * batch * 3 + sum(cfg.finetune.steps * f * ft_batch * 3 for f in flops) + pruning
    assert t.tdc_flops == pytest.approx(tdc, rel=1e-12)
    # The baseline gets the fewest whole steps whose cost reaches TDC's.
    baseline_steps = -(-tdc // (base * batch * 3))
    assert t.baseline_steps == baseline_steps and (baseline_steps - 1) * base * batch * 3 < tdc
    assert t.baseline_flops == pytest.approx(baseline_steps * base * batch * 3, rel=1e-12)
    assert t.baseline_flops >= t.tdc_flops
    assert layout.costs_json.is_file()


def test_group_finetune_draws_timesteps_only_inside_its_interval(run, monkeypatch):
    cfg, layout, _, grouped, _, _ = run
    seen: list[torch.Tensor] = []

    class Spy(Trainer):
        def __init__(self, **kw):
            super().__init__(**kw)
            forward = self.model.forward
            # Training calls only (the FLOP count afterwards runs in eval mode at t = 0).
            self.model.forward = lambda x, t: (self.model.training and seen.append(t.clone()), forward(x, t))[1]

    monkeypatch.setattr(stages, "Trainer", Spy)
    g = 1
    layout.group_checkpoint(g).unlink()
    more = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"steps": 6})})
    stages.finetune_group_stage(more, layout, group=g)
    lo, hi = grouped.grouping.interval(g)
    drawn = torch.cat(seen)
    assert len(drawn) >= 6 * cfg.train.batch_size
    assert drawn.min() >= lo and drawn.max() < hi


def test_stages_need_their_inputs(tmp_path):
    cfg = load_config(preset="smoke")
    layout = RunLayout(tmp_path)
    with pytest.raises(DataError, match="profile.json does not exist"):
        stages.group_stage(cfg, layout)
    with pytest.raises(DataError, match="budgets.json does not exist"):
        stages.finetune_group_stage(cfg, layout, group=0)
    with pytest.raises(DataError, match="grouping.json does not exist"):
        stages.assemble_router(layout)


def test_finetune_without_shared_checkpoint_or_bad_group(run, tmp_path):
    cfg, layout, *_ = run
    other = RunLayout(tmp_path)
    other.budgets_json.parent.mkdir(parents=True)
    other.budgets_json.write_bytes(layout.budgets_json.read_bytes())
    with pytest.raises(CheckpointError, match="run shared training first"):
        stages.finetune_group_stage(cfg, other, group=0)
    with pytest.raises(ValueError, match="groups 0..2"):
        stages.finetune_group_stage(cfg, layout, group=7)
