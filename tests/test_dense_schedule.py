"""``train.lr_schedule=cosine``: the shared model's learning rate decays to 0 at ``train.steps``,
and the baseline, whose schedule spans its own length, is a run of its own instead of the shared
run continued (under the default constant rate it continues it: ``tests/test_stage1.py``)."""

from __future__ import annotations

import math

import pytest

from tdc_core.config import load_config, same_training
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.run.layout import RunLayout
from tdc_core.run.stage1 import attach_stage1
from tdc_core.run.stages import (
    baseline_config,
    baseline_snapshot_steps,
    baseline_stage,
    profile_stage,
    shared_stage,
    start_baseline_from_shared,
)
from tdc_core.run.study import Arm, estimate
from tdc_core.training.checkpoint import load_checkpoint
from tdc_core.training.trainer import Trainer, TrainPlan, init_model, prepare_data, spec_for

FAST = ["train.steps=8", "profile.profile_steps=4", "train.checkpoint_every=2", "profile.num_buckets=10",
        "train.warmup_steps=2", "train.lr=0.001"]
COSINE = [*FAST, "train.lr_schedule=cosine"]


def _trainer(cfg) -> Trainer:
    train, heldout = prepare_data(cfg)
    return Trainer(model=init_model(spec_for(cfg), seed=0), diffusion=Diffusion.from_config(cfg.diffusion),
                   config=cfg, plan=TrainPlan.dense(cfg), train_images=train, heldout_images=heldout)


def test_the_dense_cosine_warms_up_then_reaches_zero_at_train_steps():
    trainer = _trainer(load_config(preset="smoke", overrides=COSINE))
    lrs = [trainer._lr_at(s) / 0.001 for s in range(8)]
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])  # warm-up over 2 steps, then the peak
    # Step 7 (the last, 0-based) is 5 of the 6 steps past the warm-up; the rate falls throughout.
    assert lrs[7] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))
    constant = _trainer(load_config(preset="smoke", overrides=FAST))
    assert [constant._lr_at(s) / 0.001 for s in (2, 7, 100)] == pytest.approx([1.0, 1.0, 1.0])


def test_the_baselines_cosine_spans_its_own_steps():
    cfg = baseline_config(load_config(preset="smoke", overrides=COSINE), steps=20)
    assert TrainPlan.dense(cfg).cosine_steps == 20


def test_under_cosine_the_baseline_is_its_own_run_from_step_zero(tmp_path):
    cfg, layout = load_config(preset="smoke", overrides=COSINE), RunLayout(tmp_path / "runs" / "r")
    attach_stage1(layout, cfg)
    profile_stage(cfg, layout)
    shared = shared_stage(cfg, layout)
    assert load_checkpoint(shared.checkpoint)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(
        0.001 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))  # the shared run ended annealed
    assert start_baseline_from_shared(cfg, layout, steps=12) is None
    base = baseline_stage(cfg, layout, steps=12)
    assert base.resumed_from == 0 and base.step == 12
    assert baseline_snapshot_steps(cfg, steps=12) == [3, 6, 9]  # the curve: its own run, from a quarter of it
    # The same run under a constant rate continues the shared model (only its steps beyond are new).
    constant = load_config(preset="smoke", overrides=FAST)
    assert baseline_snapshot_steps(constant, steps=12) == [9, 10, 11]


def test_a_cosine_checkpoint_resumes_only_a_run_of_the_same_length():
    cfg = load_config(preset="smoke", overrides=COSINE)
    saved = cfg.model_dump(mode="json")
    assert same_training(saved, cfg, dense=True)
    assert not same_training(saved, baseline_config(cfg, steps=20), dense=True)  # another cosine
    constant = load_config(preset="smoke", overrides=FAST)
    assert same_training(constant.model_dump(mode="json"), baseline_config(constant, steps=20), dense=True)


def test_the_study_plan_charges_a_cosine_baseline_all_its_steps():
    constant = estimate(Arm(name="a", preset="smoke", overrides=FAST), seed=0)
    cosine = estimate(Arm(name="b", preset="smoke", overrides=COSINE), seed=0)
    assert constant.stage1_flops == pytest.approx(cosine.stage1_flops)
    # Same total cost; the constant baseline's first train.steps steps are the shared run's.
    assert cosine.baseline_extra_flops == pytest.approx(constant.baseline_extra_flops + constant.stage1_flops)
