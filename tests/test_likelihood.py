"""Bits/dim from the variational bound (tdc_core/evaluation/likelihood.py), against an independent
numpy/scipy computation of IDDPM's terms on tiny processes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import ndtr
from torch import nn

from tdc_core.diffusion.gaussian import Diffusion, betas_for_schedule
from tdc_core.evaluation.likelihood import LikelihoodResult, bits_per_dim, prior_bpd, vb_terms_bpd
from tdc_core.method.routing import ExpertRouter

LN2 = math.log(2.0)
BETAS = np.array([0.02, 0.1, 0.3, 0.6])  # T = 4, explicit so the constants are easy to follow


# --- an independent reference, in float64 numpy -----------------------------------------------

def iddpm_cdf(x: np.ndarray) -> np.ndarray:
    """IDDPM's tanh approximation of the standard normal CDF (part of its bpd definition)."""
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def ref_decoder_bits(x0: np.ndarray, mean: np.ndarray, var: np.ndarray, cdf=iddpm_cdf) -> np.ndarray:
    """−log P(x0) per image, bits/dim, with P the Gaussian N(mean, var) integrated over x0's 8-bit bin
    (width 2/255; the bins at −1 and +1 extend to −∞ and +∞)."""
    sd = np.sqrt(var)
    upper = cdf((x0 + 1 / 255 - mean) / sd)
    lower = cdf((x0 - 1 / 255 - mean) / sd)
    p = np.where(x0 < -1 + 1e-6, upper, np.where(x0 > 1 - 1e-6, 1 - lower, upper - lower))
    return -np.log(p).reshape(len(x0), -1).mean(1) / LN2


def ref_kl_bits(m1, v1, m2, v2) -> np.ndarray:
    """KL(N(m1, v1) ‖ N(m2, v2)) per image, bits/dim (closed form, elementwise then averaged)."""
    kl = 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)
    kl = np.broadcast_to(kl, np.broadcast_shapes(np.shape(m1), np.shape(m2)))
    return kl.reshape(kl.shape[0], -1).mean(1) / LN2


class RefProcess:
    """The same diffusion derived from β by Bayes' rule (no code shared with gaussian.py)."""

    def __init__(self, betas: np.ndarray) -> None:
        self.betas = np.asarray(betas, dtype=np.float64)
        self.T = len(self.betas)
        self.alphas = 1.0 - self.betas
        self.ab = np.cumprod(self.alphas)
        self.ab_prev = np.append(1.0, self.ab[:-1])

    def posterior(self, x0, x_t, t: int):
        """q(x_{t−1} | x_t, x0) for t ≥ 1: prior N(√ᾱ_{t−1} x0, 1−ᾱ_{t−1}) times the likelihood
        N(x_t; √α_t x_{t−1}, β_t)."""
        prec = 1.0 / (1.0 - self.ab_prev[t]) + self.alphas[t] / self.betas[t]
        var = 1.0 / prec
        mean = var * (np.sqrt(self.ab_prev[t]) * x0 / (1.0 - self.ab_prev[t])
                      + np.sqrt(self.alphas[t]) * x_t / self.betas[t])
        return mean, var

    def posterior_var(self, t: int) -> float:
        return self.posterior(0.0, 0.0, max(t, 1))[1]  # clipped to β̃_1 at t = 0

    def model_var(self, t: int, kind: str, v=None):
        small = self.posterior_var(t)
        if kind == "fixed_small":
            return small
        if kind == "fixed_large":
            return small if t == 0 else self.betas[t]
        frac = (v + 1.0) / 2.0  # learned: IDDPM eq. 15
        return np.exp(frac * np.log(self.betas[t]) + (1.0 - frac) * np.log(small))

    def term_bits(self, x0, noise, t: int, eps, kind: str, v=None) -> np.ndarray:
        """L_t of one image-batch at one step t, with ε̂ = eps (and v) from the model."""
        x_t = np.sqrt(self.ab[t]) * x0 + np.sqrt(1.0 - self.ab[t]) * noise
        pred_x0 = np.clip((x_t - np.sqrt(1.0 - self.ab[t]) * eps) / np.sqrt(self.ab[t]), -1.0, 1.0)
        var = self.model_var(t, kind, v)
        if t == 0:
            return ref_decoder_bits(x0, pred_x0, var)
        true_mean, true_var = self.posterior(x0, x_t, t)
        model_mean, _ = self.posterior(pred_x0, x_t, t)
        return ref_kl_bits(true_mean, true_var, model_mean, var)

    def prior_bits(self, x0) -> np.ndarray:
        return ref_kl_bits(np.sqrt(self.ab[-1]) * x0, 1.0 - self.ab[-1], 0.0, 1.0)


