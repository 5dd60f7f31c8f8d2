"""Pruning sensitivity (budget.difficulty=sensitivity): the rise of each bucket's held-out error
when the probe is pruned uniformly, on the profile's own samples and noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tdc_core.config import ProfileConfig, load_config
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.method.budgets import BudgetPlan
from tdc_core.method.profiling import DifficultyProfile, bucket_edges, bucket_losses
from tdc_core.method.pruning.surgery import prune_unet
from tdc_core.method.sensitivity import bucket_sensitivity, uniformly_pruned_losses
from tdc_core.model.flops import count_forward_flops
from tdc_core.model.unet import UNet
from tdc_core.records import load_record
from tdc_core.run.layout import RunLayout
from tdc_core.run.stages import group_stage, profile_stage
from tdc_core.training.trainer import prepare_data, spec_for


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):
    """Tiny CPU workloads: see ``one_thread`` in conftest."""


def test_sensitivity_is_the_min_snr_weighted_rise_per_flop_removed():
    snr_db = np.array([20.0, 10.0 * np.log10(5.0), 0.0, -10.0])  # SNR 100, 5, 1, 0.1
    got = bucket_sensitivity(loss_mean=np.array([0.5, 0.2, 0.1, 0.05]),
                             pruned_loss_mean=np.array([0.7, 0.3, 0.1, 0.06]),
                             pruned_flops_fraction=0.6, snr_db=snr_db)
    # weights 5/100, 1, 1, 1; rises 0.2, 0.1, 0, 0.01; per 0.4 of F removed
    np.testing.assert_allclose(got, [0.05 * 0.2 / 0.4, 0.1 / 0.4, 0.0, 0.01 / 0.4], rtol=1e-9, atol=1e-12)


def test_pruned_losses_use_the_profiles_samples_and_a_uniformly_pruned_probe():
    cfg = load_config(preset="smoke")
    g = torch.Generator().manual_seed(0)
    model = UNet(spec_for(cfg)).eval()
    with torch.no_grad():  # every channel matters: no zero-initialised layers
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    _, heldout = prepare_data(cfg)
    diffusion = Diffusion.from_config(cfg.diffusion)
    config = ProfileConfig(num_buckets=4, loss_samples_per_bucket=8, seed=3)
    losses, fraction = uniformly_pruned_losses(model=model, diffusion=diffusion, heldout_images=heldout,
                                               config=config, keep=0.5, device=torch.device("cpu"))
    pruned = prune_unet(model, res_keep=[0.5] * len(model.unit_widths()[0]),
                        attn_keep=[0.5] * len(model.unit_widths()[1])).eval()
    by_hand = bucket_losses(model=pruned, diffusion=diffusion, heldout=heldout,
                            edges=bucket_edges(num_timesteps=diffusion.num_steps, num_buckets=4),
                            samples_per_bucket=8, seed=3, device=torch.device("cpu")).mean(dim=1)
    np.testing.assert_allclose(losses, by_hand.numpy(), rtol=1e-6)
    counted = count_forward_flops(pruned, in_channels=1, image_size=8) / count_forward_flops(
        model, in_channels=1, image_size=8)
    assert fraction == pytest.approx(counted, rel=1e-9) and 0.2 < fraction < 0.8
    with pytest.raises(ValueError, match="keep"):
        uniformly_pruned_losses(model=model, diffusion=diffusion, heldout_images=heldout, config=config, keep=1.0,
                                device=torch.device("cpu"))


def test_profile_stage_records_sensitivity_and_budgets_can_follow_it(tmp_path):
    cfg = load_config(preset="smoke", overrides=["budget.difficulty=sensitivity", "grouping.num_groups=3"])
    layout = RunLayout(tmp_path / "run")
    profile = profile_stage(cfg, layout)
    assert profile.pruned_loss_mean is not None and len(profile.pruned_loss_mean) == profile.num_buckets
    assert 0.0 < profile.pruned_flops_fraction < 1.0
    assert DifficultyProfile.load(layout.profile_json).pruned_loss_mean == profile.pruned_loss_mean
    result = group_stage(cfg, layout)
    a = profile.arrays()
    per_bucket = bucket_sensitivity(loss_mean=a.loss_mean, pruned_loss_mean=a.pruned_loss_mean,
                                    pruned_flops_fraction=a.pruned_flops_fraction, snr_db=a.snr_db)
    edges, bounds = a.bucket_edges, result.grouping.bucket_boundaries
    width = np.diff(edges)
    expected = [np.average(per_bucket[lo:hi], weights=width[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
    np.testing.assert_allclose(result.grouping.difficulty, expected, rtol=1e-9)
    plan = load_record(layout.budgets_json, BudgetPlan, what="budget plan")
    assert plan.difficulty_measure == "sensitivity"
    hardest = int(np.argmax(expected))
    assert plan.budgets[hardest].fraction == 1.0
