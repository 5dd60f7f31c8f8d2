"""The one held-out evaluator: identical stratified triples for every model, exact numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tdc_core.diffusion.gaussian import Diffusion, betas_for_schedule
from tdc_core.evaluation.heldout import heldout_triples, paired_difference, score_heldout
from tdc_core.training.data import to_model_range

T = 40


@pytest.fixture(scope="module")
def diffusion() -> Diffusion:
    return Diffusion(betas=betas_for_schedule("cosine", T))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (12, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


class Recorder:
    """A denoiser that records what it is shown and predicts ε̂ = scale · x_t."""

    def __init__(self, scale: float) -> None:
        self.scale, self.seen = scale, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.clone(), t.clone()))
        return self.scale * x


def test_triples_are_stratified_and_seeded():
    tr = heldout_triples(num_images=5, num_timesteps=T, per_image=8, seed=3)
    t = tr.t.reshape(5, 8)
    assert ((t // (T // 8)) == torch.arange(8)).all()  # one t in each stratum, for every image
    assert (tr.image == torch.arange(5).repeat_interleave(8)).all()
    again = heldout_triples(num_images=5, num_timesteps=T, per_image=8, seed=3)
    assert torch.equal(tr.t, again.t) and torch.equal(tr.noise(0, (1, 4, 4)), again.noise(0, (1, 4, 4)))
    assert not torch.equal(tr.t, heldout_triples(num_images=5, num_timesteps=T, per_image=8, seed=4).t)


def test_every_model_sees_identical_triples_whatever_the_batch_size(diffusion, images):
    tr = heldout_triples(num_images=12, num_timesteps=T, per_image=T, seed=1)
    a, b = Recorder(0.5), Recorder(-1.0)
    sa = score_heldout(a, diffusion, name="a", images=images, triples=tr, boundaries=[0, T], batch_size=256)
    sb = score_heldout(b, diffusion, name="b", images=images, triples=tr, boundaries=[0, T], batch_size=7)
    xa, ta = torch.cat([x for x, _ in a.seen]), torch.cat([t for _, t in a.seen])
    xb, tb = torch.cat([x for x, _ in b.seen]), torch.cat([t for _, t in b.seen])
    assert torch.equal(ta, tb) and torch.equal(xa, xb)
    assert sa.eps_mse != sb.eps_mse


def test_numbers_match_a_hand_computation(diffusion, images):
    tr = heldout_triples(num_images=12, num_timesteps=T, per_image=10, seed=2)
    s = score_heldout(Recorder(0.0), diffusion, name="zero", images=images, triples=tr, boundaries=[0, 15, T],
                      num_buckets=4)
    noise = torch.cat([tr.noise(c, (1, 4, 4)) for c in range((len(tr.t) + 255) // 256)]).double()
    eps = noise.pow(2).mean(dim=(1, 2, 3)).numpy()  # ε̂ = 0
    x0 = to_model_range(images[tr.image]).double()
    ab = torch.as_tensor(diffusion.alphas_cumprod_np[tr.t.numpy()])
    x_t = ab.sqrt()[:, None, None, None] * x0 + (1 - ab).sqrt()[:, None, None, None] * noise
    x0_err = ((x_t / ab.sqrt()[:, None, None, None]).clamp(-1, 1) - x0).pow(2).mean(dim=(1, 2, 3)).numpy()
    t = tr.t.numpy()
    assert s.eps_mse == pytest.approx(eps.mean(), rel=1e-5)
    assert s.x0_mse == pytest.approx(x0_err.mean(), rel=1e-4)
    assert s.group_eps_mse == pytest.approx([eps[t < 15].mean(), eps[t >= 15].mean()], rel=1e-5)
    assert s.bucket_eps_mse[0] == pytest.approx(eps[t < 10].mean(), rel=1e-5)
    per_image = eps.reshape(12, 10).mean(axis=1)
    assert s.eps_mse_se == pytest.approx(per_image.std(ddof=1) / np.sqrt(12), rel=1e-4)
    snr = diffusion.alphas_cumprod_np[t] / (1 - diffusion.alphas_cumprod_np[t])
    w = np.minimum(snr, 5.0) / snr
    assert s.eps_mse_min_snr == pytest.approx((eps * w).mean() / w.mean(), rel=1e-5)


def test_an_oracle_scores_zero_and_the_routed_ensemble_equals_its_experts_per_group(diffusion):
    # One training image x*: the optimal ε-prediction is analytic.
    image = torch.full((1, 1, 4, 4), 200, dtype=torch.uint8)
    x_star = to_model_range(image)

    def oracle(x, t):  # noqa: ANN001, ANN202
        ab = torch.as_tensor(diffusion.alphas_cumprod_np, dtype=torch.float32)[t][:, None, None, None]
        return (x - ab.sqrt() * x_star) / (1 - ab).sqrt()

    zero = Recorder(0.0)

    def routed(x, t):  # noqa: ANN001, ANN202 - oracle below t = 20, zero above
        out = zero(x, t)
        low = t < 20
        out[low] = oracle(x[low], t[low])
        return out

    tr = heldout_triples(num_images=1, num_timesteps=T, per_image=T, seed=0)
    kw = dict(images=image, triples=tr, boundaries=[0, 20, T])
    s_oracle = score_heldout(oracle, diffusion, name="oracle", **kw)
    s_zero = score_heldout(zero, diffusion, name="zero", **kw)
    s_routed = score_heldout(routed, diffusion, name="routed", **kw)
    assert s_oracle.eps_mse < 1e-8
    assert s_routed.group_eps_mse == pytest.approx([s_oracle.group_eps_mse[0], s_zero.group_eps_mse[1]], abs=1e-9)


def test_paired_difference_by_hand_and_refuses_other_triples(diffusion, images):
    tr = heldout_triples(num_images=12, num_timesteps=T, per_image=5, seed=5)
    a = score_heldout(Recorder(0.0), diffusion, name="a", images=images, triples=tr, boundaries=[0, T])
    b = score_heldout(Recorder(0.3), diffusion, name="b", images=images, triples=tr, boundaries=[0, T])
    d = np.asarray(a.per_image_eps_mse) - np.asarray(b.per_image_eps_mse)
    pd = paired_difference(a, b)
    assert pd.difference == pytest.approx(d.mean()) and pd.se == pytest.approx(d.std(ddof=1) / np.sqrt(12))
    assert pd.ci_low < pd.difference < pd.ci_high
    other = heldout_triples(num_images=12, num_timesteps=T, per_image=5, seed=6)
    c = score_heldout(Recorder(0.3), diffusion, name="c", images=images, triples=other, boundaries=[0, T])
    with pytest.raises(ValueError, match="different held-out triples"):
        paired_difference(a, c)
