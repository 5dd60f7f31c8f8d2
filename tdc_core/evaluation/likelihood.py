"""Held-out negative log-likelihood in bits/dim from the variational bound (IDDPM's definition).

Nichol & Dhariwal 2021, ``improved_diffusion/gaussian_diffusion.py`` (``calc_bpd_loop``,
``_vb_terms_bpd``, ``_prior_bpd``). With 0-based steps ``t`` of a :class:`Diffusion` of S steps::

    −log p_θ(x0) ≤ L_prior + Σ_{t=0}^{S−1} L_t
    L_0     = −log p_θ(x0 | x_t)                         discretised Gaussian decoder, 256 bins
    L_t     = KL(q(x_{t−1} | x_t, x0) ‖ p_θ(x_{t−1} | x_t))  for 0 < t < S
    L_prior = KL(q(x_{S−1} | x0) ‖ N(0, I))               no parameters; the model is not called

every term in **bits per dimension**: nats / (ln 2 · C·H·W). The per-term maths (posterior,
predicted mean with x̂0 clamped to [-1, 1] as ``calc_bpd_loop(clip_denoised=True)``, KL,
decoder) is :meth:`Diffusion._vb_term`'s; this module only adds the prior term, the variance
choice for ε-only models, the choice of (image, step, noise) triples and the averaging.

Variance of p_θ:
* a model with a learned variance channel (``diffusion.learn_sigma``; output ``[N x 2C x H x W]``):
  :meth:`Diffusion.model_log_variance` of its interpolation output v (IDDPM eq. 15);
* an ε-only model (output ``[N x C x H x W]``): ``eps_variance="fixed_small"`` (default) uses the
  posterior variance β̃_t (clipped to β̃_1 at t = 0), as IDDPM does for ``learn_sigma=False``
  with ``sigma_small``; ``"fixed_large"`` uses β_t, the variance the ancestral sampler uses.

Exact bound vs estimate (:func:`bits_per_dim`):
* ``timesteps_per_image=None``: every step for every image (S model calls per image), one noise
  draw per (image, step): what ``calc_bpd_loop`` computes.
* ``timesteps_per_image=K``: [0, S) is cut into K strata ``[e_k, e_{k+1})``, ``e_k = ⌊k·S/K⌋``;
  each image gets one step drawn uniformly in each stratum, weighted by the stratum's size
  ``e_{k+1} − e_k``. Given the noise this is an unbiased estimate of Σ_t L_t for each image, and of
  each mean term L_t (K model calls per image instead of S).

The standard error is the spread of the per-image totals over images, ``std(ddof=1)/√N``. Each
image's steps and noise are drawn independently, so it covers the variation over images, over
the noise and, for the estimate, over the timestep draw.

Randomness. All of it comes from the ``generator`` passed in: one seed per image is drawn from it
(in image order), the image's stratified steps come from a CPU generator seeded with that seed,
and the noise of the pair (image i, step t) from a CPU generator seeded with a hash of (seed_i, t).
So a pair's noise depends on nothing else: not on the model, the batch size, K, the device or
which other pairs are evaluated; two models evaluated with the same generator state see exactly
the same (image, step, noise) triples, and the routed ensemble's term at step t equals that of
the expert serving t. (Torch CPU generators use 32 bits of their seed, so among millions of pairs
a few may share a noise draw; each draw is still N(0, I) and every estimate stays unbiased.)

Pure torch; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.diffusion.samplers import Denoiser
from tdc_core.method.routing import check_boundaries

__all__ = ["EpsVariance", "LikelihoodResult", "bits_per_dim", "prior_bpd", "vb_terms_bpd"]

EpsVariance = Literal["fixed_small", "fixed_large"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class LikelihoodResult:
    """Negative log-likelihood bound of a set of images, in bits/dim.

    Attributes:
        bpd: mean over images of the per-image bound (or its estimate): ``prior_bpd + terms.sum()``.
        bpd_se: standard error of ``bpd`` over images (includes noise and timestep sampling).
        terms: float64 ``[S]``: mean over images of L_t, step t of the diffusion (an unbiased
            estimate of it when ``timesteps_per_image`` is set; exactly 0 where no image drew t).
        prior_bpd: mean over images of L_prior = KL(q(x_{S−1} | x0) ‖ N(0, I)).
        per_image_bpd: float64 ``[N]``: each image's bound (or its estimate).
        timesteps_per_image: None for the exact bound (all S steps), else K of the estimate.
    """

    bpd: float
    bpd_se: float
    terms: np.ndarray
    prior_bpd: float
    per_image_bpd: np.ndarray
    timesteps_per_image: int | None

    @property
    def num_images(self) -> int:
        return len(self.per_image_bpd)

    @property
    def num_steps(self) -> int:
        """S, the number of steps of the evaluated diffusion."""
        return len(self.terms)

    @property
    def exact(self) -> bool:
        """Whether every step was evaluated for every image (no timestep sampling)."""
        return self.timesteps_per_image is None

    def by_groups(self, boundaries: Sequence[int]) -> list[float]:
        """Sum of the mean terms inside each group ``[b_g, b_{g+1})``, in bits/dim.

        The bound is a sum over steps, so the groups' sums add up to ``bpd − prior_bpd``.

        Args:
            boundaries: ``0 = b_0 < b_1 < ... < b_G = S`` (S = :attr:`num_steps`).

        Raises:
            ValueError: bad boundaries, or the last is not S.
        """
        bounds = check_boundaries(boundaries)
        if bounds[-1] != self.num_steps:
            raise ValueError(f"boundaries={bounds} must end at the number of steps, {self.num_steps}")
        return [float(self.terms[lo:hi].sum()) for lo, hi in zip(bounds, bounds[1:])]


def _bits_per_dim(nats: torch.Tensor) -> torch.Tensor:
    """Mean over all but the first dimension, in bits: ``[N x ...]`` nats → ``[N]`` bits/dim."""
    return nats.mean(dim=tuple(range(1, nats.ndim))) / math.log(2.0)


@torch.no_grad()
def prior_bpd(diffusion: Diffusion, *, x0: torch.Tensor) -> torch.Tensor:
    """L_prior = KL(q(x_{S−1} | x0) ‖ N(0, I)) per image, bits/dim.

    Args:
        diffusion: the process; its last step S − 1 is the one whose marginal is compared.
        x0: float ``[N x C x H x W]`` images in [-1, 1].

    Returns:
        float32 ``[N]``, bits/dim (≥ 0).
    """
    # KL(N(m, v) ‖ N(0, 1)) = ½(m² + v − 1 − log v) with m = √ᾱ·x0, v = 1 − ᾱ (ᾱ of the last step):
    # ½ᾱ·x0² + ½(−ᾱ − log(1 − ᾱ)). The constant is taken in float64 with log1p: in float32,
    # v − 1 − log v cancels catastrophically when ᾱ is small, which is the usual case.
    ab = float(diffusion.alphas_cumprod_np[-1])
    const = 0.5 * (-ab - math.log1p(-ab))
    kl = 0.5 * ab * x0.double() ** 2 + const
    return _bits_per_dim(kl).float()


@torch.no_grad()
def vb_terms_bpd(
    model: Denoiser,
    diffusion: Diffusion,
    *,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    eps_variance: EpsVariance = "fixed_small",
) -> torch.Tensor:
    """L_t per image at steps ``t`` (which may differ per image), bits/dim.

    ``x_t = q_sample(x0, t, noise)``; the model is called once, as ``model(x_t,
    diffusion.model_timesteps(t))``. L_0 is the decoder NLL of x0, L_t (t > 0) the KL between the
    true posterior and p_θ (see the module docstring for p_θ's variance).

    Args:
        model: denoiser ``(x [N x C x H x W], t int64 [N] original timestep indices) → output``:
            ``[N x C x H x W]`` (ε̂), or ``[N x 2C x H x W]`` (ε̂, v) when ``diffusion.learn_sigma``.
        diffusion: the process; ``t`` are its steps.
        x0: float ``[N x C x H x W]`` 8-bit images in [-1, 1].
        t: int64 ``[N]`` steps in ``[0, S)``.
        noise: float ``[N x C x H x W]``, ε of ``q_sample``.
        eps_variance: variance of p_θ for an ε-only model; ignored when the variance is learned.

    Returns:
        float32 ``[N]``, bits/dim.

    Raises:
        ValueError: the model's output does not have C (ε-only) or 2C (learned variance) channels
            as ``diffusion.learn_sigma`` says, or an unknown ``eps_variance``.
    """
    if eps_variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"eps_variance={eps_variance!r}; allowed: fixed_small, fixed_large")
    x0 = x0.float()
    channels = x0.shape[1]
    x_t = diffusion.q_sample(x0, t, noise.to(x0))
    out = model(x_t, diffusion.model_timesteps(t))
    want = 2 * channels if diffusion.learn_sigma else channels
    if out.shape != (x0.shape[0], want, *x0.shape[2:]):
        raise ValueError(
            f"model output has shape {list(out.shape)}, expected {[x0.shape[0], want, *x0.shape[2:]]} "
            f"(learn_sigma={diffusion.learn_sigma})"
        )
    eps, v = diffusion.split_output(out.float(), channels)
    if v is None and eps_variance == "fixed_small":
        # v = −1 selects the lower end of IDDPM's interpolation exactly: log β̃_t (clipped at t = 0).
        v = torch.full_like(eps, -1.0)
    # v = None: model_log_variance falls back to "fixed large" (β_t; β̃_1 at t = 0).
    return diffusion._vb_term(x0=x0, x_t=x_t, t=t, eps=eps, v=v)


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of a 64-bit integer."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
    return z ^ (z >> 31)


def _pair_noise(image_seed: int, step: int, shape: Sequence[int]) -> torch.Tensor:
    """The noise of (image, step): float32 ``shape`` on the CPU, a function of its arguments only."""
    g = torch.Generator().manual_seed(_mix64((image_seed + (step + 1) * _GOLDEN) & _MASK64))
    return torch.randn(tuple(shape), generator=g)


def _image_steps(image_seed: int, num_steps: int, k: int | None) -> tuple[list[int], list[float]]:
    """The steps an image is evaluated at and their weights: all with weight 1, or K stratified."""
    if k is None:
        return list(range(num_steps)), [1.0] * num_steps
    edges = [(i * num_steps) // k for i in range(k + 1)]
    g = torch.Generator().manual_seed(_mix64(image_seed))
    u = torch.rand(k, generator=g, dtype=torch.float64).tolist()
    sizes = [hi - lo for lo, hi in zip(edges, edges[1:])]
    steps = [min(lo + int(ui * n), lo + n - 1) for lo, n, ui in zip(edges, sizes, u)]
    return steps, [float(n) for n in sizes]


def _pair_batches(
    seeds: list[int], *, num_steps: int, k: int | None, shape: Sequence[int], batch_size: int,
) -> Iterator[tuple[list[int], list[int], list[float], torch.Tensor]]:
    """(image indices, steps, weights, noise ``[B x C x H x W]``) of up to ``batch_size`` pairs, image-major."""
    idx: list[int] = []
    steps: list[int] = []
    weights: list[float] = []
    noise: list[torch.Tensor] = []
    for i, seed in enumerate(seeds):
        for step, w in zip(*_image_steps(seed, num_steps, k)):
            idx.append(i)
            steps.append(step)
            weights.append(w)
            noise.append(_pair_noise(seed, step, shape))
            if len(idx) == batch_size:
                yield idx, steps, weights, torch.stack(noise)
                idx, steps, weights, noise = [], [], [], []
    if idx:
        yield idx, steps, weights, torch.stack(noise)


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N x C x H x W] tensor, got shape {list(images.shape)}")
    if not images.dtype.is_floating_point:
        raise ValueError(f"images must be float in [-1, 1], got dtype {images.dtype}")
    levels = (images.double() + 1.0) * 127.5
    off_grid = (levels - levels.round()).abs().max().item()
    if levels.min().item() < -1e-3 or levels.max().item() > 255 + 1e-3 or off_grid > 1e-2:
        raise ValueError(
            "images must be 8-bit images in [-1, 1] (x = k/127.5 − 1, k = 0..255): the decoder term "
            "is a likelihood over 256 bins"
        )


@torch.no_grad()
def bits_per_dim(
    model: Denoiser,
    diffusion: Diffusion,
    images: torch.Tensor,
    *,
    generator: torch.Generator,
    timesteps_per_image: int | None = None,
    batch_size: int = 256,
    eps_variance: EpsVariance = "fixed_small",
) -> LikelihoodResult:
    """Negative log-likelihood bound of ``images`` under ``model``, bits/dim (IDDPM's ``calc_bpd_loop``).

    Args:
        model: denoiser, as for :func:`vb_terms_bpd` (a UNet or the routed ensemble), on ``images``'
            device.
        diffusion: the process (possibly respaced: then the bound is that of the respaced chain).
        images: float ``[N x C x H x W]`` 8-bit held-out images in [-1, 1].
        generator: the only source of randomness (see the module docstring): the same generator
            state gives the same (image, step, noise) triples for any model.
        timesteps_per_image: None for the exact bound (S model calls per image); K in [1, S] for
            the stratified unbiased estimate (K calls per image; K = S is the exact bound).
        batch_size: (image, step) pairs per model call.
        eps_variance: variance of p_θ for an ε-only model; ignored when the variance is learned.

    Returns:
        The :class:`LikelihoodResult`.

    Raises:
        ValueError: images not ``[N x C x H x W]`` 8-bit values in [-1, 1], ``timesteps_per_image``
            outside [1, S], ``batch_size`` < 1, or a model output of the wrong shape.
    """
    _check_images(images)
    num_steps = diffusion.num_steps
    k = timesteps_per_image
    if k is not None and not 1 <= k <= num_steps:
        raise ValueError(f"timesteps_per_image={k} must be in [1, {num_steps}] (or None for all steps)")
    if k == num_steps:
        k = None  # one draw per stratum of size 1: every step, weight 1
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    n = images.shape[0]
    device = images.device
    seeds = torch.randint(0, 2**62, (n,), generator=generator, device=generator.device).tolist()

    prior = torch.cat([prior_bpd(diffusion, x0=images[a:a + batch_size]) for a in range(0, n, batch_size)])
    per_image = prior.double().cpu()
    term_sums = torch.zeros(num_steps, dtype=torch.float64)
    for idx, steps, weights, noise in _pair_batches(
        seeds, num_steps=num_steps, k=k, shape=images.shape[1:], batch_size=batch_size,
    ):
        index = torch.tensor(idx, dtype=torch.long)
        t = torch.tensor(steps, dtype=torch.long)
        terms = vb_terms_bpd(
            model, diffusion, x0=images[index.to(device)], t=t.to(device), noise=noise.to(device),
            eps_variance=eps_variance,
        )
        weighted = terms.double().cpu() * torch.tensor(weights, dtype=torch.float64)
        per_image.index_add_(0, index, weighted)
        term_sums.index_add_(0, t, weighted)

    per_image_np = per_image.numpy()
    se = float(per_image_np.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return LikelihoodResult(
        bpd=float(per_image_np.mean()),
        bpd_se=se,
        terms=(term_sums / n).numpy(),
        prior_bpd=float(prior.double().mean()),
        per_image_bpd=per_image_np,
        timesteps_per_image=k,
    )
