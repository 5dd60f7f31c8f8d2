"""Pruning sensitivity per timestep bucket: how much the probe's held-out error rises per FLOP
removed (docs/METHOD.md step 3, ``budget.difficulty=sensitivity``).

The paper ranks groups by difficulty and gives the hardest the largest budget; which measure of
"hard" buys quality is an empirical question (raw ε-loss ranks the high-noise steps easiest, SNR
the reverse). Sensitivity asks it directly: prune the probe model *uniformly* (every unit to the
same keep ratio, by weight magnitude, no recovery) and measure, on the profile's own held-out
samples and noise (:func:`tdc_core.method.profiling.bucket_losses`, same seed, so the difference
is paired), how much each bucket's ε-MSE rises. A group whose error rises most when capacity is
removed is the one that needs its capacity.

The rise is reported per unit of F removed and weighted like the Min-SNR-γ held-out metric,
``w = min(SNR, γ)/SNR`` (= the rise in min(SNR, γ)·x0-MSE), so the irreducible ε-error of the
lowest-noise steps does not dominate the ranking (:func:`bucket_sensitivity`).
"""

from __future__ import annotations

import numpy as np
import torch

from tdc_core.config import ProfileConfig
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.method.profiling import bucket_edges, bucket_losses
from tdc_core.method.pruning.space import prune_space
from tdc_core.method.pruning.surgery import prune_unet
from tdc_core.model.unet import UNet

__all__ = ["SENSITIVITY_GAMMA", "bucket_sensitivity", "uniformly_pruned_losses"]

SENSITIVITY_GAMMA = 5.0  # γ of the weighting, as the held-out evaluator's Min-SNR metric


@torch.no_grad()
def uniformly_pruned_losses(
    *, model: UNet, diffusion: Diffusion, heldout_images: torch.Tensor, config: ProfileConfig, keep: float,
    device: torch.device,
) -> tuple[list[float], float]:
    """Per-bucket mean ε-MSE of ``model`` pruned to ``keep`` of every unit's width (magnitude
    importance, rounded to whole GroupNorm groups / heads), and that model's FLOPs fraction.

    The samples, timesteps and noise are those of the profile's ``loss_mean`` (same
    ``config.seed``, ``num_buckets`` and ``loss_samples_per_bucket``), so bucket by bucket the
    two numbers differ only by the pruning.

    Returns:
        (``[B]`` mean ε-MSE, FLOPs of the pruned model / FLOPs of ``model``).

    Raises:
        ValueError: ``keep`` not in (0, 1), or a keep so close to 1 that nothing is pruned.
    """
    if not 0.0 < keep < 1.0:
        raise ValueError(f"keep={keep!r} must lie in (0, 1)")
    res, attn = model.unit_widths()
    pruned = prune_unet(model, res_keep=[keep] * len(res), attn_keep=[keep] * len(attn)).eval()
    space = prune_space(model.spec, min_keep=1e-9)
    fraction = space.flops([*pruned.unit_widths()[0], *pruned.unit_widths()[1]]) / space.flops(
        [*res, *attn])
    if not fraction < 1.0:
        raise ValueError(f"keep={keep} prunes no channel of this model (widths round back up)")
    edges = bucket_edges(num_timesteps=diffusion.num_steps, num_buckets=config.num_buckets)
    with torch.autocast(device.type, enabled=False):
        losses = bucket_losses(model=pruned, diffusion=diffusion, heldout=heldout_images.cpu(), edges=edges,
                               samples_per_bucket=config.loss_samples_per_bucket, seed=config.seed, device=device)
    return losses.mean(dim=1).tolist(), float(fraction)


def bucket_sensitivity(
    *, loss_mean: np.ndarray, pruned_loss_mean: np.ndarray, pruned_flops_fraction: float, snr_db: np.ndarray,
    gamma: float = SENSITIVITY_GAMMA,
) -> np.ndarray:
    """``[B]`` float64: Min-SNR-weighted rise of the ε-MSE per unit of F removed,
    ``min(SNR, γ)/SNR · (pruned − dense) / (1 − fraction)``; higher = more sensitive."""
    snr = 10.0 ** (np.asarray(snr_db, dtype=np.float64) / 10.0)
    weight = np.minimum(snr, gamma) / snr
    rise = np.asarray(pruned_loss_mean, dtype=np.float64) - np.asarray(loss_mean, dtype=np.float64)
    return weight * rise / (1.0 - float(pruned_flops_fraction))
