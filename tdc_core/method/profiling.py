"""Difficulty profiling (docs/METHOD.md step 1): how hard, and how alike, denoising is across [0, T).

:func:`profile_difficulty` probes a model (the start of shared training) on held-out images.
It splits ``[0, T)`` into B equal buckets and records per bucket:

* the SNR in dB at the bucket's centre timestep,
* the mean and spread of the per-sample ε-MSE (held-out images, t uniform in the bucket),
* task affinity between buckets: the cosine similarity of the gradients of the bucket's mean
  ε-loss with respect to a parameter subset, averaged over a few batches (Go et al.,
  "Addressing Negative Transfer in Diffusion Models", NeurIPS 2023).

The result is a JSON-friendly :class:`DifficultyProfile`; :meth:`DifficultyProfile.arrays`
feeds :func:`tdc_core.method.grouping.group_timesteps`.

Decisions:

* **Same x0 and ε for every bucket of an affinity batch.** Within one batch only t differs
  between the B gradients, so the cosine measures how the *timestep* changes the task, not
  which images happened to be drawn (common random numbers: much lower variance).
* **Exact cosines, bounded memory.** Every pairwise dot product needs the B gradient vectors
  together. They are stored as a float32 ``[K x P]`` matrix on the model's device, with K = B
  when ``B·P·4`` bytes fit into ``max_gradient_bytes`` (digits model, B = 50: about 216 MB)
  and the Gram matrix is one product. Otherwise buckets are processed in blocks of K: each
  block is stored, and the later buckets' gradients are recomputed one at a time and dotted
  with it (deterministic, since x0, ε and t are fixed per batch). That costs
  ``B·(⌈B/K⌉ − 1)/2`` extra backward passes per batch but stays exact; no random projection.
* **A zero gradient** (e.g. the subset sits behind a zero-initialised output layer of an
  untrained model) has cosine 0 with every other bucket and 1 with itself.
* The model runs in eval mode (no dropout) and fp32 for both measurements. Gradients are taken
  with :func:`torch.autograd.grad`, so ``.grad`` is never touched; modes and ``requires_grad``
  flags are restored afterwards, also on error.
* Randomness: the loss draws from ``torch.Generator().manual_seed(seed)`` and the affinity
  from ``manual_seed(seed + 1)``, both on the CPU, so the profile is identical on every device
  and changing one measurement's settings leaves the other's draws unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn

from tdc_core.atomic import atomic_write_bytes
from tdc_core.config import ProfileConfig
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.errors import ConfigError, DataError, TrainingError
from tdc_core.records import load_record
from tdc_core.reporter import NullReporter, Reporter
from tdc_core.training.data import to_model_range

__all__ = [
    "DEFAULT_MAX_GRADIENT_BYTES",
    "LOSS_BATCH_SIZE",
    "DifficultyProfile",
    "ProfileArrays",
    "bucket_centres",
    "bucket_edges",
    "bucket_losses",
    "profile_difficulty",
    "subset_parameters",
]

LOSS_BATCH_SIZE = 256                  # samples per forward pass of the loss measurement
DEFAULT_MAX_GRADIENT_BYTES = 1 << 30   # 1 GiB of stored float32 gradient vectors per batch
_PARAM_SUBSETS = ("all", "output", "middle")


# --- buckets -------------------------------------------------------------------------------


def bucket_edges(*, num_timesteps: int, num_buckets: int) -> np.ndarray:
    """``[B+1]`` int64 edges ``0 = e_0 < ... < e_B = T``, equal widths up to rounding.

    Bucket b covers timesteps ``[e_b, e_{b+1})``.

    Raises:
        ConfigError: ``num_buckets`` not in ``1..T``.
    """
    if not 1 <= num_buckets <= num_timesteps:
        raise ConfigError(
            f"profile.num_buckets={num_buckets} must lie in 1..{num_timesteps} (the number of "
            f"timesteps T)"
        )
    edges = np.round(np.linspace(0, num_timesteps, num_buckets + 1)).astype(np.int64)
    if np.any(np.diff(edges) <= 0):  # pragma: no cover - linspace steps are >= 1
        raise AssertionError(f"bucket edges are not strictly increasing: {edges.tolist()}")
    return edges


def bucket_centres(edges: np.ndarray) -> np.ndarray:
    """``[B]`` int64 centre timestep ``(e_b + e_{b+1} - 1) // 2`` of each bucket (strictly
    increasing, each inside its bucket)."""
    edges = np.asarray(edges, dtype=np.int64)
    return (edges[:-1] + edges[1:] - 1) // 2


# --- the record ----------------------------------------------------------------------------


class ProfileArrays(NamedTuple):
    """A profile as numpy arrays, named as :func:`tdc_core.method.grouping.group_timesteps` wants."""

    bucket_edges: np.ndarray  # [B+1] int64 timesteps
    snr_db: np.ndarray        # [B] float64, dB at bucket centres
    loss_mean: np.ndarray     # [B] float64, mean per-sample ε-MSE
    loss_std: np.ndarray      # [B] float64, its standard deviation over samples
    affinity: np.ndarray      # [B, B] float64, gradient cosine similarity
    pruned_loss_mean: np.ndarray | None = None  # [B] float64, the same loss of the probe pruned uniformly
    pruned_flops_fraction: float | None = None  # that pruned probe's FLOPs / the dense probe's


class DifficultyProfile(BaseModel):
    """Per-bucket difficulty of a probe model over ``[0, T)`` (docs/METHOD.md step 1; JSON-friendly).

    Bucket b covers timesteps ``[bucket_edges[b], bucket_edges[b+1])``. Losses are the per-sample
    ε-MSE (mean over pixels and channels of ``(ε − ε̂)²``, dimensionless, data in [-1, 1]).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_timesteps: int            # T
    bucket_edges: list[int]       # [B+1] timesteps, 0 = e_0 < ... < e_B = T
    snr_db: list[float]           # [B] SNR in dB at each bucket's centre timestep
    loss_mean: list[float]        # [B] mean held-out ε-MSE
    loss_std: list[float]         # [B] standard deviation of the per-sample ε-MSE (ddof = 0)
    affinity: list[list[float]]   # [B, B] gradient cosine similarity, symmetric, diagonal 1
    model_step: int               # training step of the probed model
    param_subset: str             # parameters whose gradients entered the affinity
    num_params: int               # how many scalar parameters that is (P)
    seconds: float                # wall time of the profiling
    # Pruning sensitivity (tdc_core.method.sensitivity): the same per-bucket loss, on the same
    # samples and noise, of the probe pruned uniformly to profile.sensitivity_keep. None in
    # profiles made without it (budget.difficulty=sensitivity then refuses them).
    pruned_loss_mean: list[float] | None = None   # [B]
    pruned_flops_fraction: float | None = None    # FLOPs of that pruned probe / of the dense one, in (0, 1)

    @model_validator(mode="after")
    def _consistent(self) -> DifficultyProfile:
        edges, b = self.bucket_edges, len(self.bucket_edges) - 1
        if b < 1 or edges[0] != 0 or edges[-1] != self.num_timesteps or any(
            lo >= hi for lo, hi in zip(edges, edges[1:])
        ):
            raise ValueError(
                f"bucket_edges must rise strictly from 0 to num_timesteps={self.num_timesteps}"
            )
        for name in ("snr_db", "loss_mean", "loss_std", "pruned_loss_mean"):
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) != b or not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name} must hold {b} finite values (one per bucket)")
        if len(self.affinity) != b or any(len(row) != b for row in self.affinity) or not all(
            math.isfinite(v) and -1.0 <= v <= 1.0 for row in self.affinity for v in row
        ):
            raise ValueError(f"affinity must be a {b}x{b} matrix of values in [-1, 1]")
        if self.param_subset not in _PARAM_SUBSETS:
            raise ValueError(f"param_subset={self.param_subset!r}; allowed: {', '.join(_PARAM_SUBSETS)}")
        if (self.pruned_loss_mean is None) != (self.pruned_flops_fraction is None) or not (
            self.pruned_flops_fraction is None or 0.0 < self.pruned_flops_fraction < 1.0
        ):
            raise ValueError("pruned_loss_mean and pruned_flops_fraction come together; the fraction lies in (0, 1)")
        if self.num_params < 1 or self.model_step < 0:
            raise ValueError("num_params must be >= 1 and model_step >= 0")
        return self

    @property
    def num_buckets(self) -> int:
        """B."""
        return len(self.bucket_edges) - 1

    def arrays(self) -> ProfileArrays:
        """The profile as numpy arrays (a named tuple; unpacks in field order)."""
        return ProfileArrays(
            bucket_edges=np.asarray(self.bucket_edges, dtype=np.int64),
            snr_db=np.asarray(self.snr_db, dtype=np.float64),
            loss_mean=np.asarray(self.loss_mean, dtype=np.float64),
            loss_std=np.asarray(self.loss_std, dtype=np.float64),
            affinity=np.asarray(self.affinity, dtype=np.float64),
            pruned_loss_mean=None if self.pruned_loss_mean is None else np.asarray(self.pruned_loss_mean,
                                                                                 dtype=np.float64),
            pruned_flops_fraction=self.pruned_flops_fraction,
        )

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON, atomically; returns the path."""
        atomic_write_bytes(path, self.model_dump_json(indent=1).encode())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> DifficultyProfile:
        """Read a profile written by :meth:`save`.

        Raises:
            DataError: the file is missing, unreadable, not JSON, or not a valid profile; the
                message names the file.
        """
        return load_record(path, cls, what="difficulty profile")


# --- parameters ----------------------------------------------------------------------------


def subset_parameters(model: nn.Module, subset: str) -> list[nn.Parameter]:
    """The parameters whose gradients define task affinity, in module order, each once.

    ``all``: every parameter; ``output``: ``out_norm``, ``out_conv`` and the last of
    ``output_blocks`` (the layers nearest the prediction); ``middle``: ``middle_block`` (the
    bottleneck).

    Raises:
        ConfigError: unknown subset, or a model without the named parts.
    """
    if subset not in _PARAM_SUBSETS:
        raise ConfigError(f"profile.param_subset={subset!r}; allowed: {', '.join(_PARAM_SUBSETS)}")
    try:
        if subset == "all":
            modules = [model]
        elif subset == "output":
            modules = [model.out_norm, model.out_conv, model.output_blocks[-1]]
        else:
            modules = [model.middle_block]
    except (AttributeError, IndexError, TypeError):
        raise ConfigError(
            f"profile.param_subset={subset!r} needs a UNet with out_norm, out_conv, output_blocks "
            f"and middle_block; {type(model).__name__} lacks them (use param_subset=all)"
        ) from None
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        raise ConfigError(f"profile.param_subset={subset!r} selects no parameters of this model")
    return params


class _ProbeState:
    """Eval mode and ``requires_grad`` only on the chosen parameters; restores both on exit."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter]) -> None:
        self.model, self.params = model, params

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        chosen = {id(p) for p in self.params}
        self.model.eval()
        for p, _ in self.flags:
            # Frozen parameters outside the subset also spare their weight-gradient work.
            p.requires_grad_(id(p) in chosen)

    def __exit__(self, *exc: object) -> None:
        for m, training in self.modes:
            m.training = training
        for p, flag in self.flags:
            p.requires_grad_(flag)


