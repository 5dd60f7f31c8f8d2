"""One held-out evaluator for every model: fixed, seeded, timestep-stratified (image, t, ε) triples.

Every model of a comparison (the TDC ensemble, the shared model, each baseline) is scored on the
same triples, so differences between their numbers are due to the models alone. The triples
are stratified over timesteps: each held-out image gets one t in each of ``per_image`` equal
strata of [0, T), so the mean over triples is an estimate of the uniform-t average whose
timestep mix does not depend on the draw (a plain uniform draw of a few hundred t can
over-sample t ≈ 0, where ε-MSE is largest, and shift the mean by more than the differences
between models).

Numbers (all per pixel, images in [-1, 1]):

- ``eps_mse``: ‖ε − ε̂‖² averaged uniformly over t; dominated by t ≈ 0 (≈ 0.5 there, ≈ 0.001
  near T), so it is reported with two re-weightings:
- ``x0_mse``: ‖x0 − x̂0‖² with x̂0 from ε̂, clamped to [-1, 1] as the samplers use it (before
  clamping it would be ε-MSE / SNR(t), dominated by the last few steps); weighs large t;
- ``eps_mse_min_snr``: ε-MSE weighted by min(SNR, γ)/SNR (Min-SNR-γ, Hang et al. 2023, γ = 5),
  normalised by the mean weight: t ≈ 0 no longer dominates;
- each per timestep bucket (``num_buckets`` equal-width intervals) and per group of the
  run's boundaries.

Standard errors treat the held-out images as the independent units (the strata are fixed by
design): SE = SD over images of the per-image mean / √N. Per-image values are kept so two models'
paired difference has its own SE (:func:`paired_difference`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.diffusion.samplers import Denoiser
from tdc_core.training.data import to_model_range

__all__ = ["HeldoutScore", "HeldoutTriples", "PairedDifference", "difference_over_images", "heldout_triples",
           "paired_difference", "score_heldout"]

# Noise is drawn per chunk of this many triples from its own seeded generator, so the triples do
# not depend on the evaluation batch size or the device.
_NOISE_CHUNK = 256
MIN_SNR_GAMMA = 5.0


@dataclass(frozen=True)
class HeldoutTriples:
    """Which (image, t) pairs are scored, and the seed of their noise.

    ``image``, ``t``: int64 ``[M]``, ``M = num_images · per_image``, ordered image-major.
    """

    image: torch.Tensor
    t: torch.Tensor
    num_images: int
    per_image: int
    num_timesteps: int
    seed: int

    def noise(self, chunk: int, shape: tuple[int, int, int]) -> torch.Tensor:
        """The ε of triples ``[chunk·256, (chunk+1)·256)``, float32 ``[n x C x H x W]`` on the CPU."""
        n = min(_NOISE_CHUNK, len(self.t) - chunk * _NOISE_CHUNK)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + chunk)
        return torch.randn((n, *shape), generator=g)


def heldout_triples(*, num_images: int, num_timesteps: int, per_image: int, seed: int) -> HeldoutTriples:
    """Each of ``num_images`` images gets one timestep uniformly inside each of ``per_image``
    equal strata of [0, ``num_timesteps``) (``per_image`` ≤ T)."""
    if num_images < 1 or not 1 <= per_image <= num_timesteps:
        raise ValueError(f"need ≥ 1 image and 1 ≤ per_image ≤ T, got {num_images} images, per_image={per_image}, "
                         f"T={num_timesteps}")
    g = torch.Generator().manual_seed(seed)
    edges = torch.linspace(0, num_timesteps, per_image + 1, dtype=torch.float64)
    lo, width = edges[:-1], edges[1:] - edges[:-1]
    u = torch.rand((num_images, per_image), generator=g, dtype=torch.float64)
    t = (lo + u * width).floor().long().clamp_(0, num_timesteps - 1)
    image = torch.arange(num_images).repeat_interleave(per_image)
    return HeldoutTriples(image=image, t=t.reshape(-1), num_images=num_images, per_image=per_image,
                          num_timesteps=num_timesteps, seed=seed)


class HeldoutScore(BaseModel):
    """A model's held-out numbers on one :class:`HeldoutTriples` set (see the module docstring)."""

    model_config = ConfigDict(frozen=True)

    name: str
    num_images: int
    per_image: int
    seed: int
    eps_mse: float
    eps_mse_se: float
    x0_mse: float
    x0_mse_se: float
    eps_mse_min_snr: float
    eps_mse_min_snr_se: float
    bucket_edges: list[int]             # [B + 1] timestep edges
    bucket_eps_mse: list[float]         # [B]
    bucket_x0_mse: list[float]          # [B]
    boundaries: list[int]               # the run's group boundaries [G + 1]
    group_eps_mse: list[float]          # [G], uniform over the group's timesteps
    group_x0_mse: list[float]           # [G]
    per_image_eps_mse: list[float]      # [N], for paired differences
    per_image_x0_mse: list[float]       # [N]
    per_image_eps_mse_min_snr: list[float]  # [N]


def _se(per_image: np.ndarray) -> float:
    return float(per_image.std(ddof=1) / math.sqrt(len(per_image))) if len(per_image) > 1 else 0.0


