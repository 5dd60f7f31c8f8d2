"""``finetune.optimizer=shared``: a group fine-tune starts AdamW from the shared model's moments
and step count (every parameter the pruning left whole), instead of from zero moments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tdc_core.config import load_config
from tdc_core.errors import ConfigError
from tdc_core.run.layout import RunLayout
from tdc_core.run.stages import finetune_group_stage, group_stage, load_plan, profile_stage, shared_stage
from tdc_core.training.checkpoint import load_checkpoint
from tdc_core.training.trainer import load_model

SHARED_STEPS = 4
BASE = [f"train.steps={SHARED_STEPS}", "profile.profile_steps=2", "profile.num_buckets=4", "grouping.num_groups=2",
        "finetune.steps=1"]


def _stage2(tmp_path, name: str, *extra: str, monkeypatch=None) -> tuple[RunLayout, dict]:
    """Stage 1 and one group's fine-tune; with ``monkeypatch``, asserts the fine-tune reads the
    shared checkpoint once (the model, the reference and AdamW's state come from one read)."""
    cfg = load_config(preset="smoke", overrides=[*BASE, *extra])
    layout = RunLayout(tmp_path / name)
    profile_stage(cfg, layout)
    group_stage(cfg, layout)
    shared_stage(cfg, layout)
    # The group with the smallest budget: pruned when pruning is on.
    group = min(range(cfg.grouping.num_groups), key=lambda g: load_plan(layout).budgets[g].fraction)
    reads = []
    if monkeypatch is not None:
        import tdc_core.training.trainer as trainer_module

        def counted(path, **kwargs):
            reads.append(Path(path))
            return load_checkpoint(path, **kwargs)

        monkeypatch.setattr(trainer_module, "load_checkpoint", counted)
    finetune_group_stage(cfg, layout, group=group)
    if monkeypatch is not None:
        assert reads.count(layout.shared_checkpoint) == 1, reads
        monkeypatch.undo()
    return layout, load_checkpoint(layout.group_checkpoint(group))


def _steps_by_name(layout: RunLayout, ckpt: dict) -> dict[str, int]:
    """AdamW's step count per parameter name of a checkpoint's model."""
    names = [n for n, _ in load_model(layout.shared_checkpoint).model.named_parameters()]
    # A pruned model has the shared model's modules, so its parameters come in the same order.
    return {names[int(i)]: int(st["step"]) for i, st in ckpt["optimizer"]["state"].items()}


def test_fresh_adamw_counts_only_the_fine_tunes_steps(tmp_path):
    layout, ckpt = _stage2(tmp_path, "fresh", "prune.enabled=false")
    assert set(_steps_by_name(layout, ckpt).values()) == {1}


def test_carried_adamw_continues_the_shared_models_moments(tmp_path, monkeypatch):
    layout, ckpt = _stage2(tmp_path, "carried", "prune.enabled=false", "finetune.optimizer=shared",
                           monkeypatch=monkeypatch)
    assert set(_steps_by_name(layout, ckpt).values()) == {SHARED_STEPS + 1}  # every parameter carried
    # The moments continue the shared run's: one more AdamW update of its exp_avg_sq, not a fresh one.
    shared = load_checkpoint(layout.shared_checkpoint)["optimizer"]["state"]
    carried = dict(ckpt["optimizer"]["state"])
    beta2 = 0.999
    for i, st in shared.items():
        # exp_avg_sq_new = β2·exp_avg_sq_shared + (1 − β2)·g²  ≥  β2·exp_avg_sq_shared, elementwise
        assert torch.all(carried[i]["exp_avg_sq"] >= beta2 * st["exp_avg_sq"] * (1 - 1e-5))


def test_pruned_tensors_start_fresh_and_whole_ones_are_carried(tmp_path):
    layout, ckpt = _stage2(tmp_path, "pruned", "finetune.optimizer=shared")
    steps = _steps_by_name(layout, ckpt)
    shared_shapes = {n: p.shape for n, p in load_model(layout.shared_checkpoint).model.named_parameters()}
    for name, step in steps.items():
        whole = ckpt["model"][name].shape == shared_shapes[name]
        assert step == (SHARED_STEPS + 1 if whole else 1), name
    assert {SHARED_STEPS + 1, 1} <= set(steps.values())  # the group was pruned, and not entirely


@pytest.mark.parametrize("other", ["finetune.init=scratch", "train.init_from=ckpt.pt"])
def test_carrying_without_a_shared_optimizer_state_is_one_config_error(other):
    with pytest.raises(ConfigError, match="finetune.optimizer=shared") as err:
        load_config(preset="smoke", overrides=["finetune.optimizer=shared", other])
    assert "allowed: finetune.optimizer=fresh" in str(err.value)
