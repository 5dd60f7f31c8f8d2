"""Schedules, the forward process, respacing and losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tdc_core.config import DiffusionConfig
from tdc_core.diffusion import Diffusion, betas_for_schedule, space_timesteps


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("T", [25, 1000, 4000])
def test_alpha_bar_and_snr_strictly_decrease(schedule, T):
    d = Diffusion(betas=betas_for_schedule(schedule, T))
    ab = d.alphas_cumprod_np
    assert ab.shape == (T,)
    assert np.all(np.diff(ab) < 0) and 0 < ab[-1] < ab[0] < 1
    snr = d.snr_db(np.arange(T))
    assert np.all(np.diff(snr) < 0)


def test_cosine_schedule_matches_iddpm_formula():
    T, s = 1000, 0.008
    d = Diffusion(betas=betas_for_schedule("cosine", T))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    # Equal wherever the 0.999 clip on β is inactive (all but the last few steps).
    np.testing.assert_allclose(d.alphas_cumprod_np[:-5], expected[:-5], rtol=1e-10)


def test_linear_schedule_endpoints():
    b = betas_for_schedule("linear", 1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)


def test_snr_db_definition():
    d = Diffusion.from_config(DiffusionConfig(num_timesteps=100))
    ab = d.alphas_cumprod_np[17]
    assert d.snr_db(17) == pytest.approx(10 * math.log10(ab / (1 - ab)))


def test_q_sample_moments():
    d = Diffusion.from_config(DiffusionConfig(num_timesteps=100))
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    t = torch.full((20000,), 40)
    xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    ab = d.alphas_cumprod_np[40]
    assert xt.mean().item() == pytest.approx(0.5 * math.sqrt(ab), abs=0.02)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.05)


@pytest.mark.parametrize(("T", "steps"), [(1000, 50), (4000, 250), (100, 100), (10, 3)])
def test_respacing_visits_expected_steps(T, steps):
    keep = space_timesteps(T, steps)
    assert len(keep) == steps and keep[0] == 0 and keep[-1] == T - 1
    assert keep == sorted(set(keep))
    gaps = np.diff(keep)
    assert gaps.max() - gaps.min() <= 1  # evenly spread
    base = Diffusion(betas=betas_for_schedule("cosine", T))
    sub = base.respaced(steps)
    assert sub.timestep_map.tolist() == keep
    # The respaced process has the same marginals q(x_t | x_0) at the kept steps.
    np.testing.assert_allclose(sub.alphas_cumprod_np, base.alphas_cumprod_np[keep], rtol=1e-9)


def test_sample_timesteps_stay_in_interval():
    d = Diffusion.from_config(DiffusionConfig(num_timesteps=1000))
    t = d.sample_timesteps(5000, lo=200, hi=300, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 200 and t.max() < 300 and len(t.unique()) > 90
    with pytest.raises(ValueError, match="must lie within"):
        d.sample_timesteps(3, lo=10, hi=1001)


def test_eps_loss_is_per_sample_and_deterministic():
    d = Diffusion.from_config(DiffusionConfig(num_timesteps=100))
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.arange(6) * 10
    zero_model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    loss = d.eps_loss(zero_model, x0, t, noise)
    assert loss.shape == (6,)
    torch.testing.assert_close(loss, noise.pow(2).mean(dim=(1, 2, 3)))


def test_hybrid_loss_adds_a_finite_nonnegative_vlb_term():
    cfg = DiffusionConfig(num_timesteps=100, loss="hybrid")
    d = Diffusion.from_config(cfg)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(8, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 5, 20, 50, 80, 98, 99])
    xt = d.q_sample(x0, t, noise)
    out = torch.cat([noise + 0.1 * torch.randn(x0.shape, generator=g), torch.zeros_like(x0)], dim=1)
    losses = d.training_losses(out, x0=x0, x_t=xt, t=t, noise=noise)
    assert set(losses) == {"loss", "mse", "vb"}
    assert torch.isfinite(losses["vb"]).all()
    assert (losses["vb"][t > 0] >= -1e-6).all()  # a KL divergence
    expected = losses["mse"] + cfg.hybrid_vlb_weight * 100 * losses["vb"]
    torch.testing.assert_close(losses["loss"], expected)
