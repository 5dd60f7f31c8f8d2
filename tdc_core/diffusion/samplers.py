"""Samplers: DDPM ancestral and DDIM, over a (possibly respaced) :class:`Diffusion`.

Pure functions: the model is any callable ``model(x, t) -> out`` with ``x: [N x C x H x W]``
and original timestep indices ``t: int64 [N]`` (a UNet or the expert-routing denoiser alike);
all randomness comes from the ``generator`` passed in, so a fixed generator gives fixed samples.
``callback(step_index, t, x)`` is called after every step (progress bars, visualisation).
:func:`generate` is the one batched loop over :func:`sample` that every caller uses (``tdc
sample``, evaluation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tdc_core.diffusion.gaussian import Diffusion, gather
from tdc_core.training.data import to_uint8

__all__ = ["Denoiser", "generate", "sample", "sampling_timesteps"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]


def sampling_timesteps(diffusion: Diffusion) -> list[int]:
    """Original timestep indices the sampler visits, in visiting order (T−1 … 0)."""
    return diffusion.timestep_map.flip(0).tolist()


def _randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    # Draw on the generator's device, then move: results do not depend on the model's device.
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


@torch.no_grad()
def sample(
    model: Denoiser,
    diffusion: Diffusion,
    *,
    shape: tuple[int, ...],
    generator: torch.Generator,
    sampler: str = "ddim",
    eta: float = 0.0,
    device: torch.device | str = "cpu",
    clip_denoised: bool = True,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Draw samples ``[N x C x H x W]`` in [-1, 1] by running the reverse process.

    Args:
        sampler: ``ddpm`` (ancestral, learned or fixed-large variance) or ``ddim``.
        eta: DDIM noise scale (0 = deterministic DDIM, 1 ≈ DDPM); ignored by ``ddpm``.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r}; allowed: ddpm, ddim")
    device = torch.device(device)
    channels = shape[1]
    x = _randn(shape, generator, device)
    for i, step in enumerate(reversed(range(diffusion.num_steps))):
        t = torch.full((shape[0],), step, dtype=torch.long, device=device)
        out = model(x, diffusion.model_timesteps(t)).float()
        eps, v = diffusion.split_output(out, channels)
        x0 = diffusion.predict_x0(x, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
            # Re-derive ε from the clipped x0 so DDIM stays consistent with it.
            eps = (x - gather(diffusion.sqrt_ab, t, x.ndim) * x0) / gather(diffusion.sqrt_one_minus_ab, t, x.ndim)
        if sampler == "ddpm":
            mean = diffusion.q_posterior_mean(x0, x, t)
            log_var = diffusion.model_log_variance(t, v, x.ndim)
            noise = _randn(shape, generator, device) if step > 0 else torch.zeros_like(x)
            x = mean + torch.exp(0.5 * log_var) * noise
        else:
            ab = gather(diffusion.alphas_cumprod, t, x.ndim)
            ab_prev = gather(diffusion.sqrt_ab_prev, t, x.ndim) ** 2
            sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
            x = torch.sqrt(ab_prev) * x0 + torch.sqrt((1 - ab_prev - sigma**2).clamp(min=0)) * eps
            if eta > 0 and step > 0:
                x = x + sigma * _randn(shape, generator, device)
        if callback is not None:
            callback(i, int(diffusion.timestep_map[step]), x)
    return x.clamp(-1, 1)


def generate(
    model: Denoiser,
    diffusion: Diffusion,
    *,
    num: int,
    seed: int,
    batch_size: int,
    image_shape: tuple[int, int, int],
    sampler: str = "ddim",
    eta: float = 0.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``num`` samples as uint8 ``[num x C x H x W]`` on the CPU.

    Batches of ``batch_size`` draw in turn from one CPU generator seeded with ``seed``, so the
    noise depends only on (seed, num, batch_size, sampler, eta) — not on the device — and two
    models sampled with the same arguments start from the same noise (common random numbers:
    their score difference is not blurred by different draws). On one device the images are
    reproducible; across devices they agree up to floating-point rounding.

    Args:
        diffusion: the (respaced) diffusion the sampler walks; its steps are the sampling steps.
        image_shape: ``(C, H, W)``.
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"num={num} and batch_size={batch_size} must be >= 1")
    device = torch.device(device)
    was_training = model.training if isinstance(model, nn.Module) else None
    if isinstance(model, nn.Module):
        model.eval()
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    try:
        for start in range(0, num, batch_size):
            n = min(batch_size, num - start)
            x = sample(model, diffusion, shape=(n, *image_shape), generator=gen, sampler=sampler, eta=eta,
                       device=device)
            chunks.append(to_uint8(x.cpu()))
    finally:
        if isinstance(model, nn.Module) and was_training:
            model.train()
    return torch.cat(chunks)
