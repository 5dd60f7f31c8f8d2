"""Schedules, the forward process, respacing and losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tdc_core.config import DiffusionConfig
from tdc_core.diffusion.gaussian import Diffusion, betas_for_schedule, space_timesteps


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


def _hybrid_case(num_timesteps: int = 100):
    """A hybrid-loss process, 8-bit images (with exact -1 and 1 pixels), noise, and a model
    output ε̂ = ε + error, v uniform in [-1, 1]; x_t formed here in float64 from ᾱ."""
    d = Diffusion.from_config(DiffusionConfig(num_timesteps=num_timesteps, loss="hybrid"))
    g = torch.Generator().manual_seed(3)
    n, c = 9, 3
    x0 = torch.randint(0, 256, (n, c, 4, 4), generator=g).double().div(127.5).sub(1).float()
    x0[:, 0, 0, 0], x0[:, 0, 0, 1] = -1.0, 1.0
    t = torch.tensor([1, 5, 20, 50, 80, 98, 99, 0, 0])
    noise = torch.randn(x0.shape, generator=g)
    eps = noise + 0.3 * torch.randn(x0.shape, generator=g)
    v = torch.rand(x0.shape, generator=g) * 2 - 1
    return d, x0, t, noise, eps, v


def _by_hand(betas: np.ndarray, x0, x_t, t, eps, v) -> tuple[np.ndarray, np.ndarray]:
    """IDDPM's L_t in bits per dimension, written out from β in float64: KL between the true
    posterior q(x_{t-1} | x_t, x0) and p_θ for t > 0; the discretised-Gaussian decoder NLL
    (exact normal CDF, bins of width 2/255, open-ended at -1 and 1) for t = 0."""
    x0, x_t, eps, v = (a.double().numpy() for a in (x0, x_t, eps, v))
    tt = t.numpy()[:, None, None, None]
    alpha = 1.0 - betas
    ab = np.cumprod(alpha)
    ab_prev = np.concatenate([[1.0], ab[:-1]])

    def posterior_mean(start):  # μ̃_t(x_t, x0)
        return (np.sqrt(ab_prev[tt]) * betas[tt] / (1 - ab[tt]) * start
                + np.sqrt(alpha[tt]) * (1 - ab_prev[tt]) / (1 - ab[tt]) * x_t)

    post_var = (1 - ab_prev) / (1 - ab) * betas  # β̃_t; β̃_0 = 0, so Σ_θ's lower end uses β̃_1
    true_var = post_var[tt]
    x0_hat = np.clip((x_t - np.sqrt(1 - ab[tt]) * eps) / np.sqrt(ab[tt]), -1, 1)
    mu_true, mu_model = posterior_mean(x0), posterior_mean(x0_hat)
    frac = (v + 1) / 2  # IDDPM eq. 15: log Σ_θ = frac·log β_t + (1 − frac)·log β̃_t
    model_var = np.exp(frac * np.log(betas[tt]) + (1 - frac) * np.log(np.maximum(true_var, post_var[1])))
    kl, nll = np.full(len(t), np.nan), np.full(len(t), np.nan)
    pos = t.numpy() > 0
    s1, s2 = np.sqrt(true_var[pos]), np.sqrt(model_var[pos])
    kl_pix = np.log(s2 / s1) + (s1**2 + (mu_true[pos] - mu_model[pos]) ** 2) / (2 * s2**2) - 0.5
    kl[pos] = kl_pix.mean(axis=(1, 2, 3)) / math.log(2)
    zero = ~pos
    cdf = np.vectorize(lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2))))
    x, mu, s = x0[zero], mu_model[zero], np.sqrt(model_var[zero])
    upper, lower = cdf((x + 1 / 255 - mu) / s), cdf((x - 1 / 255 - mu) / s)
    p = np.where(x == -1, upper, np.where(x == 1, 1 - lower, upper - lower))
    nll[zero] = -np.log(p).mean(axis=(1, 2, 3)) / math.log(2)
    return kl, nll


def test_hybrid_vlb_term_is_the_analytic_gaussian_kl_and_the_decoder_nll():
    d, x0, t, noise, eps, v = _hybrid_case()
    ab = np.cumprod(1.0 - d.betas_np)[t.numpy()][:, None, None, None]
    x_t = torch.from_numpy(np.sqrt(ab) * x0.double().numpy() + np.sqrt(1 - ab) * noise.double().numpy()).float()
    vb = d.training_losses(torch.cat([eps, v], dim=1), x0=x0, x_t=x_t, t=t, noise=noise)["vb"].double().numpy()
    kl, nll = _by_hand(d.betas_np, x0, x_t, t, eps, v)
    pos = t.numpy() > 0
    assert (kl[pos] > 0).all() and (nll[~pos] > 0).all()
    # float32 arithmetic in the library; its tanh approximation of Φ differs from erf by < 3e-4.
    np.testing.assert_allclose(vb[pos], kl[pos], rtol=1e-3)
    np.testing.assert_allclose(vb[~pos], nll[~pos], rtol=1e-3)


def test_hybrid_vlb_term_vanishes_for_the_true_posterior():
    """ε̂ = ε recovers x0, so p_θ's mean is the posterior's; v = -1 picks Σ_θ = β̃_t: KL = 0."""
    d, x0, t, noise, _, v = _hybrid_case()
    pos = t > 0
    x_t = d.q_sample(x0, t, noise)
    vb = d.training_losses(torch.cat([noise, -torch.ones_like(v)], dim=1), x0=x0, x_t=x_t, t=t, noise=noise)["vb"]
    assert vb[pos].abs().max().item() < 1e-4
    wrong_var = d.training_losses(torch.cat([noise, torch.ones_like(v)], dim=1), x0=x0, x_t=x_t, t=t, noise=noise)["vb"]
    # Σ_θ = β_t instead costs bits where β_t and β̃_t differ most (small t; they meet as t grows).
    assert (wrong_var[(t > 0) & (t <= 20)] > 1e-3).all()


def test_a_one_step_process_and_the_shortest_linear_schedules_are_finite():
    """Respacing to one step (``sample.steps=1``) and a linear schedule at T ≤ 20 (whose last β
    would reach 1) give finite constants; β = 1 itself is refused."""
    one = Diffusion(betas=betas_for_schedule("cosine", 100)).respaced(1)
    assert one.num_steps == 1 and torch.isfinite(one.posterior_log_var_clipped).all()
    for T in (10, 20):
        d = Diffusion(betas=betas_for_schedule("linear", T))
        assert torch.isfinite(d.sqrt_recip_ab).all() and torch.isfinite(d.fixed_large_log_var).all()
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        Diffusion(betas=np.array([0.5, 1.0]))
