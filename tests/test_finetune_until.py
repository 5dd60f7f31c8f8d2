"""``finetune.until_t``: only the groups that start below it are fine-tuned; the others keep the
shared model and are charged no fine-tune steps, or with ``finetune.lr_from_until_t`` are
fine-tuned at that learning rate."""

from __future__ import annotations

import pytest
import torch

from tdc_core.config import load_config
from tdc_core.errors import ConfigError
from tdc_core.run.layout import RunLayout
from tdc_core.run.stages import (
    cost_stage,
    finetune_group_stage,
    finetune_lr,
    finetune_steps,
    group_stage,
    load_plan,
    profile_stage,
    shared_stage,
)
from tdc_core.training.checkpoint import load_checkpoint
from tdc_core.training.trainer import load_model

BASE = ["train.steps=4", "profile.profile_steps=2", "profile.num_buckets=4", "grouping.num_groups=2",
        "finetune.steps=2", "prune.enabled=false"]


@pytest.mark.parametrize(("until_t", "lo", "steps"), [(None, 900, 7), (200, 0, 7), (200, 199, 7), (200, 200, 0),
                                                      (200, 600, 0)])
def test_a_group_is_fine_tuned_only_when_it_starts_below_until_t(until_t, lo, steps):
    cfg = load_config(preset="smoke", overrides=["finetune.steps=7"]
                      + ([] if until_t is None else [f"finetune.until_t={until_t}"]))
    assert finetune_steps(cfg, lo=lo) == steps


def test_from_until_t_groups_take_lr_from_until_t_and_every_step():
    cfg = load_config(preset="smoke", overrides=["finetune.steps=7", "finetune.lr=5e-4", "finetune.until_t=200",
                                                 "finetune.lr_from_until_t=1e-4"])
    assert [finetune_steps(cfg, lo=lo) for lo in (0, 199, 200, 600)] == [7, 7, 7, 7]
    assert [finetune_lr(cfg, lo=lo) for lo in (0, 199, 200, 600)] == [5e-4, 5e-4, 1e-4, 1e-4]
    plain = load_config(preset="smoke", overrides=["finetune.lr=5e-4"])
    assert finetune_lr(plain, lo=600) == 5e-4


def test_lr_from_until_t_needs_until_t():
    with pytest.raises(ConfigError, match="finetune.until_t"):
        load_config(preset="smoke", overrides=["finetune.lr_from_until_t=1e-4"])


def test_until_t_must_be_a_positive_timestep():
    with pytest.raises(ConfigError, match="until_t"):
        load_config(preset="smoke", overrides=["finetune.until_t=0"])


def test_groups_from_until_t_keep_the_shared_model_and_cost_no_fine_tune(tmp_path):
    cfg = load_config(preset="smoke", overrides=BASE)
    layout = RunLayout(tmp_path / "run")
    profile_stage(cfg, layout)
    group_stage(cfg, layout)
    shared_stage(cfg, layout)
    second = load_plan(layout).budgets[1].lo  # group 1's first timestep: it and above are not fine-tuned
    cfg = load_config(preset="smoke", overrides=[*BASE, f"finetune.until_t={second}"])
    tuned, kept = (finetune_group_stage(cfg, layout, group=g) for g in (0, 1))
    assert (tuned.steps, kept.steps) == (2, 0)
    shared = load_model(layout.shared_checkpoint).model.state_dict()
    for g, same in ((0, False), (1, True)):
        expert = load_model(layout.group_checkpoint(g)).model.state_dict()
        assert all(torch.equal(expert[k], shared[k]) for k in shared) is same, g
    assert cost_stage(cfg, layout).training.finetune_steps == [2, 0]


def test_groups_from_until_t_fine_tune_at_lr_from_until_t(tmp_path):
    cfg = load_config(preset="smoke", overrides=[*BASE, "finetune.lr=5e-4"])
    layout = RunLayout(tmp_path / "run")
    profile_stage(cfg, layout)
    group_stage(cfg, layout)
    shared_stage(cfg, layout)
    second = load_plan(layout).budgets[1].lo
    cfg = load_config(preset="smoke", overrides=[*BASE, "finetune.lr=5e-4", f"finetune.until_t={second}",
                                                 "finetune.lr_from_until_t=1e-4"])
    results = [finetune_group_stage(cfg, layout, group=g) for g in (0, 1)]
    assert [r.steps for r in results] == [2, 2]
    assert [load_checkpoint(layout.group_checkpoint(g))["lr"] for g in (0, 1)] == [5e-4, 1e-4]
