"""Specification of timestep grouping (docs/METHOD.md step 2) and difficulty ranking (step 3)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tdc_core.config import GroupingConfig
from tdc_core.errors import ConfigError
from tdc_core.method.grouping import (
    Grouping,
    group_timesteps,
    interval_cost_table,
    optimal_partition,
    partition_cost,
    rank_by_difficulty,
    uniform_partition,
)

# --- helpers -------------------------------------------------------------------------------


def brute_force(cost: np.ndarray, *, num_groups: int, min_size: int) -> tuple[float, list[int]]:
    """Least total over every boundary set; ties -> lexicographically smallest boundaries."""
    num_buckets = cost.shape[0] - 1
    best: tuple[float, list[int]] | None = None
    for inner in itertools.combinations(range(1, num_buckets), num_groups - 1):
        bounds = [0, *inner, num_buckets]
        if any(b - a < min_size for a, b in zip(bounds, bounds[1:])):
            continue
        total = partition_cost(cost, bounds)  # same right-to-left summation as the DP
        if best is None or total < best[0]:  # combinations() is lexicographic: first wins ties
            best = (total, bounds)
    assert best is not None
    return best


def random_table(rng: np.random.Generator, num_buckets: int, *, integer: bool) -> np.ndarray:
    shape = (num_buckets + 1, num_buckets + 1)
    table = rng.integers(0, 4, size=shape).astype(float) if integer else rng.normal(size=shape)
    return table


def assert_valid_partition(bounds: list[int], *, num_buckets: int, num_groups: int, min_size: int) -> None:
    assert len(bounds) == num_groups + 1
    assert bounds[0] == 0 and bounds[-1] == num_buckets
    sizes = np.diff(bounds)
    assert np.all(sizes >= min_size)
    covered = np.concatenate([np.arange(a, b) for a, b in zip(bounds, bounds[1:])])
    np.testing.assert_array_equal(covered, np.arange(num_buckets))  # each bucket exactly once


def profile(num_buckets: int, *, seed: int = 0, steps_per_bucket: int = 10) -> dict[str, np.ndarray]:
    """A plausible random profile: decreasing SNR, loss highest at small t, smooth affinity."""
    rng = np.random.default_rng(seed)
    centres = np.arange(num_buckets)
    grads = rng.normal(size=(num_buckets, 32)).cumsum(axis=0)  # neighbours are similar
    grads /= np.linalg.norm(grads, axis=1, keepdims=True)
    return {
        "bucket_edges": np.arange(num_buckets + 1) * steps_per_bucket,
        "snr_db": np.linspace(40.0, -40.0, num_buckets),
        "loss_mean": np.exp(-centres / (num_buckets / 4)) + 0.01 * rng.random(num_buckets),
        "affinity": np.clip(grads @ grads.T, -1.0, 1.0),
    }


# --- dynamic programming -------------------------------------------------------------------


@pytest.mark.parametrize("integer", [False, True], ids=["float-costs", "integer-costs-with-ties"])
def test_dp_matches_brute_force_cost_and_boundaries(integer: bool) -> None:
    rng = np.random.default_rng(1234 + integer)
    checked = 0
    for _ in range(400):
        num_buckets = int(rng.integers(1, 10))
        num_groups = int(rng.integers(1, 5))
        min_size = int(rng.integers(1, 4))
        if num_groups * min_size > num_buckets:
            continue
        cost = random_table(rng, num_buckets, integer=integer)
        bounds = optimal_partition(cost, num_groups=num_groups, min_size=min_size)
        want_cost, want_bounds = brute_force(cost, num_groups=num_groups, min_size=min_size)
        assert_valid_partition(bounds, num_buckets=num_buckets, num_groups=num_groups, min_size=min_size)
        assert partition_cost(cost, bounds) == pytest.approx(want_cost, abs=1e-12)
        assert bounds == want_bounds
        checked += 1
    assert checked > 150


def test_dp_tie_break_prefers_smallest_boundaries() -> None:
    # Every partition costs 0: the lexicographically smallest one is returned.
    zeros = np.zeros((11, 11))
    assert optimal_partition(zeros, num_groups=3, min_size=2) == [0, 2, 4, 10]


def test_dp_ignores_entries_that_are_not_usable_intervals() -> None:
    cost = np.full((7, 7), np.nan)
    iu = np.triu_indices(7, k=2)  # only intervals of >= 2 buckets are finite
    cost[iu] = 1.0
    assert optimal_partition(cost, num_groups=3, min_size=2) == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="non-finite"):
        optimal_partition(cost, num_groups=3, min_size=1)


@pytest.mark.parametrize(
    ("num_groups", "min_size", "field"),
    [(0, 1, "num_groups"), (1, 0, "min_size"), (4, 3, "num_groups"), (11, 1, "num_groups")],
)
def test_infeasible_partition_raises_config_error_naming_the_field(num_groups: int, min_size: int, field: str) -> None:
    cost = np.zeros((11, 11))  # B = 10
    with pytest.raises(ConfigError, match=field):
        optimal_partition(cost, num_groups=num_groups, min_size=min_size)
    with pytest.raises(ConfigError, match=field):
        uniform_partition(num_buckets=10, num_groups=num_groups, min_size=min_size)


def test_group_timesteps_infeasible_config_names_config_fields() -> None:
    p = profile(10)
    config = GroupingConfig(num_groups=4, min_group_buckets=3, cost="loss")
    with pytest.raises(ConfigError, match=r"grouping\.num_groups.*grouping\.min_group_buckets"):
        group_timesteps(**p, config=config, difficulty="loss")


# --- uniform -------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_buckets", "num_groups"), [(10, 5), (200, 8), (50, 7), (7, 3), (9, 9), (5, 1)])
def test_uniform_gives_equal_intervals(num_buckets: int, num_groups: int) -> None:
    bounds = uniform_partition(num_buckets=num_buckets, num_groups=num_groups)
    assert_valid_partition(bounds, num_buckets=num_buckets, num_groups=num_groups, min_size=1)
    sizes = np.diff(bounds)
    assert sizes.max() - sizes.min() <= 1
    if num_buckets % num_groups == 0:
        assert np.all(sizes == num_buckets // num_groups)
    # The uniform cost table leads the DP to the same (balanced) sizes.
    table = interval_cost_table("uniform", loss_mean=np.zeros(num_buckets), num_groups=num_groups)
    dp_sizes = np.diff(optimal_partition(table, num_groups=num_groups, min_size=1))
    assert sorted(dp_sizes) == sorted(sizes)


def test_group_timesteps_uniform_ignores_the_profile() -> None:
    p = profile(20, steps_per_bucket=50)
    grouping = group_timesteps(**p, config=GroupingConfig(num_groups=4, cost="uniform"), difficulty="loss")
    assert grouping.boundaries == [0, 250, 500, 750, 1000]
    assert grouping.bucket_boundaries == [0, 5, 10, 15, 20]


# --- cost kinds: definitions ---------------------------------------------------------------


def naive_tables(snr: np.ndarray, loss: np.ndarray, aff: np.ndarray) -> dict[str, np.ndarray]:
    num_buckets = snr.size
    x = (loss - loss.min()) / (loss.max() - loss.min())
    out = {k: np.full((num_buckets + 1, num_buckets + 1), np.inf) for k in ("snr", "loss", "affinity")}
    for i in range(num_buckets):
        for j in range(i + 1, num_buckets + 1):
            c = (i + j - 1) // 2
            out["snr"][i, j] = np.abs(snr[i:j] - snr[c]).sum()
            out["loss"][i, j] = (j - i) * x[i:j].var()
            out["affinity"][i, j] = (1.0 - aff[c, i:j]).sum()
    return out


def test_tables_match_their_definitions() -> None:
    p = profile(13, seed=3)
    rng = np.random.default_rng(0)
    snr = p["snr_db"] + rng.normal(size=13)  # not monotone: the table must not assume it
    want = naive_tables(snr, p["loss_mean"], p["affinity"])
    for kind, table in want.items():
        got = interval_cost_table(kind, snr_db=snr, loss_mean=p["loss_mean"], affinity=p["affinity"])
        assert got.shape == (14, 14)
        np.testing.assert_allclose(got, table, atol=1e-10, err_msg=kind)
    for kind in ("snr", "loss", "affinity", "combined"):
        got = interval_cost_table(kind, snr_db=snr, loss_mean=p["loss_mean"], affinity=p["affinity"])
        lower = np.tril_indices(14)
        assert np.all(np.isinf(got[lower])), f"{kind}: i >= j must not be an interval"
        assert np.all(got[np.triu_indices(14, k=1)] >= 0), kind


def test_combined_is_weighted_sum_of_max_normalised_tables() -> None:
    p = profile(12, seed=5)
    kw = {"snr_db": p["snr_db"], "loss_mean": p["loss_mean"], "affinity": p["affinity"]}
    aff, loss = interval_cost_table("affinity", **kw), interval_cost_table("loss", **kw)
    iu = np.triu_indices(13, k=1)
    got = interval_cost_table("combined", **kw, affinity_weight=0.3, loss_weight=2.0)
    want = 0.3 * aff[iu] / aff[iu].max() + 2.0 * loss[iu] / loss[iu].max()
    np.testing.assert_allclose(got[iu], want, rtol=1e-12)


def test_affinity_offset_has_the_same_optimum_as_the_papers_negative_sum() -> None:
    """sum_b (1 - A[c, b]) = B - sum_b A[c, b] over any partition, so the argmin is the same."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        num_buckets = int(rng.integers(3, 9))
        num_groups = int(rng.integers(1, 4))
        a = rng.uniform(-1, 1, size=(num_buckets, num_buckets))
        a = (a + a.T) / 2
        np.fill_diagonal(a, 1.0)
        ours = interval_cost_table("affinity", affinity=a)
        idx = np.arange(num_buckets + 1)
        size = idx[None, :] - idx[:, None]
        papers = np.where(np.isfinite(ours), ours - size, np.inf)  # -sum_b A[c, b]
        bounds = optimal_partition(ours, num_groups=num_groups, min_size=1)
        want_cost, _ = brute_force(papers, num_groups=num_groups, min_size=1)
        assert partition_cost(papers, bounds) == pytest.approx(want_cost)
        assert partition_cost(ours, bounds) == pytest.approx(want_cost + num_buckets)


