"""Progressive FLOPs budgets per timestep group (docs/METHOD.md step 3, the paper's scaling rule).

Group with rank i of N (1 = easiest) gets ``FLOPs_g(i) = (i/N + (N-i)/N · k) · F``, F the FLOPs
of one forward pass of the base model, k in (0, 1]. With N = 5, k = 0.5 the fractions are
0.6, 0.7, 0.8, 0.9, 1.0: the hardest group keeps the full model.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from pydantic import BaseModel, ConfigDict

from tdc_core.config import ModelConfig, PipelineConfig
from tdc_core.errors import ConfigError
from tdc_core.method.grouping import Grouping
from tdc_core.method.pruning.space import prune_space
from tdc_core.model.unet import UNetSpec

__all__ = ["BudgetPlan", "GroupBudget", "assign_budgets", "budget_fractions", "check_budgets_reachable",
           "mean_sampling_fraction"]


def budget_fractions(*, num_groups: int, k: float) -> list[float]:
    """Budget fraction of F for ranks i = 1..N, ``(i + (N - i)·k) / N``; the last is exactly 1.

    Raises:
        ConfigError: ``k`` not in (0, 1] or ``num_groups < 1``.
    """
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ConfigError(f"grouping.num_groups={num_groups!r} must be an int >= 1")
    if isinstance(k, bool) or not isinstance(k, (int, float, np.floating, np.integer)) or not (
        math.isfinite(k) and 0.0 < k <= 1.0
    ):
        raise ConfigError(f"budget.k={k!r} must lie in (0, 1]")
    n = int(num_groups)
    return [(i + (n - i) * float(k)) / n for i in range(1, n + 1)]


class GroupBudget(BaseModel):
    """FLOPs budget of one timestep group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: int             # group index in timestep order (0-based)
    lo: int                # first timestep of the group
    hi: int                # one past its last timestep
    rank: int              # 1 = easiest ... N = hardest
    fraction: float        # budget / F, in (0, 1]
    flops_budget: float    # fraction x base FLOPs of one forward pass


def assign_budgets(*, grouping: Grouping, k: float, base_flops: float, reverse: bool = False) -> list[GroupBudget]:
    """One budget per group, in timestep order: the group with rank i gets fraction i (the
    hardest the full model), or with ``reverse`` fraction N + 1 − i (the ablation: the easiest
    gets the full model). The set of fractions is the paper's either way.

    Args:
        grouping: the groups and their difficulty ranks.
        k: smallest-budget parameter in (0, 1]; k = 1 gives every group the full model.
        base_flops: F, FLOPs of one forward pass of the base model (> 0).
        reverse: hand the budgets out in reverse order of difficulty.

    Raises:
        ConfigError: bad ``k``.
        ValueError: ``base_flops`` not a positive finite number.
    """
    if not (isinstance(base_flops, (int, float, np.integer, np.floating)) and math.isfinite(base_flops)
            and base_flops > 0):
        raise ValueError(f"base_flops={base_flops!r} must be a positive finite number")
    fractions = budget_fractions(num_groups=grouping.num_groups, k=k)
    out = []
    for g in range(grouping.num_groups):
        lo, hi = grouping.interval(g)
        rank = grouping.rank[g]
        frac = fractions[grouping.num_groups - rank if reverse else rank - 1]
        out.append(GroupBudget(group=g, lo=lo, hi=hi, rank=grouping.rank[g], fraction=frac,
                               flops_budget=frac * float(base_flops)))
    return out


