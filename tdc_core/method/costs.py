"""The costs every run reports (docs/METHOD.md, "Costs that must be reported"): pure arithmetic.

Units: all costs are FLOPs (one multiply-add = 2 FLOPs, as counted by
``torch.utils.flop_counter.FlopCounterMode`` in :func:`tdc_core.model.flops.count_forward_flops`).
Forward FLOPs are per image. A training step costs ``backward_factor`` × its forward FLOPs per
image × batch size; the common convention is backward ≈ 2 × forward, so forward + backward ≈
3 × forward. The factor is a parameter and is stored in the record, so reports state it. EMA,
optimizer and data costs are ignored on both sides of every comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict
from torch import nn

from tdc_core.method.routing import check_boundaries
from tdc_core.model.flops import count_forward_flops

__all__ = ["SamplingCost", "TrainingCost", "measure_group_flops", "sampling_cost", "training_cost"]


class SamplingCost(BaseModel):
    """FLOPs to draw one image: the routed experts vs a single model with F FLOPs per step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int                     # denoiser calls per image (the sampler's visited steps)
    steps_per_group: list[int]     # [N] of those steps served by each group's model
    group_flops: list[float]       # [N] forward FLOPs per image of each group's model
    base_flops: float              # F, forward FLOPs per image of the single model
    total_flops: float             # Σ over steps of the serving model's FLOPs, per image
    single_model_flops: float      # steps × F, per image
    ratio: float                   # total_flops / single_model_flops


