"""A NaN/inf mid-training: stop with the step and the last good checkpoint, or (configured)
skip the bad updates, count them, and stop once there are too many."""

from __future__ import annotations

import pytest
import torch

from tdc_core.config import load_config
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.errors import TrainingError
from tdc_core.reporter import RecordingReporter
from tdc_core.training.checkpoint import load_checkpoint
from tdc_core.training.trainer import Trainer, init_model, prepare_data, spec_for

BASE = ["train.steps=20", "profile.profile_steps=0", "train.log_every=5", "train.checkpoint_every=5"]


def _trainer_with_poisoned_batches(overrides: list[str], *, bad_calls: set[int]) -> Trainer:
    """A trainer whose data yields an all-NaN batch on the given (1-based) draws."""
    cfg = load_config(preset="smoke", overrides=[*BASE, *overrides])
    train, heldout = prepare_data(cfg)
    t = Trainer(model=init_model(spec_for(cfg), seed=cfg.train.seed), diffusion=Diffusion.from_config(cfg.diffusion),
                config=cfg, train_images=train, heldout_images=heldout)
    draw, calls = t.sampler.next_batch, [0]

    def poisoned() -> torch.Tensor:
        calls[0] += 1
        batch = draw()
        return torch.full_like(batch, float("nan")) if calls[0] in bad_calls else batch

    t.sampler.next_batch = poisoned
    return t


def test_skip_mode_drops_bad_updates_counts_them_and_finishes(tmp_path, one_thread):
    t = _trainer_with_poisoned_batches(["train.nonfinite=skip", "train.max_skipped_steps=3"], bad_calls={3, 8})
    rec = RecordingReporter()
    res = t.fit(until_step=20, checkpoint_path=tmp_path / "c.pt", reporter=rec)
    assert res.step == 20 and t.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in [*t.model.parameters(), *t.ema.parameters()])
    assert rec.series("skipped_steps")[-1] == (20, 2.0)
    saved = load_checkpoint(tmp_path / "c.pt")
    assert saved["skipped_steps"] == 2 and all(torch.isfinite(v).all() for v in saved["model"].values())


def test_skip_mode_stops_once_bad_steps_exceed_the_limit(tmp_path, one_thread):
    t = _trainer_with_poisoned_batches(["train.nonfinite=skip", "train.max_skipped_steps=1"], bad_calls={3, 12})
    with pytest.raises(TrainingError, match=r"2 steps with a non-finite .* step 12.* train.max_skipped_steps=1"):
        t.fit(until_step=20, checkpoint_path=tmp_path / "c.pt")
    good = load_checkpoint(tmp_path / "c.pt")  # the last good checkpoint is intact and loadable
    assert good["step"] == 10 and all(torch.isfinite(v).all() for v in good["model"].values())


def test_stop_mode_names_the_steps_and_the_last_good_checkpoint(tmp_path, one_thread):
    t = _trainer_with_poisoned_batches([], bad_calls={13})
    with pytest.raises(TrainingError, match=r"between steps 11 and 15; last good checkpoint: .*c\.pt"):
        t.fit(until_step=20, checkpoint_path=tmp_path / "c.pt")
    good = load_checkpoint(tmp_path / "c.pt")
    assert good["step"] == 10 and all(torch.isfinite(v).all() for v in good["model"].values())