# --- tiny models -------------------------------------------------------------------------------

class Affine(nn.Module):
    """ε̂ = a·x_t + c + 0.01·t (t: original timestep index); v = tanh(x_t + c) if learned."""

    def __init__(self, a: float, c: float, *, learn_sigma: bool = False) -> None:
        super().__init__()
        self.a, self.c, self.learn_sigma = a, c, learn_sigma

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.a * x + self.c + 0.01 * t.float().reshape(-1, 1, 1, 1)
        return torch.cat([eps, torch.tanh(x + self.c)], dim=1) if self.learn_sigma else eps

    def numpy(self, x_t: np.ndarray, t: int):
        eps = self.a * x_t + self.c + 0.01 * t
        return eps, (np.tanh(x_t + self.c) if self.learn_sigma else None)


class OptimalForPoint(nn.Module):
    """The exact ε-prediction when the data is the single image x*: ε = (x_t − √ᾱ x*)/√(1−ᾱ)."""

    def __init__(self, x_star: torch.Tensor, alphas_cumprod: np.ndarray) -> None:
        super().__init__()
        self.x_star = x_star
        self.ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)  # of the original process

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.ab[t].reshape(-1, 1, 1, 1)
        return ((x.double() - ab.sqrt() * self.x_star.double()) / (1 - ab).sqrt()).float()


class Recorder:
    """Wraps a model and keeps every (x_t, t) it is called with."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), t.clone()))
        return self.model(x, t)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([x for x, _ in self.calls]), torch.cat([t for _, t in self.calls])


def eight_bit_images(n: int, *, seed: int, shape=(2, 3, 3)) -> torch.Tensor:
    """Random 8-bit images in [-1, 1]; pixel 0 of every image is −1 and pixel 1 is +1 (edge bins)."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, (n, *shape), generator=g)
    levels[:, 0, 0, 0], levels[:, 0, 0, 1] = 0, 255
    return levels.float() / 127.5 - 1.0


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- per-term maths ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kind,learn_sigma", [("fixed_small", False), ("fixed_large", False), ("learned", True)],
)
def test_vb_terms_match_independent_formulas_at_every_step(kind, learn_sigma):
    d = Diffusion(betas=BETAS, learn_sigma=learn_sigma)
    ref = RefProcess(BETAS)
    model = Affine(0.3, 0.1, learn_sigma=learn_sigma)
    x0 = eight_bit_images(6, seed=1)
    noise = torch.randn(x0.shape, generator=gen(2))
    eps_variance = "fixed_small" if learn_sigma else kind
    for step in range(d.num_steps):
        t = torch.full((len(x0),), step, dtype=torch.long)
        got = vb_terms_bpd(model, d, x0=x0, t=t, noise=noise, eps_variance=eps_variance).numpy()
        x0n, nn_ = x0.double().numpy(), noise.double().numpy()
        x_t = np.sqrt(ref.ab[step]) * x0n + np.sqrt(1 - ref.ab[step]) * nn_
        eps, v = model.numpy(x_t, step)
        want = ref.term_bits(x0n, nn_, step, eps, kind, v)
        assert np.all(want > 0)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5, err_msg=f"step {step}")