def mean_sampling_fraction(*, budgets: list[GroupBudget], steps: np.ndarray) -> float:
    """Mean budget fraction of the group serving each visited timestep.

    Sampling cost relative to one full model for a sampler that visits ``steps``.

    Args:
        budgets: groups that tile ``[0, T)`` (any order).
        steps: ``[S]`` timesteps the sampler visits (any shape, S >= 1; repeats count).

    Raises:
        ValueError: budgets do not tile ``[0, T)``, ``steps`` is empty or outside ``[0, T)``.
    """
    ordered = sorted(budgets, key=lambda b: b.lo)
    if not ordered or ordered[0].lo != 0 or any(
        a.hi != b.lo for a, b in zip(ordered, ordered[1:])
    ) or any(b.lo >= b.hi for b in ordered):
        raise ValueError("budgets must be non-empty intervals that tile [0, T) without gaps or overlap")
    t = np.asarray(steps).ravel()
    num_timesteps = ordered[-1].hi
    if t.size == 0:
        raise ValueError("steps is empty")
    if t.min() < 0 or t.max() >= num_timesteps:
        raise ValueError(f"steps must lie in [0, {num_timesteps}), got range [{t.min()}, {t.max()}]")
    los = np.array([b.lo for b in ordered])
    fractions = np.array([b.fraction for b in ordered])
    return float(fractions[np.searchsorted(los, t, side="right") - 1].mean())


class BudgetPlan(BaseModel):
    """Every group's budget with what it was derived from (written to ``budgets.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_flops: float               # F: FLOPs of one forward pass of the dense base model
    k: float                        # budget.k
    difficulty_measure: str         # budget.difficulty
    reverse: bool = False           # budget.reverse: the hardest group got the smallest budget
    budgets: list[GroupBudget]      # one per group, in timestep order


def check_budgets_reachable(config: PipelineConfig) -> None:
    """Refuse FLOPs budgets that no pruning allowed by ``prune`` can reach, before any training.

    The easiest group's budget is ``(1 + (N-1)·k)/N · F``; pruning narrows each unit to no less
    than ``prune.min_keep`` of its width (in whole GroupNorm groups / heads, and multiples of
    ``prune.width_multiple`` where the width allows), which puts a floor
    under the FLOPs. Counting that floor builds the UNet on the meta device (about half a
    second), so this runs where a run starts (``tdc config``/``run``/``profile``) rather than on
    every validation; pruning itself refuses the same budgets, but only hours later.

    Raises:
        ConfigError: the smallest budget lies below the floor; the message names budget.k and
            the smallest k that works.
    """
    prune, n, k = config.prune, config.grouping.num_groups, config.budget.k
    smallest = (1 + (n - 1) * k) / n
    if not prune.enabled or n == 1 or smallest >= 1.0:
        return  # nothing is pruned
    floor = _prune_floor_fraction(config.model.model_dump_json(), config.data.image_size, config.data.channels,
                                  config.learn_sigma, prune.min_keep, prune.prune_attention, prune.width_multiple)
    reachable = floor / (1 + prune.tolerance)  # as tdc_core.method.pruning.search accepts it
    if smallest < reachable:
        need = math.ceil(1000 * (n * reachable - 1) / (n - 1)) / 1000
        raise ConfigError(
            f"budget.k={k} gives the easiest of {n} groups {smallest:.3f} F, below the {floor:.3f} F of the "
            f"narrowest model pruning may make (prune.min_keep={prune.min_keep}, prune.width_multiple="
            f"{prune.width_multiple}, prune.prune_attention={str(prune.prune_attention).lower()}); allowed: "
            f"budget.k >= {need}, a smaller prune.min_keep or prune.width_multiple, or prune.enabled=false"
        )


@functools.lru_cache(maxsize=32)
def _prune_floor_fraction(model_json: str, image_size: int, channels: int, learn_sigma: bool, min_keep: float,
                          prune_attention: bool, width_multiple: int) -> float:
    """FLOPs of the narrowest prunable model / FLOPs of the dense one (the rule of
    :func:`tdc_core.method.pruning.search.prune_to_budget`: attention keeps its width unless pruned)."""
    spec = UNetSpec(model=ModelConfig.model_validate_json(model_json), image_size=image_size,
                    in_channels=channels, learn_sigma=learn_sigma)
    space = prune_space(spec, min_keep=min_keep, width_multiple=width_multiple)
    lower = [int(w) if prune_attention or u.kind != "attn" else u.dense_width
             for u, w in zip(space.units, space.min_widths)]
    return space.flops(lower) / space.dense_flops