# --- cost kinds: obvious answers -----------------------------------------------------------


def test_loss_cost_finds_the_steps_of_a_three_plateau_profile() -> None:
    rng = np.random.default_rng(0)
    loss = np.repeat([0.9, 0.2, 0.5], [7, 12, 11]) + 0.005 * rng.normal(size=30)
    table = interval_cost_table("loss", loss_mean=loss)
    assert optimal_partition(table, num_groups=3, min_size=1) == [0, 7, 19, 30]


def test_snr_cost_finds_the_steps_of_a_plateau_profile() -> None:
    snr = np.repeat([30.0, 10.0, -5.0, -20.0], [5, 9, 4, 6])
    table = interval_cost_table("snr", snr_db=snr)
    assert optimal_partition(table, num_groups=4, min_size=1) == [0, 5, 14, 18, 24]


def block_affinity(sizes: list[int], *, off: float = -0.2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    same = labels[:, None] == labels[None, :]
    noise = 0.02 * rng.normal(size=same.shape)
    a = np.where(same, 0.95, off) + (noise + noise.T) / 2
    np.fill_diagonal(a, 1.0)
    return a


def test_affinity_cost_finds_the_blocks_of_a_block_diagonal_matrix() -> None:
    a = block_affinity([6, 3, 10, 5])
    table = interval_cost_table("affinity", affinity=a)
    assert optimal_partition(table, num_groups=4, min_size=1) == [0, 6, 9, 19, 24]


def test_combined_follows_whichever_cost_has_all_the_weight() -> None:
    # Loss steps at 8 and 16; affinity blocks at 5 and 14: the weights decide.
    loss = np.repeat([1.0, 0.0, 0.5], [8, 8, 8])
    a = block_affinity([5, 9, 10])
    kw = {"loss_mean": loss, "affinity": a}
    only_loss = interval_cost_table("combined", **kw, affinity_weight=0.0, loss_weight=1.0)
    only_aff = interval_cost_table("combined", **kw, affinity_weight=1.0, loss_weight=0.0)
    assert optimal_partition(only_loss, num_groups=3, min_size=1) == [0, 8, 16, 24]
    assert optimal_partition(only_aff, num_groups=3, min_size=1) == [0, 5, 14, 24]


def test_combined_finds_boundaries_both_costs_agree_on() -> None:
    loss = np.repeat([0.1, 0.8, 0.4], [6, 10, 8])
    a = block_affinity([6, 10, 8], seed=1)
    table = interval_cost_table("combined", loss_mean=loss, affinity=a)
    assert optimal_partition(table, num_groups=3, min_size=1) == [0, 6, 16, 24]


def test_min_size_is_respected_even_when_a_smaller_group_would_be_cheaper() -> None:
    loss = np.repeat([1.0, 0.0, 1.0], [2, 10, 8])
    table = interval_cost_table("loss", loss_mean=loss)
    assert optimal_partition(table, num_groups=3, min_size=1) == [0, 2, 12, 20]
    bounds = optimal_partition(table, num_groups=3, min_size=4)
    assert_valid_partition(bounds, num_buckets=20, num_groups=3, min_size=4)


def test_cost_table_errors() -> None:
    with pytest.raises(ConfigError, match="cost"):
        interval_cost_table("entropy", loss_mean=np.zeros(4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="affinity"):
        interval_cost_table("affinity", loss_mean=np.zeros(4))
    with pytest.raises(ValueError, match="number of buckets"):
        interval_cost_table("combined", loss_mean=np.zeros(4), affinity=np.eye(5))
    with pytest.raises(ValueError, match="non-finite"):
        interval_cost_table("loss", loss_mean=np.array([0.1, np.nan]))
    with pytest.raises(ConfigError, match="num_groups"):
        interval_cost_table("uniform", loss_mean=np.zeros(4))
    with pytest.raises(ConfigError, match="loss_weight"):
        interval_cost_table("combined", loss_mean=np.zeros(4), affinity=np.eye(4), loss_weight=-1.0)


# --- speed ---------------------------------------------------------------------------------


def test_combined_table_and_dp_for_200_buckets_8_groups_give_a_valid_partition() -> None:
    # Speed is not asserted here (no wall-clock asserts in tests): the DP is O(B^2 N).
    p = profile(200, seed=1)
    table = interval_cost_table("combined", snr_db=p["snr_db"], loss_mean=p["loss_mean"], affinity=p["affinity"])
    bounds = optimal_partition(table, num_groups=8, min_size=2)
    assert_valid_partition(bounds, num_buckets=200, num_groups=8, min_size=2)


# --- the Grouping record -------------------------------------------------------------------


@pytest.mark.parametrize("cost", ["snr", "loss", "affinity", "uniform", "combined"])
def test_group_timesteps_produces_a_consistent_grouping(cost: str) -> None:
    p = profile(25, seed=2)
    p["bucket_edges"] = np.concatenate([[0], np.cumsum(np.arange(1, 26))])  # unequal widths
    grouping = group_timesteps(**p, config=GroupingConfig(num_groups=5, cost=cost, min_group_buckets=2),
                               difficulty="loss")
    assert grouping.num_groups == 5
    assert grouping.num_timesteps == int(p["bucket_edges"][-1])
    assert grouping.boundaries == [int(p["bucket_edges"][b]) for b in grouping.bucket_boundaries]
    assert_valid_partition(grouping.bucket_boundaries, num_buckets=25, num_groups=5, min_size=2)
    assert grouping.cost_kind == cost and grouping.difficulty_measure == "loss"
    assert np.isfinite(grouping.total_cost)
    assert Grouping.model_validate_json(grouping.model_dump_json()) == grouping


def test_group_of_maps_every_timestep_to_the_group_containing_it() -> None:
    p = profile(20, seed=4, steps_per_bucket=7)
    grouping = group_timesteps(**p, config=GroupingConfig(num_groups=4, cost="combined"), difficulty="loss")
    t = np.arange(grouping.num_timesteps)
    groups = grouping.group_of(t)
    assert groups.shape == t.shape and groups.dtype == np.int64
    for g in range(grouping.num_groups):
        lo, hi = grouping.interval(g)
        np.testing.assert_array_equal(groups[lo:hi], g)
    assert grouping.group_of(0) == 0 and isinstance(grouping.group_of(0), int)
    assert grouping.group_of(grouping.num_timesteps - 1) == grouping.num_groups - 1
    np.testing.assert_array_equal(grouping.group_of(t.reshape(10, 14)), groups.reshape(10, 14))
    for bad in (-1, grouping.num_timesteps, np.array([0, 5, grouping.num_timesteps + 3])):
        with pytest.raises(ValueError, match="timesteps must lie in"):
            grouping.group_of(bad)
    with pytest.raises(ValueError, match="group index"):
        grouping.interval(grouping.num_groups)


def test_grouping_rejects_inconsistent_fields() -> None:
    good = {"num_timesteps": 10, "boundaries": [0, 4, 10], "bucket_boundaries": [0, 2, 5],
            "cost_kind": "loss", "total_cost": 0.0, "difficulty": [0.1, 0.2],
            "difficulty_measure": "loss", "rank": [1, 2]}
    Grouping(**good)
    for field, value in [("boundaries", [0, 4, 9]), ("boundaries", [0, 4, 4, 10]),
                         ("rank", [1, 1]), ("difficulty", [0.1])]:
        with pytest.raises(ValueError):
            Grouping(**{**good, field: value})


# --- difficulty and rank -------------------------------------------------------------------


@pytest.mark.parametrize("measure", ["loss", "snr"])
def test_ranks_are_a_permutation_and_the_hardest_group_gets_n(measure: str) -> None:
    rng = np.random.default_rng(11)
    for seed in range(10):
        p = profile(30, seed=seed)
        p["loss_mean"] = rng.random(30)  # hardest group anywhere
        grouping = group_timesteps(**p, config=GroupingConfig(num_groups=6, cost="loss"), difficulty=measure)
        assert sorted(grouping.rank) == list(range(1, 7))
        hardest = int(np.argmax(grouping.difficulty))
        assert grouping.rank[hardest] == 6
        assert grouping.rank[int(np.argmin(grouping.difficulty))] == 1


def test_difficulty_measures_are_width_weighted_means_and_point_opposite_ways() -> None:
    p = profile(10)
    p["bucket_edges"] = np.array([0, 1, 2, 3, 4, 5, 10, 20, 40, 70, 100])
    p["loss_mean"] = np.linspace(1.0, 0.0, 10)  # eps-loss is highest at small t
    config = GroupingConfig(num_groups=2, cost="uniform")
    by_loss = group_timesteps(**p, config=config, difficulty="loss")
    by_snr = group_timesteps(**p, config=config, difficulty="snr")
    assert by_loss.rank == [2, 1]  # small t (high SNR) is hard by loss ...
    assert by_snr.rank == [1, 2]   # ... and easy by SNR
    x = np.linspace(1.0, 0.0, 10)
    w = np.diff(p["bucket_edges"])
    assert by_loss.difficulty[1] == pytest.approx(np.average(x[5:], weights=w[5:]))
    assert by_snr.difficulty[0] == pytest.approx(-np.average(p["snr_db"][:5], weights=w[:5]))


def test_rank_ties_are_broken_by_group_index() -> None:
    assert rank_by_difficulty([0.5, 0.5, 0.1, 0.5]) == [2, 3, 1, 4]
    assert rank_by_difficulty([0.0, 0.0, 0.0]) == [1, 2, 3]


def test_bad_difficulty_measure_and_bucket_edges_raise() -> None:
    p = profile(8)
    with pytest.raises(ConfigError, match="budget.difficulty"):
        group_timesteps(**p, config=GroupingConfig(num_groups=2), difficulty="entropy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bucket_edges"):
        group_timesteps(**{**p, "bucket_edges": np.array([0, 5, 5, 9, 10, 11, 12, 13, 14])},
                        config=GroupingConfig(num_groups=2), difficulty="loss")
    with pytest.raises(ValueError, match="snr_db"):
        group_timesteps(**{**p, "snr_db": np.zeros(7)}, config=GroupingConfig(num_groups=2), difficulty="loss")