def test_vb_terms_accept_a_different_step_per_image():
    d = Diffusion(betas=BETAS)
    model = Affine(0.3, 0.1)
    x0 = eight_bit_images(8, seed=3)
    noise = torch.randn(x0.shape, generator=gen(4))
    t = torch.tensor([0, 3, 1, 2, 2, 0, 3, 1])
    mixed = vb_terms_bpd(model, d, x0=x0, t=t, noise=noise)
    for step in range(4):
        same = vb_terms_bpd(model, d, x0=x0, t=torch.full_like(t, step), noise=noise)
        np.testing.assert_array_equal(mixed[t == step].numpy(), same[t == step].numpy())


def test_decoder_approximation_is_close_to_the_exact_normal_cdf():
    """IDDPM's tanh CDF is an approximation: the decoder term agrees with the exact Φ to ~1e-3 bits."""
    x0 = eight_bit_images(16, seed=5).double().numpy()
    mean = x0 + np.random.default_rng(0).normal(0, 0.05, x0.shape)
    approx, exact = ref_decoder_bits(x0, mean, 0.01), ref_decoder_bits(x0, mean, 0.01, cdf=ndtr)
    np.testing.assert_allclose(approx, exact, atol=5e-3)


def test_prior_term_is_the_closed_form_kl_and_shrinks_with_more_noise():
    x0 = eight_bit_images(5, seed=6)
    for betas in (BETAS, betas_for_schedule("cosine", 6)):
        got = prior_bpd(Diffusion(betas=betas), x0=x0).numpy()
        np.testing.assert_allclose(got, RefProcess(betas).prior_bits(x0.double().numpy()), rtol=1e-4, atol=1e-7)
    noisier = prior_bpd(Diffusion(betas=np.append(BETAS, 0.9)), x0=x0)
    assert torch.all(noisier < prior_bpd(Diffusion(betas=BETAS), x0=x0))


# --- the whole bound ---------------------------------------------------------------------------

def _point_setup(case: str):
    """(diffusion, original ᾱ, reference process of the evaluated steps)."""
    if case == "explicit":
        d = Diffusion(betas=BETAS)
        return d, d.alphas_cumprod_np, RefProcess(BETAS)
    full = Diffusion(betas=betas_for_schedule("cosine", 20))
    d = full.respaced(5)  # the model must be called with the original timestep indices
    ab = full.alphas_cumprod_np[d.timestep_map.numpy()]
    return d, full.alphas_cumprod_np, RefProcess(1.0 - ab / np.append(1.0, ab[:-1]))


@pytest.mark.parametrize("case", ["explicit", "respaced_cosine"])
@pytest.mark.parametrize("kind", ["fixed_small", "fixed_large"])
def test_bound_of_the_optimal_model_for_one_point_is_closed_form(case, kind):
    """Data = one image x*, model = its exact ε: x̂0 = x*, so L_t (t > 0) is the KL between two
    Gaussians with the same mean (0 with the true posterior variance), L_0 the decoder NLL of x*
    around itself, whatever the noise."""
    d, ab_orig, ref = _point_setup(case)
    x_star = eight_bit_images(1, seed=7)
    images = x_star.expand(6, -1, -1, -1).clone()
    result = bits_per_dim(OptimalForPoint(x_star[0], ab_orig), d, images, generator=gen(0), batch_size=7,
                          eps_variance=kind)
    xs = x_star.double().numpy()
    want_terms = [ref_decoder_bits(xs, xs, ref.posterior_var(0))[0]]
    for t in range(1, ref.T):
        small, var = ref.posterior_var(t), ref.model_var(t, kind)
        want_terms.append(ref_kl_bits(np.zeros(xs.shape), small, 0.0, var)[0])
    want_prior = ref.prior_bits(xs)[0]
    np.testing.assert_allclose(result.terms, want_terms, rtol=1e-4, atol=1e-5)
    assert result.prior_bpd == pytest.approx(want_prior, rel=1e-5)
    assert result.bpd == pytest.approx(want_prior + sum(want_terms), rel=1e-4)
    assert result.bpd_se < 1e-4  # identical images, noise-independent terms, every step evaluated
    assert result.exact and result.num_images == 6 and result.num_steps == ref.T


