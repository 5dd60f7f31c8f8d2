"""Gaussian diffusion math (IDDPM, Nichol & Dhariwal 2021): schedules, q(x_t | x_0), losses.

No I/O and no logging. Tensors: images are ``[N x C x H x W]`` in [-1, 1]; timesteps are int64
``[N]`` in ``[0, T)``. A :class:`Diffusion` may be *respaced* (a subsequence of the original
timesteps); the model is always called with the original timestep indices (``timestep_map``),
so one network serves every respacing.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tdc_core.config import DiffusionConfig

__all__ = [
    "Diffusion",
    "betas_for_schedule",
    "cosine_alpha_bar",
    "gather",
    "space_timesteps",
]


def cosine_alpha_bar(t: np.ndarray, *, s: float = 0.008) -> np.ndarray:
    """IDDPM's ᾱ(t) = cos²(((t + s)/(1 + s))·π/2) for t ∈ [0, 1] (unnormalised; ᾱ(0) ≈ 1)."""
    return np.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def betas_for_schedule(schedule: str, num_timesteps: int) -> np.ndarray:
    """β_t, float64 ``[T]``, for IDDPM's ``linear`` (scaled to T) or ``cosine`` schedule."""
    if schedule == "linear":
        # Ho et al.'s 1e-4..0.02 for T = 1000, rescaled so other T give the same curve.
        scale = 1000 / num_timesteps
        # Clipped at 0.999 like the cosine schedule: at T ≤ 20 the last β would reach 1 (ᾱ = 0).
        return np.minimum(np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64), 0.999)
    if schedule == "cosine":
        t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        ab = cosine_alpha_bar(t)
        # β_t = 1 − ᾱ(t+1)/ᾱ(t), clipped at 0.999 to avoid a singularity at t = T.
        return np.minimum(1 - ab[1:] / ab[:-1], 0.999)
    raise ValueError(f"unknown schedule {schedule!r}; allowed: linear, cosine")


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps spread evenly over [0, T), always including 0 and T − 1 (IDDPM)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps={steps} must be in [1, {num_timesteps}]")
    if steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)})


def gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] reshaped to broadcast against a ``[N x ...]`` tensor of ``ndim`` dims."""
    out = values.to(t.device)[t]
    return out.reshape(-1, *([1] * (ndim - 1)))


class Diffusion:
    """A Gaussian diffusion process over ``num_steps`` steps.

    Args:
        betas: float64 ``[S]`` noise schedule of this (possibly respaced) process.
        timestep_map: int ``[S]``: original timestep index of each step (identity if not
            respaced). Models are called with ``timestep_map[i]``.
        base_alphas_cumprod: ᾱ of the original T-step process, for :meth:`snr_db`.
    """

    def __init__(
        self,
        *,
        betas: np.ndarray,
        timestep_map: np.ndarray | None = None,
        hybrid_vlb_weight: float = 0.001,
        learn_sigma: bool = False,
    ) -> None:
        if betas.ndim != 1 or len(betas) == 0 or not ((betas > 0) & (betas < 1)).all():
            # β = 1 would make ᾱ = 0 and every 1/ᾱ constant infinite.
            raise ValueError("betas must be a non-empty 1-D array in (0, 1)")
        # Constants are computed in float64 for precision and stored as float32 tensors.
        self.num_steps = len(betas)
        self.learn_sigma = learn_sigma
        self.hybrid_vlb_weight = hybrid_vlb_weight
        tm = np.arange(self.num_steps) if timestep_map is None else np.asarray(timestep_map)
        self.timestep_map = torch.as_tensor(tm, dtype=torch.long)

        alphas = 1.0 - betas
        ab = np.cumprod(alphas)
        ab_prev = np.append(1.0, ab[:-1])
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        self.betas_np = betas
        self.alphas_cumprod_np = ab
        self.betas = f32(betas)
        self.alphas_cumprod = f32(ab)
        self.sqrt_ab = f32(np.sqrt(ab))
        self.sqrt_one_minus_ab = f32(np.sqrt(1.0 - ab))
        self.sqrt_recip_ab = f32(np.sqrt(1.0 / ab))
        self.sqrt_recipm1_ab = f32(np.sqrt(1.0 / ab - 1.0))
        self.sqrt_ab_prev = f32(np.sqrt(ab_prev))
        self.posterior_variance = f32(post_var)
        # log(0) at t = 0: use the t = 1 value, as IDDPM does (β_0 for a one-step process).
        first = post_var[1] if len(post_var) > 1 else betas[0]
        self.posterior_log_var_clipped = f32(np.log(np.append(first, post_var[1:])))
        self.posterior_mean_coef1 = f32(betas * np.sqrt(ab_prev) / (1.0 - ab))
        self.posterior_mean_coef2 = f32((1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab))
        # "Fixed large" variance of DDPM ancestral sampling when Σ is not learned.
        self.fixed_large_log_var = f32(np.log(np.append(first, betas[1:])))
        self._min_snr_weights: dict[tuple[float, torch.device], torch.Tensor] = {}

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> Diffusion:
        return cls(
            betas=betas_for_schedule(config.schedule, config.num_timesteps),
            hybrid_vlb_weight=config.hybrid_vlb_weight,
            learn_sigma=config.loss == "hybrid",
        )

    def respaced(self, steps: int | None) -> Diffusion:
        """A process over ``steps`` evenly spaced original timesteps (None: self)."""
        if steps is None or steps == self.num_steps:
            return self
        keep = space_timesteps(self.num_steps, steps)
        ab = self.alphas_cumprod_np
        betas, last = [], 1.0
        for i in keep:
            betas.append(1.0 - ab[i] / last)
            last = ab[i]
        return Diffusion(
            betas=np.asarray(betas),
            timestep_map=self.timestep_map.numpy()[keep],
            hybrid_vlb_weight=self.hybrid_vlb_weight,
            learn_sigma=self.learn_sigma,
        )

    # --- the forward process ----------------------------------------------------------------

    def snr_db(self, t: torch.Tensor | np.ndarray | int) -> np.ndarray:
        """SNR in dB, 10·log10(ᾱ_t / (1 − ᾱ_t)), of step(s) ``t`` (float64, numpy)."""
        ab = self.alphas_cumprod_np[np.asarray(t)]
        return 10.0 * np.log10(ab / (1.0 - ab))

    def min_snr_weight(self, t: torch.Tensor, *, gamma: float) -> torch.Tensor:
        """Min-SNR-γ loss weight of the ε-MSE at steps ``t`` (int ``[N]``), float32 ``[N]``.

        Hang et al. (2023) weight the x0-MSE by min(SNR, γ). ε-MSE is x0-MSE / SNR, so for an
        ε-prediction model the same objective weights the ε-MSE by **min(SNR, γ)/SNR** (not
        min(SNR, γ), the known trap): 1 where SNR ≤ γ (high noise), γ/SNR below it.
        """
        key = (float(gamma), t.device)
        if key not in self._min_snr_weights:  # one table per γ and device, not one per step
            ab = self.alphas_cumprod_np
            snr = ab / (1.0 - ab)
            self._min_snr_weights[key] = torch.as_tensor(np.minimum(snr, gamma) / snr,
                                                         dtype=torch.float32).to(t.device)
        return self._min_snr_weights[key][t]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε for ``x0, noise: [N x C x H x W]``, ``t: [N]``."""
        return gather(self.sqrt_ab, t, x0.ndim) * x0 + gather(self.sqrt_one_minus_ab, t, x0.ndim) * noise

    def sample_timesteps(
        self, n: int, *, lo: int = 0, hi: int | None = None, generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """``n`` steps drawn uniformly from [lo, hi) (default the whole process), int64 ``[n]``."""
        hi = self.num_steps if hi is None else hi
        if not 0 <= lo < hi <= self.num_steps:
            raise ValueError(f"timestep interval [{lo}, {hi}) must lie within [0, {self.num_steps})")
        return torch.randint(lo, hi, (n,), generator=generator, device=device)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original timestep indices the network is conditioned on, for steps ``t``."""
        return self.timestep_map.to(t.device)[t]

    # --- the reverse process ----------------------------------------------------------------

    def split_output(self, out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Model output ``[N x C(·2) x H x W]`` → (ε̂, variance interpolation v or None)."""
        if self.learn_sigma:
            return out[:, :channels], out[:, channels:]
        return out, None

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return gather(self.sqrt_recip_ab, t, x_t.ndim) * x_t - gather(self.sqrt_recipm1_ab, t, x_t.ndim) * eps

    def q_posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c1 = gather(self.posterior_mean_coef1, t, x_t.ndim)
        c2 = gather(self.posterior_mean_coef2, t, x_t.ndim)
        return c1 * x0 + c2 * x_t

    def model_log_variance(self, t: torch.Tensor, v: torch.Tensor | None, ndim: int) -> torch.Tensor:
        """log Σ_θ: learned interpolation between β_t and β̃_t (IDDPM eq. 15) or fixed large."""
        if v is None:
            return gather(self.fixed_large_log_var, t, ndim)
        min_log = gather(self.posterior_log_var_clipped, t, ndim)
        max_log = gather(torch.log(self.betas), t, ndim)
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    # --- losses -----------------------------------------------------------------------------

    def training_losses(
        self, model_output: torch.Tensor, *, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
        noise: torch.Tensor, mse_weight: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses ``[N]`` (unreduced): ``mse`` = mean‖ε − ε̂‖², ``vb`` (hybrid only),
        and ``loss`` = w·mse (+ λ·T·vb for L_hybrid, as IDDPM's rescaled objective), with
        ``mse_weight`` w ``[N]`` (e.g. :meth:`min_snr_weight`; default 1). ``mse`` stays unweighted.

        The caller draws ``t`` and ``noise``, so the loss is deterministic and testable.
        """
        channels = x0.shape[1]
        eps, v = self.split_output(model_output.float(), channels)
        mse = (noise - eps).pow(2).mean(dim=tuple(range(1, x0.ndim)))
        out = {"mse": mse, "loss": mse if mse_weight is None else mse * mse_weight}
        if v is not None:
            # Stop the gradient of the mean through the VLB term: it trains Σ only (IDDPM).
            vb = self._vb_term(x0=x0, x_t=x_t, t=t, eps=eps.detach(), v=v)
            out["vb"] = vb
            out["loss"] = out["loss"] + self.hybrid_vlb_weight * self.num_steps * vb
        return out

    def _vb_term(
        self, *, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor,
    ) -> torch.Tensor:
        """L_t in bits/dim: KL(q(x_{t−1}|x_t,x0) ‖ p_θ) for t > 0, decoder NLL at t = 0."""
        nd = x0.ndim
        true_mean = self.q_posterior_mean(x0, x_t, t)
        true_log_var = gather(self.posterior_log_var_clipped, t, nd)
        pred_x0 = self.predict_x0(x_t, t, eps).clamp(-1, 1)
        model_mean = self.q_posterior_mean(pred_x0, x_t, t)
        model_log_var = self.model_log_variance(t, v, nd)
        kl = 0.5 * (-1.0 + model_log_var - true_log_var + torch.exp(true_log_var - model_log_var)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var))
        kl = kl.mean(dim=tuple(range(1, nd))) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, mean=model_mean, log_scale=0.5 * model_log_var)
        nll = nll.mean(dim=tuple(range(1, nd))) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def eps_loss(self, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-sample ε-MSE ``[N]`` of ``model(x_t, t)``; ``t`` are steps of this process."""
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, self.model_timesteps(t))
        eps, _ = self.split_output(out.float(), x0.shape[1])
        return (noise - eps).pow(2).mean(dim=tuple(range(1, x0.ndim)))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, mean: torch.Tensor, log_scale: torch.Tensor,
) -> torch.Tensor:
    """Log-likelihood of 8-bit images ``x`` in [-1, 1] under a Gaussian discretised to 256 bins."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )

