"""Specification of the progressive FLOPs budgets (docs/METHOD.md step 3)."""

from __future__ import annotations

import numpy as np
import pytest

from tdc_core.errors import ConfigError
from tdc_core.method.budgets import (
    GroupBudget,
    assign_budgets,
    budget_fractions,
    mean_sampling_fraction,
)
from tdc_core.method.grouping import Grouping


def make_grouping(*, rank: list[int], num_timesteps: int = 1000) -> Grouping:
    n = len(rank)
    bounds = [(g * num_timesteps) // n for g in range(n + 1)]
    return Grouping(
        num_timesteps=num_timesteps, boundaries=bounds, bucket_boundaries=list(range(n + 1)),
        cost_kind="uniform", total_cost=0.0, difficulty=[float(r) for r in rank],
        difficulty_measure="loss", rank=rank,
    )


def test_paper_example_n5_k05_gives_060_to_100() -> None:
    assert budget_fractions(num_groups=5, k=0.5) == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0])


@pytest.mark.parametrize("num_groups", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("k", [0.01, 0.3, 0.5, 0.99, 1.0])
def test_fractions_rise_from_about_k_to_exactly_one(num_groups: int, k: float) -> None:
    fractions = budget_fractions(num_groups=num_groups, k=k)
    assert len(fractions) == num_groups
    assert fractions[-1] == 1.0  # the hardest group keeps the full model, exactly
    assert all(k <= f <= 1.0 for f in fractions)
    assert np.all(np.diff(fractions) >= 0)
    want = [i / num_groups + (num_groups - i) / num_groups * k for i in range(1, num_groups + 1)]
    assert fractions == pytest.approx(want)


def test_k_one_gives_every_group_the_full_model() -> None:
    assert budget_fractions(num_groups=6, k=1.0) == [1.0] * 6


@pytest.mark.parametrize("k", [0.0, -0.5, 1.0001, 2.0, float("nan"), float("inf")])
def test_bad_k_raises_config_error_naming_the_field(k: float) -> None:
    with pytest.raises(ConfigError, match=r"budget\.k"):
        budget_fractions(num_groups=5, k=k)
    with pytest.raises(ConfigError, match=r"budget\.k"):
        assign_budgets(grouping=make_grouping(rank=[1, 2]), k=k, base_flops=1e9)


@pytest.mark.parametrize("num_groups", [0, -1])
def test_bad_num_groups_raises_config_error(num_groups: int) -> None:
    with pytest.raises(ConfigError, match="num_groups"):
        budget_fractions(num_groups=num_groups, k=0.5)


def test_budgets_follow_rank_and_the_hardest_gets_full_flops() -> None:
    flops = 3.5e9
    grouping = make_grouping(rank=[5, 3, 1, 2, 4])
    budgets = assign_budgets(grouping=grouping, k=0.5, base_flops=flops)
    assert [b.group for b in budgets] == [0, 1, 2, 3, 4]
    assert [(b.lo, b.hi) for b in budgets] == [grouping.interval(g) for g in range(5)]
    assert [b.rank for b in budgets] == grouping.rank
    assert [b.fraction for b in budgets] == pytest.approx([1.0, 0.8, 0.6, 0.7, 0.9])
    hardest = budgets[grouping.rank.index(5)]
    assert hardest.flops_budget == flops
    for b in budgets:
        assert b.flops_budget == pytest.approx(b.fraction * flops)
    assert GroupBudget.model_validate_json(budgets[1].model_dump_json()) == budgets[1]


@pytest.mark.parametrize("flops", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_base_flops_raises(flops: float) -> None:
    with pytest.raises(ValueError, match="base_flops"):
        assign_budgets(grouping=make_grouping(rank=[1, 2]), k=0.5, base_flops=flops)


def test_mean_sampling_fraction_over_evenly_spread_steps_is_the_mean_fraction() -> None:
    budgets = assign_budgets(grouping=make_grouping(rank=[5, 4, 3, 2, 1]), k=0.5, base_flops=1.0)
    all_steps = np.arange(1000)[::-1]
    assert mean_sampling_fraction(budgets=budgets, steps=all_steps) == pytest.approx(0.8)
    respaced = np.linspace(999, 0, 50).round().astype(int)  # 10 steps in each group
    assert mean_sampling_fraction(budgets=budgets, steps=respaced) == pytest.approx(0.8)
    # The order of the budgets does not matter.
    assert mean_sampling_fraction(budgets=budgets[::-1], steps=respaced) == pytest.approx(0.8)


def test_mean_sampling_fraction_weights_each_visited_step() -> None:
    budgets = assign_budgets(grouping=make_grouping(rank=[1, 2]), k=0.5, base_flops=1.0)  # 0.75, 1.0
    assert mean_sampling_fraction(budgets=budgets, steps=np.array([0, 1, 2, 999])) == pytest.approx(
        (3 * 0.75 + 1.0) / 4
    )
    assert mean_sampling_fraction(budgets=budgets, steps=np.array([499])) == 0.75
    assert mean_sampling_fraction(budgets=budgets, steps=np.array([500])) == 1.0


def test_mean_sampling_fraction_rejects_bad_steps_and_budgets() -> None:
    budgets = assign_budgets(grouping=make_grouping(rank=[1, 2]), k=0.5, base_flops=1.0)
    for steps in (np.array([], dtype=int), np.array([-1, 3]), np.array([1000])):
        with pytest.raises(ValueError, match="steps"):
            mean_sampling_fraction(budgets=budgets, steps=steps)
    with pytest.raises(ValueError, match="tile"):
        mean_sampling_fraction(budgets=budgets[1:], steps=np.array([600]))  # gap at [0, 500)
    with pytest.raises(ValueError, match="tile"):
        mean_sampling_fraction(budgets=[], steps=np.array([0]))


# --- which group gets which budget, per difficulty measure (a synthetic profile) -------------


def _synthetic_budgets(measure: str, *, reverse: bool = False) -> list[float]:
    """Five equal groups over 10 buckets: ε-loss falls with t (highest at t ≈ 0, as measured),
    SNR falls with t, and pruning hurts the middle buckets most."""
    from tdc_core.config import GroupingConfig
    from tdc_core.method.grouping import group_timesteps

    edges = np.arange(0, 1001, 100)
    sensitivity = np.array([0.1, 0.1, 0.3, 0.3, 0.9, 0.9, 0.5, 0.5, 0.2, 0.2])
    grouping = group_timesteps(
        bucket_edges=edges, snr_db=np.linspace(30.0, -30.0, 10), loss_mean=np.linspace(1.0, 0.1, 10),
        affinity=np.eye(10), config=GroupingConfig(num_groups=5, cost="uniform"), difficulty=measure,
        sensitivity=sensitivity if measure == "sensitivity" else None)
    return [round(b.fraction, 6) for b in assign_budgets(grouping=grouping, k=0.5, base_flops=1.0, reverse=reverse)]


def test_each_measure_puts_the_budgets_in_its_documented_order() -> None:
    # loss: the low-noise groups (small t) are hardest and keep the full model.
    assert _synthetic_budgets("loss") == [1.0, 0.9, 0.8, 0.7, 0.6]
    # snr: low SNR (large t) is hardest: the opposite order.
    assert _synthetic_budgets("snr") == [0.6, 0.7, 0.8, 0.9, 1.0]
    # sensitivity: the group whose error rises most when pruned keeps the most.
    assert _synthetic_budgets("sensitivity") == [0.6, 0.8, 1.0, 0.9, 0.7]


def test_reverse_hands_the_same_budgets_out_in_the_opposite_order() -> None:
    assert _synthetic_budgets("loss", reverse=True) == [0.6, 0.7, 0.8, 0.9, 1.0]
    assert _synthetic_budgets("sensitivity", reverse=True) == [1.0, 0.8, 0.6, 0.7, 0.9]
    grouping = make_grouping(rank=[2, 3, 1])
    fwd = assign_budgets(grouping=grouping, k=0.4, base_flops=1.0)
    rev = assign_budgets(grouping=grouping, k=0.4, base_flops=1.0, reverse=True)
    assert sorted(b.fraction for b in fwd) == sorted(b.fraction for b in rev)  # the paper's set either way
    assert [b.rank for b in rev] == [2, 3, 1] and rev[2].fraction == 1.0  # the easiest keeps F


def test_sensitivity_without_a_measured_profile_is_refused_naming_the_fields() -> None:
    from tdc_core.config import GroupingConfig, load_config
    from tdc_core.method.grouping import group_timesteps

    with pytest.raises(ConfigError, match="profile.sensitivity_keep"):
        group_timesteps(bucket_edges=np.arange(0, 101, 10), snr_db=np.zeros(10), loss_mean=np.ones(10),
                        affinity=np.eye(10), config=GroupingConfig(num_groups=2, cost="uniform"),
                        difficulty="sensitivity")
    with pytest.raises(ConfigError, match="budget.difficulty=sensitivity needs profile.sensitivity_keep"):
        load_config(preset="smoke", overrides=["budget.difficulty=sensitivity", "profile.sensitivity_keep=null"])