class TrainingCost(BaseModel):
    """Training FLOPs of TDC (shared stage + per-group fine-tunes + pruning search) vs the
    single-model baseline. Every ``*_flops`` field is a total in FLOPs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backward_factor: float         # training step FLOPs / forward FLOPs (fwd + bwd ≈ 3 × fwd)
    base_flops: float              # F, forward FLOPs per image of the base model
    shared_steps: int              # stage-1 optimizer steps (incl. the probe)
    batch_size: int                # stage-1 batch size
    finetune_steps: list[int]      # [N] stage-2 optimizer steps per group
    group_flops: list[float]       # [N] forward FLOPs per image of each group's model
    finetune_batch_size: int       # stage-2 batch size
    baseline_steps: int            # single-model optimizer steps
    baseline_batch_size: int       # single-model batch size
    shared_flops: float            # shared_steps × F × batch_size × backward_factor
    finetune_flops_per_group: list[float]  # [N] finetune_steps_g × FLOPs_g × finetune_batch × factor
    finetune_flops: float          # Σ_g finetune_flops_per_group
    pruning_flops: float           # proxy pruning search (rounds, recovery tunes, scoring)
    tdc_flops: float               # shared + finetune + pruning
    baseline_flops: float          # baseline_steps × F × baseline_batch_size × backward_factor
    ratio: float                   # tdc_flops / baseline_flops (< 1: TDC is cheaper)


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{name}={value!r} must be a positive finite number")
    return float(value)


def _non_negative_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}={value!r} must be an int >= 0")
    return int(value)


def sampling_cost(
    *,
    visited_timesteps: Sequence[int],
    boundaries: Sequence[int],
    group_flops: Sequence[float],
    base_flops: float,
) -> SamplingCost:
    """Per-image sampling FLOPs when each step is served by its timestep's group model.

    Args:
        visited_timesteps: ``[S]`` original timesteps the sampler calls the denoiser at
            (e.g. :func:`tdc_core.diffusion.samplers.sampling_timesteps`); repeats count.
        boundaries: ``[N+1]`` timesteps ``0 = b_0 < ... < b_N = T``.
        group_flops: ``[N]`` forward FLOPs per image of group g's model.
        base_flops: F, forward FLOPs per image of the single model.

    Raises:
        ValueError: bad boundaries, ``len(group_flops) != N``, no steps, a step outside
            ``[0, T)``, or a FLOPs value that is not positive and finite.
    """
    bounds = check_boundaries(boundaries)
    num_groups = len(bounds) - 1
    flops = [_positive(f"group_flops[{g}]", f) for g, f in enumerate(group_flops)]
    if len(flops) != num_groups:
        raise ValueError(f"group_flops has {len(flops)} entries but boundaries={bounds} define {num_groups} groups")
    base = _positive("base_flops", base_flops)
    t = np.asarray(list(visited_timesteps))
    if t.size == 0:
        raise ValueError("visited_timesteps is empty")
    if t.ndim != 1 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"visited_timesteps must be a flat sequence of ints, got {t.dtype} {t.shape}")
    if t.min() < 0 or t.max() >= bounds[-1]:
        raise ValueError(f"visited_timesteps must lie in [0, {bounds[-1]}), got range [{t.min()}, {t.max()}]")
    groups = np.searchsorted(np.asarray(bounds), t, side="right") - 1
    per_group = np.bincount(groups, minlength=num_groups).tolist()
    total = math.fsum(n * f for n, f in zip(per_group, flops))
    single = t.size * base
    return SamplingCost(
        steps=int(t.size), steps_per_group=per_group, group_flops=flops, base_flops=base,
        total_flops=total, single_model_flops=single, ratio=total / single,
    )


def training_cost(
    *,
    shared_steps: int,
    base_flops: float,
    batch_size: int,
    finetune_steps: Sequence[int],
    group_flops: Sequence[float],
    finetune_batch_size: int,
    pruning_flops: float = 0.0,
    baseline_steps: int,
    baseline_batch_size: int,
    backward_factor: float = 3.0,
) -> TrainingCost:
    """Training FLOPs of TDC vs the single-model baseline (docs/METHOD.md's cost formula).

    ``TDC = shared_steps·F·batch·c + Σ_g finetune_steps_g·FLOPs_g·finetune_batch·c + pruning``,
    ``baseline = baseline_steps·F·baseline_batch·c``, with c = ``backward_factor``.

    Args:
        shared_steps: stage-1 optimizer steps (the probe is its start, so counted once).
        base_flops: F, forward FLOPs per image of the base model.
        batch_size: stage-1 batch size.
        finetune_steps: ``[N]`` stage-2 optimizer steps per group.
        group_flops: ``[N]`` forward FLOPs per image of each group's (pruned) model.
        finetune_batch_size: stage-2 batch size.
        pruning_flops: total FLOPs of the pruning search (already including its own backward
            passes; not scaled by ``backward_factor``).
        baseline_steps, baseline_batch_size: the single model's training.
        backward_factor: training-step FLOPs per forward FLOP; 3.0 = forward + backward (≈ 2×).

    Raises:
        ValueError: a negative step count or size, ``len(finetune_steps) != len(group_flops)``,
            non-positive FLOPs or factor, negative ``pruning_flops``, or a zero baseline.
    """
    base = _positive("base_flops", base_flops)
    factor = _positive("backward_factor", backward_factor)
    steps_g = [_non_negative_int(f"finetune_steps[{g}]", s) for g, s in enumerate(finetune_steps)]
    flops_g = [_positive(f"group_flops[{g}]", f) for g, f in enumerate(group_flops)]
    if len(steps_g) != len(flops_g):
        raise ValueError(f"finetune_steps has {len(steps_g)} entries but group_flops has {len(flops_g)}")
    shared_steps = _non_negative_int("shared_steps", shared_steps)
    batch = _non_negative_int("batch_size", batch_size)
    ft_batch = _non_negative_int("finetune_batch_size", finetune_batch_size)
    base_steps = _non_negative_int("baseline_steps", baseline_steps)
    base_batch = _non_negative_int("baseline_batch_size", baseline_batch_size)
    if isinstance(pruning_flops, bool) or not isinstance(pruning_flops, (int, float, np.integer, np.floating)) or not (
        math.isfinite(pruning_flops) and pruning_flops >= 0
    ):
        raise ValueError(f"pruning_flops={pruning_flops!r} must be a finite number >= 0")

    shared = shared_steps * base * batch * factor
    per_group = [s * f * ft_batch * factor for s, f in zip(steps_g, flops_g)]
    finetune = math.fsum(per_group)
    tdc = math.fsum([shared, finetune, float(pruning_flops)])
    baseline = base_steps * base * base_batch * factor
    if baseline <= 0:
        raise ValueError("the baseline's cost is zero (baseline_steps or baseline_batch_size is 0); no ratio")
    return TrainingCost(
        backward_factor=factor, base_flops=base, shared_steps=shared_steps, batch_size=batch,
        finetune_steps=steps_g, group_flops=flops_g, finetune_batch_size=ft_batch,
        baseline_steps=base_steps, baseline_batch_size=base_batch, shared_flops=shared,
        finetune_flops_per_group=per_group, finetune_flops=finetune, pruning_flops=float(pruning_flops),
        tdc_flops=tdc, baseline_flops=baseline, ratio=tdc / baseline,
    )


def measure_group_flops(*, models: Sequence[nn.Module], in_channels: int, image_size: int) -> list[int]:
    """Forward FLOPs per image of each model ``(x: [1 x C x H x W], t) -> out``, counted by
    :func:`tdc_core.model.flops.count_forward_flops` (FlopCounterMode)."""
    return [count_forward_flops(m, in_channels=in_channels, image_size=image_size) for m in models]