def test_exact_bound_is_the_sum_of_its_terms_and_its_groups():
    d = Diffusion(betas=betas_for_schedule("cosine", 6), learn_sigma=True)
    images = eight_bit_images(9, seed=8)
    r = bits_per_dim(Affine(0.3, 0.1, learn_sigma=True), d, images, generator=gen(1), batch_size=4)
    assert isinstance(r, LikelihoodResult) and r.timesteps_per_image is None
    assert r.terms.shape == (6,) and np.all(r.terms > 0)
    assert r.bpd == pytest.approx(r.prior_bpd + r.terms.sum(), rel=1e-12)
    assert r.bpd == pytest.approx(r.per_image_bpd.mean(), rel=1e-12)
    assert r.bpd_se == pytest.approx(r.per_image_bpd.std(ddof=1) / 3, rel=1e-12)
    groups = r.by_groups([0, 1, 4, 6])
    np.testing.assert_allclose(groups, [r.terms[0], r.terms[1:4].sum(), r.terms[4:].sum()], rtol=1e-12)
    assert sum(groups) == pytest.approx(r.bpd - r.prior_bpd, rel=1e-12)
    assert r.by_groups([0, 6]) == [pytest.approx(r.terms.sum(), rel=1e-12)]
    for bad in ([0, 3], [1, 6], [0, 4, 4, 6], [0, 7]):
        with pytest.raises(ValueError):
            r.by_groups(bad)


