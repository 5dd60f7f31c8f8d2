"""Min-SNR-γ loss weighting (Hang et al. 2023) for an ε-prediction model: each sample's ε-MSE is
weighted by min(SNR, γ)/SNR, which equals weighting its x0-MSE by min(SNR, γ)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tdc_core.config import load_config
from tdc_core.diffusion.gaussian import Diffusion, betas_for_schedule
from tdc_core.training.trainer import Trainer, TrainPlan, init_model, prepare_data, spec_for


@pytest.fixture(scope="module")
def diffusion() -> Diffusion:
    return Diffusion(betas=betas_for_schedule("cosine", 1000))


def test_weight_is_min_snr_over_snr_per_sample(diffusion):
    t = torch.tensor([0, 10, 200, 500, 800, 999])
    ab = diffusion.alphas_cumprod_np[t.numpy()]
    snr = ab / (1 - ab)
    expected = np.minimum(snr, 5.0) / snr
    weight = diffusion.min_snr_weight(t, gamma=5.0)
    assert weight.shape == (6,)
    np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-6)
    # Low-noise steps (SNR > γ) are down-weighted by γ/SNR; high-noise ones keep weight 1.
    assert weight[0] < 0.01 and weight[-1] == 1.0


def test_weighted_eps_mse_equals_x0_mse_times_min_snr(diffusion):
    """The definition in x0 terms: w·‖ε − ε̂‖² = min(SNR, γ)·‖x0 − x̂0‖² for every sample."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 1, 4, 4, generator=gen)
    noise, eps_hat = torch.randn(x0.shape, generator=gen), torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, 1000, (8,), generator=gen)
    x_t = diffusion.q_sample(x0, t, noise)
    w = diffusion.min_snr_weight(t, gamma=5.0)
    losses = diffusion.training_losses(eps_hat, x0=x0, x_t=x_t, t=t, noise=noise, mse_weight=w)
    x0_hat = diffusion.predict_x0(x_t, t, eps_hat)
    ab = torch.as_tensor(diffusion.alphas_cumprod_np[t.numpy()])
    snr = ab / (1 - ab)
    x0_term = torch.minimum(snr, torch.tensor(5.0)) * (x0 - x0_hat).double().pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["loss"].double(), x0_term, rtol=1e-4, atol=1e-6)
    # The logged ε-MSE stays the unweighted one.
    torch.testing.assert_close(losses["mse"], (noise - eps_hat).pow(2).mean(dim=(1, 2, 3)))


def test_config_selects_the_weighting_per_stage():
    cfg = load_config(preset="smoke", overrides=["train.loss_weighting=min_snr", "train.min_snr_gamma=3"])
    assert TrainPlan.dense(cfg).min_snr_gamma == 3.0
    assert TrainPlan.finetune(cfg, t_range=(0, 10), seed=0, steps=5).min_snr_gamma == 3.0  # inherited
    own = load_config(preset="smoke", overrides=["train.loss_weighting=min_snr", "finetune.loss_weighting=uniform"])
    assert TrainPlan.finetune(own, t_range=(0, 10), seed=0, steps=5).min_snr_gamma is None
    assert TrainPlan.dense(load_config(preset="smoke")).min_snr_gamma is None


def test_training_minimises_the_weighted_loss(tmp_path):
    """The trainer's loss is the weighted one: a step's logged `loss` is below its `mse` (every
    weight is ≤ 1, most of the low-noise ones far below), while uniform training logs them equal."""
    def one_step(weighting: str) -> dict[str, float]:
        cfg = load_config(preset="smoke", overrides=[f"train.loss_weighting={weighting}", "train.steps=10"])
        train, heldout = prepare_data(cfg)
        trainer = Trainer(model=init_model(spec_for(cfg), seed=0), diffusion=Diffusion.from_config(cfg.diffusion),
                          config=cfg, train_images=train, heldout_images=heldout)
        return {k: float(v) for k, v in trainer._train_step().items()}

    uniform, weighted = one_step("uniform"), one_step("min_snr")
    assert uniform["loss"] == pytest.approx(uniform["mse"])
    assert weighted["mse"] == pytest.approx(uniform["mse"], rel=1e-5)  # same batch, same t, same noise
    assert weighted["loss"] < 0.9 * weighted["mse"]
