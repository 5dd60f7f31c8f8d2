"""Stage 2's recipe is its own: a group fine-tune's warm-up, learning-rate schedule and EMA
follow ``finetune.*`` (inheriting ``train.*`` only where a field is left unset)."""

from __future__ import annotations

import math

import pytest
import torch

from tdc_core.config import load_config
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.run.layout import RunLayout
from tdc_core.run.stages import finetune_group_stage, group_stage, profile_stage, shared_stage
from tdc_core.training.checkpoint import load_checkpoint
from tdc_core.training.trainer import Trainer, TrainPlan, init_model, prepare_data, spec_for

# train.* deliberately unlike any finetune.* below: a fine-tune following train.* shows.
BASE = ["train.steps=4", "profile.profile_steps=2", "train.warmup_steps=100", "train.ema_decay=0.995",
        "finetune.lr=0.001", "profile.num_buckets=4", "grouping.num_groups=2", "prune.enabled=false"]


def _fit(cfg, *, steps: int, tmp_path) -> Trainer:
    train, heldout = prepare_data(cfg)
    plan = TrainPlan.finetune(cfg, t_range=(0, 50), seed=3, steps=steps)
    trainer = Trainer(model=init_model(spec_for(cfg), seed=0), diffusion=Diffusion.from_config(cfg.diffusion),
                      config=cfg, plan=plan, train_images=train, heldout_images=heldout)
    trainer.fit(until_step=steps, checkpoint_path=tmp_path / "ft.pt")
    return trainer


def _lr(trainer: Trainer) -> float:
    return trainer.optimizer.param_groups[0]["lr"]  # the rate of the last step taken


def test_unset_fields_inherit_train_as_before():
    cfg = load_config(preset="smoke", overrides=BASE)
    plan = TrainPlan.finetune(cfg, t_range=(0, 50), seed=1, steps=10)
    assert (plan.warmup_steps, plan.ema_decay, plan.cosine_steps, plan.lr) == (100, 0.995, None, 0.001)


def test_warmup_follows_finetune_not_train(tmp_path):
    inherited = _fit(load_config(preset="smoke", overrides=BASE), steps=3, tmp_path=tmp_path)
    assert _lr(inherited) == pytest.approx(0.001 * 3 / 100)  # two-thirds of nothing: train's 100-step warm-up
    own = _fit(load_config(preset="smoke", overrides=[*BASE, "finetune.warmup_steps=0"]), steps=3, tmp_path=tmp_path)
    assert _lr(own) == pytest.approx(0.001)


def test_cosine_schedule_reaches_zero_at_the_fine_tunes_last_step(tmp_path):
    cfg = load_config(preset="smoke", overrides=[*BASE, "finetune.warmup_steps=2", "finetune.lr_schedule=cosine"])
    trainer = _fit(cfg, steps=10, tmp_path=tmp_path)
    # Step 9 (the last, 0-based) is 7 of the 8 steps past the warm-up.
    assert _lr(trainer) == pytest.approx(0.001 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert [round(trainer._lr_at(s) / 0.001, 6) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]  # warm-up, then the peak


def test_a_group_fine_tunes_ema_follows_finetune_ema_decay(tmp_path):
    """End to end through the stage: with finetune.ema_decay=0 the expert's EMA is its weights;
    left unset, it keeps train's 0.995 and stays mostly the shared model."""
    def expert(extra: list[str], name: str) -> dict:
        cfg = load_config(preset="smoke", overrides=[*BASE, "finetune.steps=3", *extra])
        layout = RunLayout(tmp_path / name)
        profile_stage(cfg, layout)
        group_stage(cfg, layout)
        shared_stage(cfg, layout)
        finetune_group_stage(cfg, layout, group=0)
        return load_checkpoint(layout.group_checkpoint(0))

    own = expert(["finetune.ema_decay=0"], "own")
    assert all(torch.equal(own["ema"][k], own["model"][k]) for k in own["model"] if k in own["ema"])
    inherited = expert([], "inherited")
    assert not all(torch.equal(inherited["ema"][k], inherited["model"][k])
                   for k in inherited["model"] if k in inherited["ema"] and inherited["model"][k].is_floating_point())