def test_exact_bound_matches_the_reference_averaged_over_images():
    """Bits/dim of a whole set against the reference: the noise each pair saw is read back from
    the model's input, x_t = √ᾱ x0 + √(1−ᾱ) ε, since the test knows the images and steps."""
    d, ref = Diffusion(betas=BETAS), RefProcess(BETAS)
    model = Affine(-0.2, 0.05)
    images = eight_bit_images(5, seed=9)
    rec = Recorder(model)
    r = bits_per_dim(rec, d, images, generator=gen(3), batch_size=3)
    x_t, t = rec.inputs()
    assert t.tolist() == [0, 1, 2, 3] * 5  # image-major, every step
    x0 = images.double().numpy().repeat(4, axis=0)
    ab = ref.ab[t.numpy()].reshape(-1, 1, 1, 1)
    noise = (x_t.double().numpy() - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
    want = np.zeros((5, 4))
    for row, step in enumerate(t.tolist()):
        eps, _ = model.numpy(x_t[row : row + 1].double().numpy(), step)
        want[row // 4, step] = ref.term_bits(x0[row : row + 1], noise[row : row + 1], step, eps, "fixed_small")[0]
    prior = ref.prior_bits(images.double().numpy())
    np.testing.assert_allclose(r.terms, want.mean(0), rtol=2e-4)
    np.testing.assert_allclose(r.per_image_bpd, prior + want.sum(1), rtol=2e-4)
    # The noise really is standard normal-ish, and drawn afresh for each step of an image.
    assert 0.5 < noise.std() < 1.5
    per_image = noise.reshape(5, 4, -1)
    assert all(not np.allclose(per_image[i, s], per_image[i, u], atol=1e-3)
               for i in range(5) for s in range(4) for u in range(s))


def test_stratified_estimate_is_unbiased_for_the_exact_bound_and_each_term():
    """Same seed → same noise for every (image, step), so estimate − exact isolates the timestep
    sampling; its mean over seeds must be within a few standard errors of 0."""
    d = Diffusion(betas=betas_for_schedule("cosine", 6))
    model = Affine(0.3, 0.1)
    images = eight_bit_images(8, seed=10)
    diffs, est_terms, exact_terms = [], [], []
    for seed in range(40):
        exact = bits_per_dim(model, d, images, generator=gen(seed), batch_size=64)
        est = bits_per_dim(model, d, images, generator=gen(seed), timesteps_per_image=2, batch_size=64)
        assert est.timesteps_per_image == 2 and not est.exact
        assert est.bpd == pytest.approx(est.prior_bpd + est.terms.sum(), rel=1e-12)
        assert est.prior_bpd == exact.prior_bpd
        diffs.append(est.bpd - exact.bpd)
        est_terms.append(est.terms)
        exact_terms.append(exact.terms)
    diffs = np.array(diffs)
    assert np.std(diffs) > 0  # the estimate does differ from the exact value...
    assert abs(diffs.mean()) < 4 * diffs.std(ddof=1) / math.sqrt(len(diffs))  # ...but not on average
    per_t = np.array(est_terms) - np.array(exact_terms)
    se = per_t.std(ddof=1, axis=0) / math.sqrt(len(per_t))
    assert np.all(np.abs(per_t.mean(0)) < 4 * se + 1e-9)


def test_estimate_standard_error_includes_the_timestep_sampling():
    """One image repeated, optimal model: every L_t is noise-independent and only L_0 > 0 (fixed
    small). The exact bound then has SE ≈ 0; with K = 1 of S = 4 steps each image's estimate is
    prior + 4·L_0 with probability 1/4, else prior: SD = L_0·√3 over images, and the SE says so."""
    d = Diffusion(betas=BETAS)
    x_star = eight_bit_images(1, seed=11)
    images = x_star.expand(200, -1, -1, -1).clone()
    model = OptimalForPoint(x_star[0], d.alphas_cumprod_np)
    exact = bits_per_dim(model, d, images[:4], generator=gen(0))
    est = bits_per_dim(model, d, images, generator=gen(0), timesteps_per_image=1, batch_size=100)
    l0 = exact.terms[0]
    assert exact.bpd_se < 1e-4 * exact.bpd
    assert 0.7 < est.bpd_se / (l0 * math.sqrt(3) / math.sqrt(200)) < 1.3
    assert abs(est.bpd - exact.bpd) < 4 * est.bpd_se
    # Each stratum of size 1 (K = 1 with S = 4 → weight 4) drawn about equally often.
    picked = est.per_image_bpd - est.prior_bpd
    hit = np.isclose(picked, 4 * l0, rtol=1e-5)
    assert np.all(hit | np.isclose(picked, 0.0, atol=1e-4)) and 30 < hit.sum() < 70


def test_k_equal_to_the_number_of_steps_is_the_exact_bound():
    d = Diffusion(betas=BETAS)
    images = eight_bit_images(3, seed=12)
    a = bits_per_dim(Affine(0.3, 0.1), d, images, generator=gen(5))
    b = bits_per_dim(Affine(0.3, 0.1), d, images, generator=gen(5), timesteps_per_image=4)
    assert b.exact and np.array_equal(a.per_image_bpd, b.per_image_bpd) and np.array_equal(a.terms, b.terms)


# --- the routed ensemble -----------------------------------------------------------------------

@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ensemble_bound_is_the_sum_of_its_experts_terms_on_their_steps(learn_sigma):
    d = Diffusion(betas=betas_for_schedule("cosine", 6), learn_sigma=learn_sigma)
    a, b = Affine(0.3, 0.1, learn_sigma=learn_sigma), Affine(-0.2, -0.05, learn_sigma=learn_sigma)
    router = ExpertRouter(experts=[a, b], boundaries=[0, 2, 6])
    images = eight_bit_images(7, seed=13)
    for k in (None, 3):
        # batch_size 5 mixes steps of both groups in one call: the router splits the batch.
        routed = bits_per_dim(router, d, images, generator=gen(21), timesteps_per_image=k, batch_size=5)
        ra = bits_per_dim(a, d, images, generator=gen(21), timesteps_per_image=k, batch_size=5)
        rb = bits_per_dim(b, d, images, generator=gen(21), timesteps_per_image=k, batch_size=5)
        np.testing.assert_allclose(routed.terms[:2], ra.terms[:2], rtol=1e-6)
        np.testing.assert_allclose(routed.terms[2:], rb.terms[2:], rtol=1e-6)
        groups = routed.by_groups([0, 2, 6])
        np.testing.assert_allclose(groups, [ra.terms[:2].sum(), rb.terms[2:].sum()], rtol=1e-6)
        assert routed.bpd == pytest.approx(routed.prior_bpd + sum(groups), rel=1e-9)
        # The experts differ, so the check above can fail: the wrong expert's terms do not match.
        assert not np.allclose(ra.terms[2:], rb.terms[2:], rtol=1e-3)


# --- randomness --------------------------------------------------------------------------------

def test_same_seed_gives_identical_triples_for_any_model_and_batch_size():
    d = Diffusion(betas=betas_for_schedule("cosine", 6))
    images = eight_bit_images(5, seed=14)
    for k in (None, 2):
        runs = []
        for model, batch_size in ((Affine(0.3, 0.1), 4), (Affine(0.3, 0.1), 4), (Affine(-0.5, 0.2), 4),
                                  (Affine(0.3, 0.1), 7)):
            rec = Recorder(model)
            r = bits_per_dim(rec, d, images, generator=gen(99), timesteps_per_image=k, batch_size=batch_size)
            runs.append((r, *rec.inputs()))
        (r1, x1, t1), (r2, x2, t2), (r3, x3, t3), (r4, x4, t4) = runs
        # Same model, same seed: bitwise equal results.
        assert np.array_equal(r1.per_image_bpd, r2.per_image_bpd) and np.array_equal(r1.terms, r2.terms)
        # A different model or batch size sees exactly the same (image, step, noise) triples.
        for x, t in ((x3, t3), (x4, t4)):
            assert torch.equal(t, t1) and torch.equal(x, x1)
        assert not np.allclose(r3.terms, r1.terms)
        np.testing.assert_allclose(r4.per_image_bpd, r1.per_image_bpd, rtol=1e-6)
        if k is None:
            exact_x, exact_t = x1, t1
    # The estimate's pairs are pairs of the exact bound, with the same noise: (image r // K, its step).
    assert len(t1) == 5 * 2 and len(exact_t) == 5 * 6
    rows = torch.arange(10) // 2 * 6 + t1
    assert torch.equal(x1, exact_x[rows]) and torch.equal(t1, exact_t[rows])
    assert all(lo <= s < hi for s, (lo, hi) in zip(t1.tolist(), [(0, 3), (3, 6)] * 5))
    # A different seed draws different steps or noise.
    recs = [Recorder(Affine(0.3, 0.1)) for _ in range(2)]
    for rec, seed in zip(recs, (99, 100)):
        bits_per_dim(rec, d, images, generator=gen(seed), batch_size=4)
    assert not torch.equal(recs[0].inputs()[0], recs[1].inputs()[0])


def test_generator_state_advances_and_drives_the_result():
    d = Diffusion(betas=BETAS)
    images = eight_bit_images(4, seed=15)
    g = gen(7)
    first = bits_per_dim(Affine(0.3, 0.1), d, images, generator=g)
    second = bits_per_dim(Affine(0.3, 0.1), d, images, generator=g)  # continues the stream
    again = bits_per_dim(Affine(0.3, 0.1), d, images, generator=gen(7))
    assert np.array_equal(first.per_image_bpd, again.per_image_bpd)
    assert not np.array_equal(first.per_image_bpd, second.per_image_bpd)


# --- input checks ------------------------------------------------------------------------------

def test_rejects_bad_inputs():
    d = Diffusion(betas=BETAS)
    images = eight_bit_images(2, seed=16)
    with pytest.raises(ValueError, match="8-bit"):
        bits_per_dim(Affine(0.3, 0.1), d, images + 0.001, generator=gen(0))
    with pytest.raises(ValueError, match="8-bit"):
        bits_per_dim(Affine(0.3, 0.1), d, images * 1.5, generator=gen(0))
    with pytest.raises(ValueError, match="timesteps_per_image"):
        bits_per_dim(Affine(0.3, 0.1), d, images, generator=gen(0), timesteps_per_image=5)
    with pytest.raises(ValueError, match="output has shape"):  # ε-only model, learned-variance process
        bits_per_dim(Affine(0.3, 0.1), Diffusion(betas=BETAS, learn_sigma=True), images, generator=gen(0))
    with pytest.raises(ValueError, match="output has shape"):
        bits_per_dim(Affine(0.3, 0.1, learn_sigma=True), d, images, generator=gen(0))
    with pytest.raises(ValueError, match="eps_variance"):
        bits_per_dim(Affine(0.3, 0.1), d, images, generator=gen(0), eps_variance="large")
