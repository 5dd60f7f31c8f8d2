"""Clustering timesteps into contiguous groups (docs/METHOD.md steps 2 and 3).

Input is the difficulty profile of step 1 as plain arrays over B fine buckets:

* ``bucket_edges`` ``[B+1]`` ints, ``0 = e_0 < ... < e_B = T``; bucket b covers ``[e_b, e_{b+1})``,
* ``snr_db`` ``[B]`` SNR in dB at each bucket's centre (decreasing in b),
* ``loss_mean`` ``[B]`` mean held-out eps-loss per bucket,
* ``affinity`` ``[B, B]`` cosine similarity of per-bucket gradients (symmetric, diagonal 1).

A group is an interval of buckets ``[i, j)`` (a sampler visits t in order, so a group must be an
interval). :func:`interval_cost_table` gives the cost of every interval, :func:`optimal_partition`
finds the exact minimum-cost partition into N intervals by dynamic programming, and
:func:`group_timesteps` ties them together, scores and ranks each group's difficulty and returns
a JSON-friendly :class:`Grouping`.

Decisions (docs/METHOD.md marks them as this project's own):

* **Tie-break.** Among partitions of equal (floating-point) total cost,
  :func:`optimal_partition` returns the one whose boundary list is lexicographically smallest
  (earliest first boundary, then earliest second, ...).
* **Centre** of a group ``[i, j)`` is its lower median bucket ``(i + j - 1) // 2``.
* **affinity** cost is ``sum_b (1 - affinity(centre, b))`` rather than the paper's
  ``-sum_b affinity(centre, b)``: each bucket lies in exactly one group, so the two totals differ
  by the constant B for every partition and have the same optimum; the offset form is >= 0,
  which keeps the ``combined`` normalisation meaningful.
* **loss** cost is the sum of squared deviations of the normalised loss from the group mean
  (size x variance), so splitting a group never increases the total and a group of identical
  buckets costs 0. Plain variance would favour dumping mixed buckets into one large group.
* **uniform** ignores the profile: :func:`group_timesteps` uses :func:`uniform_partition`
  (sizes differ by at most one, computed with integers); its table ``(size - B/N)^2`` is
  provided for reporting and has the same optimum sizes.
* Costs are per bucket (not weighted by bucket width); difficulty scores are weighted by bucket
  width in timesteps.
"""

from __future__ import annotations

from typing import Literal, overload

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from tdc_core.config import GroupingConfig
from tdc_core.errors import ConfigError

__all__ = [
    "CostKind",
    "DifficultyMeasure",
    "Grouping",
    "group_difficulty",
    "group_timesteps",
    "interval_cost_table",
    "normalised_loss",
    "optimal_partition",
    "partition_cost",
    "rank_by_difficulty",
    "uniform_partition",
]

CostKind = Literal["snr", "loss", "affinity", "uniform", "combined"]
DifficultyMeasure = Literal["loss", "snr", "sensitivity"]
_COST_KINDS: tuple[str, ...] = ("snr", "loss", "affinity", "uniform", "combined")
_DIFFICULTY_MEASURES: tuple[str, ...] = ("loss", "snr", "sensitivity")


# --- dynamic programming -------------------------------------------------------------------


def _check_partition_args(*, num_buckets: int, num_groups: int, min_size: int) -> None:
    for name, value in (("num_groups", num_groups), ("min_size", min_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{name} must be an int, got {value!r}")
    if num_groups < 1:
        raise ConfigError(f"num_groups={num_groups} must be >= 1")
    if min_size < 1:
        raise ConfigError(f"min_size={min_size} must be >= 1")
    if num_groups * min_size > num_buckets:
        raise ConfigError(
            f"num_groups={num_groups} x min_size={min_size} = {num_groups * min_size} exceeds the "
            f"number of buckets B={num_buckets}; no partition is feasible"
        )


def optimal_partition(cost: np.ndarray, *, num_groups: int, min_size: int) -> list[int]:
    """Exact minimum-cost partition of buckets ``[0, B)`` into ``num_groups`` intervals.

    Args:
        cost: ``[B+1, B+1]`` float; ``cost[i, j]`` is the cost of a group covering buckets
            ``[i, j)``. Only entries with ``j - i >= min_size`` are read; they must be finite.
        num_groups: N >= 1.
        min_size: minimum buckets per group, >= 1.

    Returns:
        Bucket boundaries ``[0 = b_0 < b_1 < ... < b_N = B]`` (length N+1) minimising
        ``sum_g cost[b_g, b_{g+1}]`` with every ``b_{g+1} - b_g >= min_size``. Ties are broken
        towards the lexicographically smallest boundary list.

    Raises:
        ConfigError: ``num_groups < 1``, ``min_size < 1`` or ``num_groups * min_size > B``.
        ValueError: ``cost`` is not square or has a non-finite entry that could be used.

    Suffix DP, O(N·B²) time, vectorised over both interval ends:
    ``best[n, i]`` = least cost of splitting ``[i, B)`` into n groups. Reconstructing forwards
    from i = 0 and taking the smallest minimising next boundary yields the lexicographically
    smallest optimum. Totals are summed right to left, ``c0 + (c1 + (... + c_{N-1}))``.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1] or cost.shape[0] < 2:
        raise ValueError(f"cost must have shape [B+1, B+1] with B >= 1, got {cost.shape}")
    num_buckets = cost.shape[0] - 1
    _check_partition_args(num_buckets=num_buckets, num_groups=num_groups, min_size=min_size)

    idx = np.arange(num_buckets + 1)
    usable = (idx[None, :] - idx[:, None]) >= min_size  # [i, j]: interval [i, j) is allowed
    if not np.all(np.isfinite(cost[usable])):
        raise ValueError("cost has non-finite entries for intervals [i, j) with j - i >= min_size")
    masked = np.where(usable, cost, np.inf)

    best = np.full(num_buckets + 1, np.inf)
    best[num_buckets] = 0.0  # zero groups cover [B, B) at no cost
    choice = np.empty((num_groups + 1, num_buckets + 1), dtype=np.int64)
    for n in range(1, num_groups + 1):
        total = masked + best[None, :]  # [i, j]: group [i, j) then n-1 groups on [j, B)
        choice[n] = np.argmin(total, axis=1)  # first minimum = smallest next boundary
        best = total[idx, choice[n]]

    boundaries = [0]
    for n in range(num_groups, 0, -1):
        boundaries.append(int(choice[n, boundaries[-1]]))
    if boundaries[-1] != num_buckets or not np.isfinite(best[0]):  # pragma: no cover - guarded
        raise AssertionError("DP reconstruction failed although the problem is feasible")
    return boundaries


def uniform_partition(*, num_buckets: int, num_groups: int, min_size: int = 1) -> list[int]:
    """Boundaries ``b_g = floor(g·B/N)``: N intervals whose sizes differ by at most one.

    Returns ``[0 = b_0 < ... < b_N = B]``; exactly equal sizes when N divides B. Smaller groups
    come first when sizes differ.

    Raises:
        ConfigError: as :func:`optimal_partition`.
    """
    _check_partition_args(num_buckets=num_buckets, num_groups=num_groups, min_size=min_size)
    return [(g * num_buckets) // num_groups for g in range(num_groups + 1)]


def partition_cost(cost: np.ndarray, boundaries: list[int]) -> float:
    """Total cost ``sum_g cost[b_g, b_{g+1}]`` of a partition, summed right to left."""
    total = 0.0
    for lo, hi in reversed(list(zip(boundaries[:-1], boundaries[1:]))):
        total = float(cost[lo, hi]) + total
    return total


# --- cost tables ---------------------------------------------------------------------------


def _vector(name: str, values: np.ndarray | None, size: int | None) -> np.ndarray:
    if values is None:
        raise ValueError(f"{name} is required for this cost kind")
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or (size is not None and arr.size != size):
        want = f"[{size}]" if size is not None else "[B] with B >= 1"
        raise ValueError(f"{name} must have shape {want}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite values")
    return arr


def _matrix(name: str, values: np.ndarray | None, size: int | None) -> np.ndarray:
    if values is None:
        raise ValueError(f"{name} is required for this cost kind")
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0 or (
        size is not None and arr.shape[0] != size
    ):
        want = f"[{size}, {size}]" if size is not None else "[B, B] with B >= 1"
        raise ValueError(f"{name} must have shape {want}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite values")
    return arr


def _grid(num_buckets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index grids ``i, j`` of shape [B+1, B+1], and the mask of proper intervals ``i < j``."""
    i, j = np.meshgrid(np.arange(num_buckets + 1), np.arange(num_buckets + 1), indexing="ij")
    return i, j, i < j


def _centre_sum_table(deviation: np.ndarray) -> np.ndarray:
    """``table[i, j] = sum_{b in [i, j)} deviation[centre(i, j), b]`` for all i < j, else +inf.

    ``deviation`` is ``[B, B]``: row c holds each bucket's deviation from centre c. One prefix
    sum per centre row makes every entry O(1).
    """
    num_buckets = deviation.shape[0]
    prefix = np.zeros((num_buckets, num_buckets + 1))
    np.cumsum(deviation, axis=1, out=prefix[:, 1:])
    i, j, proper = _grid(num_buckets)
    centre = np.clip((i + j - 1) // 2, 0, num_buckets - 1)
    table = prefix[centre, j] - prefix[centre, i]
    return np.where(proper, table, np.inf)


def normalised_loss(loss_mean: np.ndarray) -> np.ndarray:
    """``[B]`` loss mapped affinely to [0, 1] over all buckets (all zeros if constant)."""
    loss = _vector("loss_mean", loss_mean, None)
    span = loss.max() - loss.min()
    return (loss - loss.min()) / span if span > 0 else np.zeros_like(loss)


def _loss_table(loss_mean: np.ndarray) -> np.ndarray:
    x = normalised_loss(loss_mean)
    x = x - x.mean()  # centring first limits cancellation in sum(x^2) - sum(x)^2 / n
    num_buckets = x.size
    s1 = np.concatenate([[0.0], np.cumsum(x)])
    s2 = np.concatenate([[0.0], np.cumsum(x * x)])
    i, j, proper = _grid(num_buckets)
    n = np.where(proper, j - i, 1)
    ssd = (s2[j] - s2[i]) - (s1[j] - s1[i]) ** 2 / n
    return np.where(proper, np.maximum(ssd, 0.0), np.inf)


def _normalise_by_max(table: np.ndarray) -> np.ndarray:
    finite = table[np.isfinite(table)]
    peak = finite.max() if finite.size else 0.0
    return table / peak if peak > 0 else table


def interval_cost_table(
    kind: CostKind,
    *,
    snr_db: np.ndarray | None = None,
    loss_mean: np.ndarray | None = None,
    affinity: np.ndarray | None = None,
    affinity_weight: float = 0.5,
    loss_weight: float = 0.5,
    num_groups: int | None = None,
) -> np.ndarray:
    """Cost of every bucket interval ``[i, j)`` for one of docs/METHOD.md step 2's cost kinds.

    Args:
        kind: ``snr`` — ``sum_b |snr_db[b] - snr_db[c]|``, c the group's (lower) median bucket;
            ``loss`` — sum of squared deviations of the normalised loss (``loss_mean`` mapped to
            [0, 1] over all buckets) from the group mean, i.e. size x variance;
            ``affinity`` — ``sum_b (1 - affinity[c, b])`` (= paper's ``-sum_b affinity[c, b]``
            plus a constant B per partition, so the same optimum);
            ``uniform`` — ``(size - B/N)^2`` (needs ``num_groups``), whose optima are the
            balanced partitions; ``combined`` — ``affinity_weight · affinity/max +
            loss_weight · loss/max``, each table divided by its maximum over all intervals.
        snr_db: ``[B]`` SNR in dB per bucket (kind ``snr``).
        loss_mean: ``[B]`` mean eps-loss per bucket (kinds ``loss``, ``combined``).
        affinity: ``[B, B]`` gradient cosine similarity; row c is read for centre c
            (kinds ``affinity``, ``combined``).
        affinity_weight, loss_weight: >= 0, weights of ``combined``.
        num_groups: N, only for ``uniform``.

    Returns:
        ``[B+1, B+1]`` float64; entries with ``i >= j`` are +inf (not an interval).

    Raises:
        ConfigError: unknown kind, negative weights, or ``uniform`` without ``num_groups``.
        ValueError: a needed array is missing, mis-shaped or non-finite.
    """
    if kind not in _COST_KINDS:
        raise ConfigError(f"grouping.cost={kind!r} is not a cost kind; allowed: {', '.join(_COST_KINDS)}")
    sizes = {
        name: (np.shape(arr)[0] if np.ndim(arr) >= 1 else None)
        for name, arr in (("snr_db", snr_db), ("loss_mean", loss_mean), ("affinity", affinity))
        if arr is not None
    }
    if len(set(sizes.values())) > 1:
        raise ValueError(f"profile arrays disagree on the number of buckets B: {sizes}")
    size = next(iter(sizes.values()), None)

    if kind == "snr":
        snr = _vector("snr_db", snr_db, size)
        return _centre_sum_table(np.abs(snr[None, :] - snr[:, None]))
    if kind == "loss":
        return _loss_table(_vector("loss_mean", loss_mean, size))
    if kind == "affinity":
        return _centre_sum_table(1.0 - _matrix("affinity", affinity, size))
    if kind == "uniform":
        if size is None:
            raise ValueError("uniform needs one profile array to know the number of buckets B")
        if num_groups is None or num_groups < 1:
            raise ConfigError(f"num_groups={num_groups!r} must be given (>= 1) for the uniform cost")
        i, j, proper = _grid(size)
        return np.where(proper, (j - i - size / num_groups) ** 2, np.inf)
    # combined
    for name, weight in (("affinity_weight", affinity_weight), ("loss_weight", loss_weight)):
        if not np.isfinite(weight) or weight < 0:
            raise ConfigError(f"grouping.{name}={weight!r} must be a finite number >= 0")
    aff = _normalise_by_max(_centre_sum_table(1.0 - _matrix("affinity", affinity, size)))
    loss = _normalise_by_max(_loss_table(_vector("loss_mean", loss_mean, size)))
    _, _, proper = _grid(aff.shape[0] - 1)
    aff, loss = np.where(proper, aff, 0.0), np.where(proper, loss, 0.0)  # no 0 * inf
    return np.where(proper, affinity_weight * aff + loss_weight * loss, np.inf)


# --- the grouping record -------------------------------------------------------------------


class Grouping(BaseModel):
    """N contiguous timestep groups with a difficulty score and rank each (JSON-friendly).

    ``boundaries`` are timesteps ``0 = t_0 < ... < t_N = T``; group g covers ``[t_g, t_{g+1})``
    and buckets ``[bucket_boundaries[g], bucket_boundaries[g+1])``. ``rank`` is 1 for the
    easiest group ... N for the hardest under ``difficulty_measure`` (higher score = harder).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_timesteps: int                # T
    boundaries: list[int]             # [N+1] timesteps
    bucket_boundaries: list[int]      # [N+1] bucket indices, 0 ... B
    cost_kind: str                    # grouping.cost used
    total_cost: float                 # sum of the cost table over the partition
    difficulty: list[float]           # [N] higher = harder
    difficulty_measure: str           # budget.difficulty used: "loss" or "snr"
    rank: list[int]                   # [N] permutation of 1..N; N = hardest

    @model_validator(mode="after")
    def _consistent(self) -> Grouping:
        t, bb, n = self.boundaries, self.bucket_boundaries, len(self.boundaries) - 1
        if n < 1 or t[0] != 0 or t[-1] != self.num_timesteps or any(a >= b for a, b in zip(t, t[1:])):
            raise ValueError(
                f"boundaries={t} must rise strictly from 0 to num_timesteps={self.num_timesteps}"
            )
        if len(bb) != n + 1 or bb[0] != 0 or any(a >= b for a, b in zip(bb, bb[1:])):
            raise ValueError(f"bucket_boundaries={bb} must rise strictly from 0, one per boundary")
        if len(self.difficulty) != n or sorted(self.rank) != list(range(1, n + 1)):
            raise ValueError(
                f"difficulty and rank need one entry per group (N={n}); rank must be a "
                f"permutation of 1..N, got {self.rank}"
            )
        return self

    @property
    def num_groups(self) -> int:
        """N."""
        return len(self.boundaries) - 1

    def interval(self, g: int) -> tuple[int, int]:
        """Timesteps ``[lo, hi)`` of group g (0-based, in timestep order)."""
        if not 0 <= g < self.num_groups:
            raise ValueError(f"group index {g} outside 0..{self.num_groups - 1}")
        return self.boundaries[g], self.boundaries[g + 1]

    @overload
    def group_of(self, t: int) -> int: ...
    @overload
    def group_of(self, t: np.ndarray) -> np.ndarray: ...

    def group_of(self, t: np.ndarray | int) -> np.ndarray | int:
        """Group index serving each timestep.

        Args:
            t: int or array of any shape, timesteps in ``[0, T)``.

        Returns:
            int for an int, else an int64 array of ``t``'s shape.

        Raises:
            ValueError: some t lies outside ``[0, T)``.
        """
        arr = np.asarray(t)
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_timesteps}), got range "
                f"[{arr.min()}, {arr.max()}]"
            )
        groups = np.searchsorted(np.asarray(self.boundaries), arr, side="right") - 1
        return int(groups) if arr.ndim == 0 else groups.astype(np.int64)


# --- difficulty and the full step ----------------------------------------------------------


def group_difficulty(
    *,
    bucket_edges: np.ndarray,
    bucket_boundaries: list[int],
    snr_db: np.ndarray,
    loss_mean: np.ndarray,
    measure: DifficultyMeasure,
    sensitivity: np.ndarray | None = None,
) -> list[float]:
    """Difficulty score per group, higher = harder (docs/METHOD.md step 3).

    ``loss``: mean normalised eps-loss of the group's buckets; ``snr``: minus the mean SNR_dB
    (low SNR = hard); ``sensitivity``: the mean of ``sensitivity`` ``[B]``, the measured rise of
    the buckets' weighted error per FLOP pruned (:mod:`tdc_core.method.sensitivity`). Means are
    weighted by bucket width in timesteps. Which end of [0, T) is harder differs between loss
    and SNR (eps-loss is usually highest at small t, i.e. high SNR), and the literature
    disagrees, so the measure is a parameter and is logged.

    Returns:
        ``[N]`` plain floats.
    """
    if measure not in _DIFFICULTY_MEASURES:
        raise ConfigError(
            f"budget.difficulty={measure!r} is not a difficulty measure; allowed: "
            f"{', '.join(_DIFFICULTY_MEASURES)}"
        )
    edges = np.asarray(bucket_edges)
    width = np.diff(edges).astype(np.float64)
    if measure == "sensitivity":
        if sensitivity is None:
            raise ConfigError(
                "budget.difficulty=sensitivity needs the profile's pruning sensitivity, and this profile "
                "was made without it (profile.sensitivity_keep unset, or a profile from an older version); "
                "allowed: budget.difficulty=loss or snr, or a new stage 1 with profile.sensitivity_keep set"
            )
        score = _vector("sensitivity", sensitivity, width.size)
    else:
        score = normalised_loss(loss_mean) if measure == "loss" else -np.asarray(snr_db, dtype=np.float64)
    out = []
    for lo, hi in zip(bucket_boundaries[:-1], bucket_boundaries[1:]):
        out.append(float(np.average(score[lo:hi], weights=width[lo:hi])))
    return out


def rank_by_difficulty(difficulty: list[float]) -> list[int]:
    """Ranks 1 (easiest) .. N (hardest); equal scores: the lower group index gets the lower rank."""
    order = sorted(range(len(difficulty)), key=lambda g: (difficulty[g], g))
    rank = [0] * len(difficulty)
    for r, g in enumerate(order, start=1):
        rank[g] = r
    return rank


def _check_edges(bucket_edges: np.ndarray) -> np.ndarray:
    edges = np.asarray(bucket_edges)
    if edges.ndim != 1 or edges.size < 2 or not np.issubdtype(edges.dtype, np.integer):
        raise ValueError(f"bucket_edges must be a [B+1] int array with B >= 1, got {edges.dtype} {edges.shape}")
    if edges[0] != 0 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bucket_edges must rise strictly from 0, got {edges.tolist()}")
    return edges.astype(np.int64)


def group_timesteps(
    *,
    bucket_edges: np.ndarray,
    snr_db: np.ndarray,
    loss_mean: np.ndarray,
    affinity: np.ndarray,
    config: GroupingConfig,
    difficulty: DifficultyMeasure,
    sensitivity: np.ndarray | None = None,
) -> Grouping:
    """Partition ``[0, T)`` into ``config.num_groups`` contiguous groups and rank them.

    Args:
        bucket_edges: ``[B+1]`` ints, ``0 = e_0 < ... < e_B = T``.
        snr_db: ``[B]`` SNR in dB at bucket centres.
        loss_mean: ``[B]`` mean held-out eps-loss per bucket.
        affinity: ``[B, B]`` gradient cosine similarity between buckets.
        config: cost kind, N, minimum group size in buckets, ``combined`` weights.
        difficulty: ``loss``, ``snr`` or ``sensitivity``, what ranks the groups (see
            :func:`group_difficulty`).
        sensitivity: ``[B]`` per-bucket pruning sensitivity, for ``difficulty="sensitivity"``.

    Raises:
        ConfigError: ``num_groups x min_group_buckets > B`` or a bad cost/measure name.
        ValueError: profile arrays mis-shaped, non-finite or inconsistent.
    """
    edges = _check_edges(bucket_edges)
    num_buckets = edges.size - 1
    n, min_size = config.num_groups, config.min_group_buckets
    if n * min_size > num_buckets:
        raise ConfigError(
            f"grouping.num_groups={n} x grouping.min_group_buckets={min_size} = {n * min_size} "
            f"exceeds the profile's number of buckets B={num_buckets}"
        )
    snr = _vector("snr_db", snr_db, num_buckets)
    loss = _vector("loss_mean", loss_mean, num_buckets)
    aff = _matrix("affinity", affinity, num_buckets)

    table = interval_cost_table(
        config.cost,
        snr_db=snr,
        loss_mean=loss,
        affinity=aff,
        affinity_weight=config.affinity_weight,
        loss_weight=config.loss_weight,
        num_groups=n,
    )
    if config.cost == "uniform":
        bucket_bounds = uniform_partition(num_buckets=num_buckets, num_groups=n, min_size=min_size)
    else:
        bucket_bounds = optimal_partition(table, num_groups=n, min_size=min_size)
    scores = group_difficulty(
        bucket_edges=edges, bucket_boundaries=bucket_bounds, snr_db=snr, loss_mean=loss,
        measure=difficulty, sensitivity=sensitivity,
    )
    return Grouping(
        num_timesteps=int(edges[-1]),
        boundaries=[int(edges[b]) for b in bucket_bounds],
        bucket_boundaries=bucket_bounds,
        cost_kind=config.cost,
        total_cost=partition_cost(table, bucket_bounds),
        difficulty=scores,
        difficulty_measure=difficulty,
        rank=rank_by_difficulty(scores),
    )