# --- measurements --------------------------------------------------------------------------


def _heldout_batch(heldout: torch.Tensor, start: int, size: int, device: torch.device) -> torch.Tensor:
    """``size`` held-out images from index ``start`` on, cycling; float ``[size x C x H x W]``."""
    idx = (start + torch.arange(size)) % heldout.shape[0]
    return to_model_range(heldout[idx]).to(device)


@torch.no_grad()
def bucket_losses(
    *, model: nn.Module, diffusion: Diffusion, heldout: torch.Tensor, edges: np.ndarray,
    samples_per_bucket: int, seed: int, device: torch.device,
) -> torch.Tensor:
    """Per-sample ε-MSE, float64 ``[B x n]``.

    Samples are listed bucket-major; sample i uses held-out image ``i mod N``, so successive
    buckets continue through the held-out set rather than reusing its first n images.
    """
    num_buckets, n = len(edges) - 1, samples_per_bucket
    gen = torch.Generator().manual_seed(seed)
    t_all = torch.cat([
        torch.randint(int(lo), int(hi), (n,), generator=gen) for lo, hi in zip(edges[:-1], edges[1:])
    ])  # [B·n], bucket-major
    out = torch.empty(num_buckets * n, dtype=torch.float64)
    for start in range(0, num_buckets * n, LOSS_BATCH_SIZE):
        stop = min(start + LOSS_BATCH_SIZE, num_buckets * n)
        x0 = _heldout_batch(heldout, start, stop - start, device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        loss = diffusion.eps_loss(model, x0, t_all[start:stop].to(device), noise)
        out[start:stop] = loss.double().cpu()
    return out.reshape(num_buckets, n)


def _gram(
    grad_into: Callable[[int, torch.Tensor], None], *, count: int, dim: int, block: int,
    device: torch.device,
) -> torch.Tensor:
    """Exact Gram matrix ``[count x count]`` (float64, CPU) of vectors produced on demand.

    ``grad_into(b, out)`` writes vector b into ``out`` (float32 ``[dim]``). At most ``block + 1``
    vectors are held at once; vectors beyond the current block are recomputed per block.
    """
    gram = torch.zeros(count, count, dtype=torch.float64)
    stored = torch.empty(min(block, count), dim, dtype=torch.float32, device=device)
    spare = torch.empty(dim, dtype=torch.float32, device=device) if block < count else None
    for lo in range(0, count, block):
        hi = min(lo + block, count)
        rows = stored[: hi - lo]
        for b in range(lo, hi):
            grad_into(b, rows[b - lo])
        gram[lo:hi, lo:hi] = (rows @ rows.T).double().cpu()
        for j in range(hi, count):  # only when the B vectors do not fit at once
            grad_into(j, spare)
            dots = (rows @ spare).double().cpu()
            gram[lo:hi, j] = dots
            gram[j, lo:hi] = dots
    return gram


def _cosine(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[B x B]`` from a Gram matrix; zero vectors: 0 off the diagonal."""
    norms = gram.diagonal().clamp(min=0.0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    cos = ((cos + cos.T) / 2).clamp(-1.0, 1.0)
    cos.fill_diagonal_(1.0)
    return cos


def _write_gradient(
    *, model: nn.Module, diffusion: Diffusion, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
    params: list[nn.Parameter], out: torch.Tensor,
) -> None:
    """Write ∇ of the batch-mean ε-MSE w.r.t. ``params``, flattened in order, into ``out [P]``."""
    with torch.enable_grad():
        loss = diffusion.eps_loss(model, x0, t, noise).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    offset = 0
    for p, g in zip(params, grads):
        view = out[offset: offset + p.numel()]
        if g is None:  # a chosen parameter the loss does not reach
            view.zero_()
        else:
            view.copy_(g.reshape(-1))
        offset += p.numel()


def _affinity(
    *, model: nn.Module, diffusion: Diffusion, heldout: torch.Tensor, edges: np.ndarray,
    params: list[nn.Parameter], config: ProfileConfig, device: torch.device,
    max_gradient_bytes: int, reporter: Reporter,
) -> torch.Tensor:
    """Gradient cosine similarity between buckets, float64 ``[B x B]``, averaged over batches."""
    num_buckets, size = len(edges) - 1, config.affinity_batch_size
    dim = sum(p.numel() for p in params)
    block = num_buckets if num_buckets * dim * 4 <= max_gradient_bytes else max(
        1, max_gradient_bytes // (dim * 4) - 1
    )
    if block < num_buckets:
        reporter.message(
            f"profiling: {num_buckets} gradients of {dim} parameters exceed {max_gradient_bytes} "
            f"bytes; computing the Gram matrix in blocks of {block} (extra backward passes)"
        )
    gen = torch.Generator().manual_seed(config.seed + 1)
    total = torch.zeros(num_buckets, num_buckets, dtype=torch.float64)
    for k in range(config.affinity_batches):
        x0 = _heldout_batch(heldout, k * size, size, device)  # batch k: images k·size, k·size+1, ...
        noise = torch.randn(x0.shape, generator=gen).to(device)  # shared by all buckets
        t = torch.stack([
            torch.randint(int(lo), int(hi), (size,), generator=gen) for lo, hi in zip(edges[:-1], edges[1:])
        ]).to(device)  # [B x size]
        seen: set[int] = set()

        def grad_into(b: int, out: torch.Tensor, x0=x0, t=t, noise=noise, seen=seen, k=k) -> None:
            _write_gradient(model=model, diffusion=diffusion, x0=x0, t=t[b], noise=noise, params=params, out=out)
            if b not in seen:  # blockwise recomputations are not progress
                seen.add(b)
                reporter.progress(step=k * num_buckets + len(seen), total=config.affinity_batches * num_buckets)

        total += _cosine(_gram(grad_into, count=num_buckets, dim=dim, block=block, device=device))
    return total / config.affinity_batches


def profile_difficulty(
    *,
    model: nn.Module,
    diffusion: Diffusion,
    heldout_images: torch.Tensor,
    config: ProfileConfig,
    device: torch.device,
    model_step: int = 0,
    reporter: Reporter | None = None,
    max_gradient_bytes: int = DEFAULT_MAX_GRADIENT_BYTES,
) -> DifficultyProfile:
    """Measure the difficulty profile of ``model`` over the timesteps of ``diffusion``.

    Args:
        model: ε-predicting network ``model(x_t [N x C x H x W], t [N]) -> [N x C(·2) x H x W]``,
            already on ``device``. Its modes and ``requires_grad`` flags are restored on return;
            ``.grad`` is never touched.
        diffusion: the process; T = ``diffusion.num_steps`` and buckets are its steps.
        heldout_images: uint8 ``[N x C x H x W]`` held-out images (N >= 1), cycled through.
        config: B = ``num_buckets`` (<= T), ``loss_samples_per_bucket`` samples per bucket for the
            loss, ``affinity_batches`` batches of ``affinity_batch_size`` for the gradients,
            ``param_subset`` and ``seed``.
        device: where inputs are placed.
        model_step: training step of the probe, recorded in the profile.
        reporter: receives one message per phase and ``progress`` over the
            ``affinity_batches x B`` bucket gradients.
        max_gradient_bytes: memory for stored float32 gradient vectors per batch; exceeding it
            switches to the exact blockwise Gram computation (more backward passes).

    Returns:
        The profile. Identical inputs give an identical profile (all fields but ``seconds``).

    Raises:
        ConfigError: B > T or a parameter subset the model lacks.
        DataError: no held-out images, or images that are not uint8 ``[N x C x H x W]``.
        TrainingError: the model's loss is not finite (a diverged probe).
        ValueError: ``max_gradient_bytes < 1`` or ``model_step < 0``.
    """
    t0 = time.perf_counter()
    reporter = reporter or NullReporter()
    if heldout_images.dtype != torch.uint8 or heldout_images.ndim != 4 or heldout_images.shape[0] < 1:
        raise DataError(
            f"profiling needs held-out uint8 images [N x C x H x W] with N >= 1, got "
            f"{heldout_images.dtype} {tuple(heldout_images.shape)}"
        )
    if max_gradient_bytes < 1:
        raise ValueError(f"max_gradient_bytes={max_gradient_bytes} must be >= 1")
    if model_step < 0:
        raise ValueError(f"model_step={model_step} must be >= 0")
    num_timesteps = diffusion.num_steps
    edges = bucket_edges(num_timesteps=num_timesteps, num_buckets=config.num_buckets)
    params = subset_parameters(model, config.param_subset)
    heldout = heldout_images.cpu()

    # fp32 even inside a caller's autocast region: the measurement, not speed, matters here.
    with _ProbeState(model, params), torch.autocast(device.type, enabled=False):
        reporter.message(
            f"profiling: held-out ε-loss in {config.num_buckets} buckets x "
            f"{config.loss_samples_per_bucket} samples"
        )
        losses = bucket_losses(
            model=model, diffusion=diffusion, heldout=heldout, edges=edges,
            samples_per_bucket=config.loss_samples_per_bucket, seed=config.seed, device=device,
        )
        bad = (~torch.isfinite(losses)).any(dim=1).nonzero().flatten().tolist()
        if bad:
            raise TrainingError(
                f"held-out ε-loss is not finite in buckets {bad[:5]} (timesteps from {int(edges[bad[0]])}); "
                f"the probe model at step {model_step} has diverged"
            )
        reporter.message(
            f"profiling: gradient affinity over {config.affinity_batches} batches of "
            f"{config.affinity_batch_size}, {sum(p.numel() for p in params)} parameters "
            f"({config.param_subset})"
        )
        affinity = _affinity(
            model=model, diffusion=diffusion, heldout=heldout, edges=edges, params=params,
            config=config, device=device, max_gradient_bytes=max_gradient_bytes, reporter=reporter,
        )
    if not torch.isfinite(affinity).all():
        raise TrainingError(f"gradient affinity is not finite; the probe model at step {model_step} has diverged")

    return DifficultyProfile(
        num_timesteps=num_timesteps,
        bucket_edges=edges.tolist(),
        snr_db=[float(v) for v in diffusion.snr_db(bucket_centres(edges))],
        loss_mean=losses.mean(dim=1).tolist(),
        loss_std=losses.std(dim=1, correction=0).tolist(),
        affinity=affinity.tolist(),
        model_step=model_step,
        param_subset=config.param_subset,
        num_params=sum(p.numel() for p in params),
        seconds=time.perf_counter() - t0,
    )
