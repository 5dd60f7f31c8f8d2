"""Samplers: determinism, the steps they visit, and correctness against an oracle denoiser."""

from __future__ import annotations

import pytest
import torch

from tdc_core.config import DiffusionConfig
from tdc_core.diffusion.gaussian import Diffusion, gather
from tdc_core.diffusion.samplers import sample, sampling_timesteps


def oracle(base: Diffusion, target: torch.Tensor, *, learn_sigma: bool = False):
    """The exact ε-predictor, at original timesteps of ``base``, when the data distribution is
    the single image ``target``."""

    def model(x, t):
        ab = gather(base.alphas_cumprod, t, x.ndim)
        eps = (x - ab.sqrt() * target) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learn_sigma else eps

    return model


@pytest.fixture
def diffusion():
    return Diffusion.from_config(DiffusionConfig(num_timesteps=200))


def _toy_model(x, t):
    return 0.1 * x + 0.001 * t.float()[:, None, None, None]


@pytest.mark.parametrize(("sampler", "eta"), [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_fixed_generator_gives_fixed_samples(diffusion, sampler, eta):
    d = diffusion.respaced(20)
    run = lambda seed: sample(_toy_model, d, shape=(4, 1, 4, 4), generator=torch.Generator().manual_seed(seed),  # noqa: E731
                              sampler=sampler, eta=eta)
    torch.testing.assert_close(run(3), run(3), rtol=0, atol=0)
    assert not torch.allclose(run(3), run(4))


def test_respaced_sampling_visits_expected_steps(diffusion):
    seen = []

    def model(x, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    d = diffusion.respaced(10)
    sample(model, d, shape=(2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert seen == sampling_timesteps(d) == sorted(d.timestep_map.tolist(), reverse=True)
    assert seen[0] == 199 and seen[-1] == 0 and len(seen) == 10
    seen.clear()
    sample(model, diffusion, shape=(1, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert seen == list(range(199, -1, -1))


@pytest.mark.parametrize(("sampler", "steps", "learn_sigma"),
                         [("ddim", 200, False), ("ddim", 25, False), ("ddpm", 200, False), ("ddpm", 50, True)])
def test_oracle_denoiser_recovers_the_single_data_point(sampler, steps, learn_sigma):
    target = torch.linspace(-0.9, 0.9, 16).reshape(1, 1, 4, 4)
    base = Diffusion.from_config(DiffusionConfig(num_timesteps=200, loss="hybrid" if learn_sigma else "eps_mse"))
    model = oracle(base, target, learn_sigma=learn_sigma)
    d = base.respaced(steps)
    x = sample(model, d, shape=(8, 1, 4, 4), generator=torch.Generator().manual_seed(0), sampler=sampler)
    torch.testing.assert_close(x, target.expand_as(x), atol=2e-2, rtol=0)


def test_callback_and_device_argument(diffusion):
    calls = []
    sample(_toy_model, diffusion.respaced(5), shape=(1, 1, 2, 2), generator=torch.Generator().manual_seed(0),
           device="cpu", callback=lambda i, t, x: calls.append((i, t, tuple(x.shape))))
    assert [c[0] for c in calls] == list(range(5)) and calls[0][2] == (1, 1, 2, 2)
    with pytest.raises(ValueError, match="allowed: ddpm, ddim"):
        sample(_toy_model, diffusion, shape=(1, 1, 2, 2), generator=torch.Generator(), sampler="euler")