def _interval_means(values: np.ndarray, t: np.ndarray, edges: Sequence[int]) -> list[float]:
    """Mean of ``values`` over triples with ``edges[i] ≤ t < edges[i+1]``, for each i (NaN if none)."""
    idx = np.searchsorted(np.asarray(edges[1:-1]), t, side="right")
    sums = np.bincount(idx, weights=values, minlength=len(edges) - 1)
    counts = np.bincount(idx, minlength=len(edges) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return [float(s / c) if c else float("nan") for s, c in zip(sums, counts)]


@torch.no_grad()
def score_heldout(
    model: Denoiser, diffusion: Diffusion, *, name: str, images: torch.Tensor, triples: HeldoutTriples,
    boundaries: Sequence[int], num_buckets: int = 20, batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> HeldoutScore:
    """Score ``model`` on ``triples`` of the held-out uint8 ``images`` ``[N x C x H x W]``.

    Args:
        diffusion: the full (not respaced) process; ``model(x_t, t)`` gets original timesteps.
        boundaries: group edges ``[0, b_1, ..., T]`` (``[0, T]`` for a single model).
    """
    if images.shape[0] != triples.num_images or diffusion.num_steps != triples.num_timesteps:
        raise ValueError(f"triples are for {triples.num_images} images and T={triples.num_timesteps}, "
                         f"got {images.shape[0]} images and T={diffusion.num_steps}")
    device = torch.device(device)
    shape = tuple(images.shape[1:])
    eps_err, x0_err = [], []
    for start in range(0, len(triples.t), _NOISE_CHUNK):
        noise_all = triples.noise(start // _NOISE_CHUNK, shape)
        for s in range(0, len(noise_all), batch_size):
            sl = slice(start + s, start + min(s + batch_size, len(noise_all)))
            x0 = to_model_range(images[triples.image[sl]]).to(device)
            t = triples.t[sl].to(device)
            noise = noise_all[s:s + batch_size].to(device)
            x_t = diffusion.q_sample(x0, t, noise)
            eps, _ = diffusion.split_output(model(x_t, diffusion.model_timesteps(t)).float(), x0.shape[1])
            dims = tuple(range(1, x0.ndim))
            eps_err.append((noise - eps).pow(2).mean(dim=dims).cpu())
            # x̂0 clamped to the data range, as the samplers use it: unclamped, x̂0 − x0 =
            # −(ε̂ − ε)/√SNR grows ~300× near T and a handful of triples would decide the mean.
            x0_hat = diffusion.predict_x0(x_t, t, eps).clamp(-1, 1)
            x0_err.append((x0_hat - x0).pow(2).mean(dim=dims).cpu())
    return _summarise(name=name, triples=triples, diffusion=diffusion, boundaries=boundaries,
                      num_buckets=num_buckets, eps=torch.cat(eps_err).double().numpy(),
                      x0=torch.cat(x0_err).double().numpy())


def _summarise(*, name: str, triples: HeldoutTriples, diffusion: Diffusion, boundaries: Sequence[int],
               num_buckets: int, eps: np.ndarray, x0: np.ndarray) -> HeldoutScore:
    t = triples.t.numpy()
    ab = diffusion.alphas_cumprod_np[t]
    snr = ab / (1.0 - ab)
    weight = np.minimum(snr, MIN_SNR_GAMMA) / snr
    weighted = eps * weight / weight.mean()
    n, k = triples.num_images, triples.per_image
    per_eps, per_x0, per_w = (v.reshape(n, k).mean(axis=1) for v in (eps, x0, weighted))
    T = triples.num_timesteps
    edges = [int(round(T * i / num_buckets)) for i in range(num_buckets + 1)]
    return HeldoutScore(
        name=name, num_images=n, per_image=k, seed=triples.seed,
        eps_mse=float(eps.mean()), eps_mse_se=_se(per_eps), x0_mse=float(x0.mean()), x0_mse_se=_se(per_x0),
        eps_mse_min_snr=float(weighted.mean()), eps_mse_min_snr_se=_se(per_w),
        bucket_edges=edges, bucket_eps_mse=_interval_means(eps, t, edges), bucket_x0_mse=_interval_means(x0, t, edges),
        boundaries=[int(b) for b in boundaries], group_eps_mse=_interval_means(eps, t, boundaries),
        group_x0_mse=_interval_means(x0, t, boundaries),
        per_image_eps_mse=per_eps.tolist(), per_image_x0_mse=per_x0.tolist(), per_image_eps_mse_min_snr=per_w.tolist(),
    )


class PairedDifference(BaseModel):
    """``a − b`` of one held-out metric over the same images, with a normal 95 % interval."""

    model_config = ConfigDict(frozen=True)

    metric: str
    a: str
    b: str
    difference: float
    se: float
    ci_low: float
    ci_high: float
    n: int


def paired_difference(a: HeldoutScore, b: HeldoutScore, *, metric: str = "eps_mse") -> PairedDifference:
    """Mean per-image difference ``a − b`` of ``metric`` (``eps_mse``, ``x0_mse`` or
    ``eps_mse_min_snr``) and its SE over images; both scores must come from the same triples."""
    if (a.num_images, a.per_image, a.seed) != (b.num_images, b.per_image, b.seed):
        raise ValueError(f"{a.name} and {b.name} were scored on different held-out triples")
    return difference_over_images(getattr(a, f"per_image_{metric}"), getattr(b, f"per_image_{metric}"),
                                  metric=metric, a=a.name, b=b.name)


def difference_over_images(a_values: Sequence[float], b_values: Sequence[float], *, metric: str, a: str,
                           b: str) -> PairedDifference:
    """``a − b`` of per-image values of two models on the same images: the mean difference, its SE
    over images and a normal 95 % interval."""
    if len(a_values) != len(b_values):
        raise ValueError(f"{a} and {b} were scored on different images ({len(a_values)} vs {len(b_values)})")
    d = np.asarray(a_values, dtype=np.float64) - np.asarray(b_values, dtype=np.float64)
    mean, se = float(d.mean()), _se(d)
    return PairedDifference(metric=metric, a=a, b=b, difference=mean, se=se,
                            ci_low=mean - 1.96 * se, ci_high=mean + 1.96 * se, n=len(d))
