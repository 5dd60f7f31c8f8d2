"""Pruning proxies and the memory bank (docs/METHOD.md step 5).

In every round of the progressive search a *proxy* proposes candidate keep ratios, one per
unit (see :mod:`tdc_core.method.pruning.structure`), for the round's FLOPs target; the search scores them and
keeps the best. The :class:`MemoryBank` holds every proposal of every round with its FLOPs,
score and whether it was accepted; it is each proxy's input in the next round, it serialises to
JSON, and :class:`ReplayProxy` re-proposes a recorded run's candidates exactly.

Proxies (one interface, :class:`Proxy`, ``propose(state, memory) -> list[Proposal]``):

* :class:`SurrogateProxy` (default): ridge regression of score on the squared pruned fractions
  ``(1 − keep)²`` over the memory bank (with a free intercept per round, so only within-round
  differences teach it), then the best predicted of many sampled candidates that meet the
  target (including the model's own constrained optimum), plus a few prior samples for
  exploration. Empty memory: a prior around uniform pruning.
* :class:`EvolutionaryProxy`: crossover and mutation of the best-scored entries' pruning depths.
* :class:`RandomProxy`: uniform samples in the allowed box (ablation baseline).
* :class:`LLMProxy`: an OpenAI-compatible ``/chat/completions`` endpoint; the answer is parsed,
  validated and projected; any failure falls back to the surrogate with the reason recorded.

Every proposal is *projected* onto the round's target (:func:`project_to_budget`). A proposal
whose rounded widths already cost ``target · [1 − tol, 1]`` is kept as is. Otherwise a global
multiplier on its keep ratios, clipped per unit to ``[min width, current width]`` (channels
cannot grow back), is found by bisection (largest with FLOPs ≤ target); whole quanta are then
added back greedily where rounding took most, and if coarse quanta still leave the FLOPs below
the band, one add (or add-and-remove) move lands inside it. FLOPs therefore end in
``target · [1 − tol, 1 + tol]`` (above the target only when no width combination reachable by
that move is below it) and never above ``target · (1 + tol)``.

Randomness: each proxy draws from ``numpy.random.default_rng([seed, round, salt])``, so the
same seed gives the same proposals (the LLM's answers are recorded, not reproducible).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tdc_core.config import PruneConfig
from tdc_core.errors import ConfigError
from tdc_core.method.pruning.structure import PruneSpace, Unit
from tdc_core.records import load_record, save_record

__all__ = [
    "EvolutionaryProxy",
    "LLMProxy",
    "MemoryBank",
    "MemoryEntry",
    "Proposal",
    "Proxy",
    "ProxyState",
    "RandomProxy",
    "ReplayProxy",
    "RoundRecord",
    "SurrogateProxy",
    "make_proxy",
    "project_many",
    "project_to_budget",
]


# --- records ---------------------------------------------------------------------------------------


class Proposal(BaseModel):
    """One candidate for a round, after projection onto the round's target."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    proposal: list[float]          # [U] keep ratios as the proxy proposed them (before projection)
    keep: list[float]              # [U] realised keep ratios (widths / dense widths)
    widths: list[int]              # [U] unit widths
    flops: float                   # forward FLOPs per image (exact, from the unit table)
    within_tolerance: bool         # |flops − target| ≤ tolerance · target
    proxy: str                     # the proxy that produced it ("surrogate" after an LLM fallback)
    fallback_reason: str | None = None  # why the requested proxy was not used, if it was not


class MemoryEntry(BaseModel):
    """A scored candidate of one round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int                     # 1-based
    candidate: int                 # 0-based index within the round
    proxy: str
    proposal: list[float]          # [U] as proposed
    keep: list[float]              # [U] realised keep ratios
    widths: list[int]              # [U]
    flops: float                   # forward FLOPs per image
    target_flops: float            # the round's target
    score: float | None            # held-out ε-MSE on the group's timesteps (lower is better)
    accepted: bool
    fallback_reason: str | None = None


class RoundRecord(BaseModel):
    """The decision of one round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int
    target_flops: float
    proxy: str                     # requested proxy
    proxies_used: list[str]        # proxies that produced this round's candidates
    fallback_reason: str | None    # why the requested proxy was (partly) not used
    accepted: int                  # index of the accepted candidate
    flops: float                   # FLOPs per image of the accepted model (counted)
    score: float                   # its score before recovery
    recovered_score: float | None  # its score after the recovery fine-tune (None: no recovery)
    recovery_steps: int


class MemoryBank(BaseModel):
    """Everything a pruning search decided, JSON-serialisable (inspect, plot, replay)."""

    model_config = ConfigDict(extra="forbid")

    units: list[Unit]              # what the keep/width vectors index
    dense_flops: float             # F, forward FLOPs per image of the dense model
    budget_flops: float            # the group's budget
    tolerance: float
    proxy: str
    importance: str
    seed: int
    t_range: tuple[int, int] | None = None  # the group's timesteps [lo, hi)
    score_before: float | None = None  # score of the model the search started from
    flops: float | None = None     # counted FLOPs per image of the final model (when finished)
    search_flops: float | None = None  # compute the search spent, FLOPs (when finished)
    entries: list[MemoryEntry] = Field(default_factory=list)
    rounds: list[RoundRecord] = Field(default_factory=list)

    def round_entries(self, round: int) -> list[MemoryEntry]:
        return [e for e in self.entries if e.round == round]

    def save(self, path: str | Path) -> Path:
        return save_record(path, self)

    @classmethod
    def load(cls, path: str | Path) -> MemoryBank:
        return load_record(path, cls, what="pruning memory bank")


# --- the state a proxy sees ---------------------------------------------------------------------


class ProxyState(BaseModel):
    """What a proxy knows when it proposes: the unit table, where the model is, the target."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=1)       # 1-based
    rounds: int = Field(ge=1)
    space: PruneSpace              # units (dense widths, quanta, FLOPs per channel) + fixed FLOPs
    current_widths: list[int]      # [U] widths of the model being pruned (upper bounds)
    lower_widths: list[int]        # [U] smallest allowed widths (= current for frozen units)
    target_flops: float            # this round's target, FLOPs per image
    budget_flops: float            # the final target
    tolerance: float               # relative FLOPs tolerance
    num_candidates: int = Field(ge=1)
    seed: int

    @property
    def dense_flops(self) -> float:
        return self.space.dense_flops

    @property
    def current_flops(self) -> float:
        return self.space.flops(self.current_widths)

    @property
    def lower_keep(self) -> np.ndarray:
        return np.asarray(self.lower_widths, dtype=np.float64) / self.space.dense_widths

    @property
    def upper_keep(self) -> np.ndarray:
        return np.asarray(self.current_widths, dtype=np.float64) / self.space.dense_widths

    def rng(self, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.round, salt])


# --- projection onto the budget -------------------------------------------------------------------


def _round_widths(keep: np.ndarray, *, space: PruneSpace, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """``[M x U]`` keep → int64 widths: nearest multiple of each quantum, clipped to [lower, upper]."""
    d, q = space.dense_widths, space.quanta
    w = q * np.floor(keep * d / q + 0.5).astype(np.int64)
    return np.clip(w, lower, upper)


def project_many(
    proposals: np.ndarray, *, space: PruneSpace, lower_widths: Sequence[int], upper_widths: Sequence[int],
    target_flops: float, tolerance: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Project proposals onto the FLOPs target (see the module docstring).

    Args:
        proposals: float ``[M x U]`` keep ratios (fractions of the dense widths).
        lower_widths, upper_widths: ``[U]`` allowed width range per unit (multiples of quanta).
        target_flops: FLOPs per image to reach; tolerance: relative.

    Returns:
        (widths int64 ``[M x U]``, FLOPs float64 ``[M]``). A row whose FLOPs still exceed
        ``target · (1 + tolerance)`` sits at ``lower_widths`` (the target is out of reach).
    """
    p = np.atleast_2d(np.asarray(proposals, dtype=np.float64))
    d = space.dense_widths.astype(np.float64)
    lo_w, up_w = np.asarray(lower_widths, dtype=np.int64), np.asarray(upper_widths, dtype=np.int64)
    if p.shape[1] != len(d) or lo_w.shape != up_w.shape or len(lo_w) != len(d) or (lo_w > up_w).any():
        raise ValueError("proposals, lower_widths and upper_widths must all have one entry per unit, lower ≤ upper")
    if not np.isfinite(p).all():
        raise ValueError("proposals must be finite")
    lo_k, up_k = lo_w / d, up_w / d
    p = np.clip(p, lo_k, up_k)
    hi_t, lo_t = target_flops * (1 + tolerance), target_flops * (1 - tolerance)
    widths = _round_widths(p, space=space, lower=lo_w, upper=up_w)
    flops = space.flops(widths)
    # Rows already in [target·(1 − tol), target] stay as proposed; above the target is allowed
    # only where whole quanta leave no closer choice (see _fill).
    todo = ~((flops >= lo_t) & (flops <= target_flops))
    if not todo.any():
        return widths, flops
    # Bisection on a global multiplier s: FLOPs(clip(s·p)) is non-decreasing in s.
    pt = np.maximum(p[todo], 1e-12)
    s_lo = np.zeros(len(pt))
    s_hi = np.max(up_k / pt, axis=1) * (1 + 1e-9)
    for _ in range(48):
        mid = (s_lo + s_hi) / 2
        f = space.flops(_round_widths(mid[:, None] * pt, space=space, lower=lo_w, upper=up_w))
        ok = f <= target_flops
        s_lo = np.where(ok, mid, s_lo)
        s_hi = np.where(ok, s_hi, mid)
    w_t = _round_widths(s_lo[:, None] * pt, space=space, lower=lo_w, upper=up_w)
    want = s_lo[:, None] * pt * d  # the unrounded widths the multiplier asks for
    for row in range(len(w_t)):
        w_t[row] = _fill(w_t[row], want=want[row], space=space, lower=lo_w, upper=up_w, target=target_flops,
                         hi=hi_t, lo=lo_t)
    widths[todo] = w_t
    return widths, space.flops(widths)


def _fill(w: np.ndarray, *, want: np.ndarray, space: PruneSpace, lower: np.ndarray, upper: np.ndarray,
          target: float, hi: float, lo: float) -> np.ndarray:
    """Land in the tolerance band, preferring FLOPs ≤ target.

    1. Add whole quanta back where rounding took most (``want − w``), staying ≤ target.
    2. Still below the band (coarse quanta): the single move (add a quantum to one unit, or add
       to one and remove from another) that ends closest below the target inside the band; if
       none exists, the one that ends closest above it, up to ``hi``.
    """
    w = w.copy()
    q, a = space.quanta, space.slopes
    f = space.flops(w)
    step = a * q
    deficit = (want - w) / q
    eps = 1e-9 * target
    while True:
        room = (w + q <= upper) & (f + step <= target + eps)
        if not room.any():
            break
        i = int(np.argmax(np.where(room, deficit, -np.inf)))
        w[i] += q[i]
        f += step[i]
        deficit[i] -= 1
    if f >= lo - eps:
        return w
    can_add, can_remove = w + q <= upper, w - q >= lower
    # new FLOPs after "add i" (diagonal) or "add i, remove j" (off-diagonal)
    moved = f + step[:, None] - np.where(np.eye(len(w), dtype=bool), 0.0, step[None, :])
    legal = can_add[:, None] & (np.eye(len(w), dtype=bool) | can_remove[None, :])
    for band_lo, band_hi, pick in ((lo - eps, target + eps, np.argmax), (target, hi + eps, np.argmin)):
        ok = legal & (moved >= band_lo) & (moved <= band_hi)
        if ok.any():
            flat = int(pick(np.where(ok, moved, -np.inf if pick is np.argmax else np.inf)))
            i, j = divmod(flat, len(w))
            w[i] += q[i]
            if i != j:
                w[j] -= q[j]
            break
    return w


def project_to_budget(proposal: Sequence[float], *, state: ProxyState, proxy: str,
                      fallback_reason: str | None = None) -> Proposal:
    """One proposal projected onto ``state``'s target (see :func:`project_many`)."""
    raw = np.asarray(proposal, dtype=np.float64)
    w, f = project_many(raw[None], space=state.space, lower_widths=state.lower_widths,
                        upper_widths=state.current_widths, target_flops=state.target_flops,
                        tolerance=state.tolerance)
    return _proposal(raw, w[0], float(f[0]), state=state, proxy=proxy, fallback_reason=fallback_reason)


def _proposal(raw: np.ndarray, widths: np.ndarray, flops: float, *, state: ProxyState, proxy: str,
              fallback_reason: str | None) -> Proposal:
    return Proposal(
        proposal=[float(x) for x in raw], keep=state.space.keep_of(widths), widths=[int(x) for x in widths],
        flops=flops, within_tolerance=abs(flops - state.target_flops) <= state.tolerance * state.target_flops + 1e-6,
        proxy=proxy, fallback_reason=fallback_reason,
    )


def _project(rows: np.ndarray, state: ProxyState) -> tuple[np.ndarray, np.ndarray]:
    return project_many(rows, space=state.space, lower_widths=state.lower_widths,
                        upper_widths=state.current_widths, target_flops=state.target_flops,
                        tolerance=state.tolerance)


def _project_rows(rows: np.ndarray, *, state: ProxyState, proxy: str, n: int,
                  fallback_reason: str | None = None, order: np.ndarray | None = None,
                  projected: tuple[np.ndarray, np.ndarray] | None = None) -> list[Proposal]:
    """Project ``rows`` (unless ``projected`` already holds their widths and FLOPs) and keep the
    first ``n`` with distinct widths (in ``order`` if given)."""
    w, f = projected if projected is not None else _project(rows, state)
    out: list[Proposal] = []
    seen: set[tuple[int, ...]] = set()
    for i in (order if order is not None else range(len(rows))):
        key = tuple(int(x) for x in w[i])
        if key in seen:
            continue
        seen.add(key)
        out.append(_proposal(rows[i], w[i], float(f[i]), state=state, proxy=proxy, fallback_reason=fallback_reason))
        if len(out) == n:
            break
    return out


# --- proxies ---------------------------------------------------------------------------------------


class Proxy(Protocol):
    """Proposes ``state.num_candidates`` (or fewer, if the space is that small) candidates, each
    already projected onto ``state.target_flops``."""

    name: str

    def propose(self, state: ProxyState, memory: MemoryBank) -> list[Proposal]: ...


def _box_samples(state: ProxyState, n: int, rng: np.random.Generator) -> np.ndarray:
    """``[n x U]`` keep ratios uniform in [lower, current] per unit."""
    lo, up = state.lower_keep, state.upper_keep
    return lo + rng.random((n, len(lo))) * (up - lo)


def _around(base: np.ndarray, state: ProxyState, n: int, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """``[n x U]`` log-normal perturbations of ``base``, clipped to the allowed box."""
    rows = base[None] * np.exp(sigma * rng.standard_normal((n, len(base))))
    return np.clip(rows, state.lower_keep, state.upper_keep)


def _deepen(rows: np.ndarray, state: ProxyState) -> np.ndarray:
    """Scale each row's pruning *depth* (``upper − keep``) by one factor per row so that its
    (unrounded) FLOPs meet the target: units a row leaves whole stay whole and the cut falls on
    the units it already prunes, unlike a multiplier on the keep ratios, which cuts every unit
    alike. ``[M x U]`` → ``[M x U]``; rows that prune nothing are returned unchanged."""
    lo, up = state.lower_keep, state.upper_keep
    cost = state.space.slopes * state.space.dense_widths
    spare = state.target_flops - state.space.fixed_flops
    depth = np.clip(up - rows, 0.0, None)
    t_lo, t_hi = np.zeros(len(rows)), np.full(len(rows), 1e6)
    for _ in range(80):
        mid = (t_lo + t_hi) / 2
        over = np.clip(up - mid[:, None] * depth, lo, up) @ cost > spare
        t_lo, t_hi = np.where(over, mid, t_lo), np.where(over, t_hi, mid)
    out = np.clip(up - t_hi[:, None] * depth, lo, up)
    return np.where(depth.any(axis=1, keepdims=True), out, rows)


def _prior(state: ProxyState, n: int, rng: np.random.Generator) -> np.ndarray:
    """The no-memory prior: uniform pruning (every unit scaled alike) first, then log-normal
    perturbations of it, so the first round already explores which units can go."""
    up = state.upper_keep
    return np.vstack([up[None], _around(up, state, max(4 * n, 16), rng, sigma=0.35)])


def _fill_up(out: list[Proposal], extra: np.ndarray, *, state: ProxyState, proxy: str,
             fallback_reason: str | None = None) -> list[Proposal]:
    """Append distinct projections of ``extra`` rows until ``num_candidates`` are reached."""
    seen = {tuple(p.widths) for p in out}
    for p in _project_rows(extra, state=state, proxy=proxy, n=len(extra), fallback_reason=fallback_reason):
        if len(out) >= state.num_candidates:
            break
        if tuple(p.widths) not in seen:
            seen.add(tuple(p.widths))
            out.append(p)
    return out


@dataclass(frozen=True)
class RandomProxy:
    """Uniform random keep ratios in the allowed box, projected (the ablation baseline)."""

    name: ClassVar[str] = "random"

    def propose(self, state: ProxyState, memory: MemoryBank) -> list[Proposal]:
        rng = state.rng(salt=1)
        rows = _box_samples(state, max(8 * state.num_candidates, 32), rng)
        return _project_rows(rows, state=state, proxy=self.name, n=state.num_candidates)


def _scored(memory: MemoryBank) -> list[MemoryEntry]:
    return [e for e in memory.entries if e.score is not None and math.isfinite(e.score)]


def _within_round_ranks(entries: list[MemoryEntry]) -> np.ndarray:
    """Each entry's rank within its round scaled to [0, 1] (0 = that round's best): rounds start
    from different models, so only within-round comparisons are meaningful."""
    out = np.zeros(len(entries))
    for r in {e.round for e in entries}:
        idx = [i for i, e in enumerate(entries) if e.round == r]
        order = sorted(idx, key=lambda i: (entries[i].score, entries[i].candidate))
        for rank, i in enumerate(order):
            out[i] = rank / max(len(idx) - 1, 1)
    return out


@dataclass(frozen=True)
class SurrogateProxy:
    """A cheap regression of score on keep ratios over the memory bank; proposes the best
    predicted of ``num_samples`` sampled candidates (distinct widths), keeping a share
    ``explore`` of the candidates for prior samples so that the regression keeps learning.

    Model: ``score = b_round + Σ_i c_i · (1 − keep_i)²``: the loss grows convexly as a unit
    loses channels (the least important go first), with a free intercept per round (rounds start
    from different models; fitted by demeaning within rounds) and a ridge penalty
    ``ridge · trace(XᵀX) / U`` (scale-free). Candidates: the model's own optimum under the FLOPs
    target (``keep_i = 1 − λ·cost_i / (2 c_i)`` clipped to the allowed box, λ by bisection) and
    perturbations of it, perturbations of the best entries so far, and prior samples. Without
    two scored entries of one round: the prior (uniform pruning, then perturbations of it).
    """

    num_samples: int = 512
    ridge: float = 0.05
    explore: float = 0.25
    name: ClassVar[str] = "surrogate"

    def fit(self, state: ProxyState, memory: MemoryBank) -> np.ndarray | None:
        """c ``[U]`` (score increase per squared pruned fraction of each unit), or None when the
        memory has no within-round variety to learn from."""
        entries = [e for e in _scored(memory) if len(e.keep) == len(state.space.units)]
        if len(entries) < 2:
            return None
        x = (1.0 - np.array([e.keep for e in entries], dtype=np.float64)) ** 2
        y = np.array([e.score for e in entries], dtype=np.float64)
        rounds = np.array([e.round for e in entries])
        for r in np.unique(rounds):
            m = rounds == r
            x[m] -= x[m].mean(axis=0)
            y[m] -= y[m].mean()
        gram = x.T @ x
        if not np.any(gram) or not np.any(y):
            return None
        lam = self.ridge * np.trace(gram) / len(gram)
        return np.linalg.solve(gram + lam * np.eye(len(gram)), x.T @ y)

    def predict(self, coef: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Predicted score (up to the round's intercept) of keep ratios ``[M x U]`` → ``[M]``."""
        return ((1.0 - keep) ** 2) @ coef

    def propose(self, state: ProxyState, memory: MemoryBank) -> list[Proposal]:
        rng = state.rng(salt=2)
        n = state.num_candidates
        coef = self.fit(state, memory)
        if coef is None:
            return _project_rows(_prior(state, n, rng), state=state, proxy=self.name, n=n)
        n_explore = int(math.floor(self.explore * n)) if n > 1 else 0
        optimum = _model_optimum(coef, state)
        quarter = max(self.num_samples // 4, 1)
        pool = [optimum[None], _around(optimum, state, quarter, rng, sigma=0.15),
                _box_samples(state, quarter, rng), _around(state.upper_keep, state, quarter, rng, sigma=0.35)]
        entries = [e for e in _scored(memory) if len(e.keep) == len(state.space.units)]
        ranks = _within_round_ranks(entries)
        best = [entries[i] for i in np.argsort(ranks, kind="stable")[:4]]
        for e in best:
            base = np.minimum(np.asarray(e.keep), state.upper_keep)
            pool.append(_around(base, state, max(quarter // len(best), 1), rng, sigma=0.2))
            pool.append(_deepen(base[None], state))
        rows = np.vstack(pool)
        w, f = _project(rows, state)
        order = np.argsort(self.predict(coef, w / state.space.dense_widths), kind="stable")
        out = _project_rows(rows, state=state, proxy=self.name, n=n - n_explore, order=order, projected=(w, f))
        return _fill_up(out, _box_samples(state, 8 * n + 16, rng), state=state, proxy=self.name)


def _model_optimum(coef: np.ndarray, state: ProxyState) -> np.ndarray:
    """``argmin Σ c_i (1 − k_i)²`` s.t. FLOPs(k) = target, k in the allowed box (continuous).

    KKT: ``k_i = 1 − λ·cost_i / (2 c_i)`` clipped to ``[lower_i, upper_i]``, with λ ≥ 0 found by
    bisection; a unit with ``c_i ≤ 0`` (pruning it does not hurt) goes to its lower bound.
    """
    lo, up = state.lower_keep, state.upper_keep
    cost = state.space.slopes * state.space.dense_widths  # FLOPs per unit of keep ratio
    c = np.maximum(coef, 0.0)
    spare = state.target_flops - state.space.fixed_flops

    def keep(lam: float) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            k = np.where(c > 0, 1.0 - lam * cost / (2 * c), -np.inf)
        return np.clip(k, lo, up)

    lam_lo, lam_hi = 0.0, 1.0
    while keep(lam_hi) @ cost > spare and lam_hi < 1e300:
        lam_hi *= 4.0
    for _ in range(100):
        mid = (lam_lo + lam_hi) / 2
        lam_lo, lam_hi = (mid, lam_hi) if keep(mid) @ cost > spare else (lam_lo, mid)
    return keep(lam_hi)


@dataclass(frozen=True)
class EvolutionaryProxy:
    """Children of the best-scored entries (within-round rank, latest round first): uniform
    crossover of two parents' pruning depths plus log-normal mutation (and rare new cuts); each
    child's pruning depth is then scaled
    to the round's target (the cut deepens where the child already prunes) and projected. The
    best parent itself comes first. Empty memory: the surrogate's prior."""

    parents: int = 4
    mutation: float = 0.15
    name: ClassVar[str] = "evolutionary"

    def propose(self, state: ProxyState, memory: MemoryBank) -> list[Proposal]:
        rng = state.rng(salt=3)
        n = state.num_candidates
        entries = [e for e in _scored(memory) if len(e.keep) == len(state.space.units)]
        if not entries:
            return _project_rows(_prior(state, n, rng), state=state, proxy=self.name, n=n)
        ranks = _within_round_ranks(entries)
        order = np.lexsort((-np.array([e.round for e in entries]), ranks))  # best rank, latest round first
        up, lo = state.upper_keep, state.lower_keep
        # Genes are pruning depths below the current widths: a unit a parent leaves whole stays
        # whole unless a (rare) new cut hits it, so mutation does not erode what scored well.
        depths = np.array([up - np.minimum(entries[i].keep, up) for i in order[: self.parents]])
        children = [depths[0]]
        units = len(up)
        for _ in range(8 * n):
            a, b = depths[rng.integers(len(depths))], depths[rng.integers(len(depths))]
            child = np.where(rng.random(units) < 0.5, a, b) * np.exp(self.mutation * rng.standard_normal(units))
            children.append(child + (rng.random(units) < 1.0 / units) * 0.1 * (up - lo))
        rows = np.clip(up - np.array(children), lo, up)
        # The round's deeper cut goes where each child already prunes.
        out = _project_rows(_deepen(rows, state), state=state, proxy=self.name, n=n)
        return _fill_up(out, _box_samples(state, 8 * n + 16, rng), state=state, proxy=self.name)


@dataclass(frozen=True)
class ReplayProxy:
    """Re-proposes the candidates a recorded run proposed in the same round (its realised keep
    ratios), so a run (also an LLM-guided one) can be replayed exactly from its memory bank."""

    recorded: MemoryBank
    name: ClassVar[str] = "replay"

    def propose(self, state: ProxyState, memory: MemoryBank) -> list[Proposal]:
        rows = self.recorded.round_entries(state.round)
        if not rows:
            raise ValueError(f"the recorded memory bank has no round {state.round}")
        out = []
        for e in sorted(rows, key=lambda e: e.candidate):
            w = np.asarray(e.widths)
            fits = w.shape == (len(state.space.units),) and (w >= state.lower_widths).all()
            if not fits or (w > state.current_widths).any():
                raise ValueError(f"recorded round {state.round} candidate {e.candidate} does not fit the current model")
            out.append(_proposal(np.asarray(e.proposal), w, state.space.flops(w), state=state, proxy=e.proxy,
                                 fallback_reason=e.fallback_reason))
        return out


# --- the LLM proxy -----------------------------------------------------------------------------------

_MAX_RESPONSE_BYTES = 1 << 20
_MAX_REASON_CHARS = 300
_MAX_MEMORY_IN_PROMPT = 64

_SYSTEM_PROMPT = (
    "You are the pruning proxy of a diffusion-model UNet. Each unit is the inner channel width of "
    "a residual block or of an attention block. You choose, per unit, a keep ratio (fraction of the "
    "unit's dense width) so that the model's FLOPs meet a target while its held-out denoising loss "
    "(score, lower is better) stays as low as possible. Learn from the memory of earlier "
    "candidates. Answer with JSON only."
)


class _LLMFailure(Exception):
    """The LLM could not be used; the message is the (redacted) reason recorded in the memory."""


@dataclass(frozen=True)
class LLMProxy:
    """Asks an OpenAI-compatible chat endpoint for candidates; falls back to ``fallback``.

    Args:
        url: base URL (``…/v1``) or the full ``…/chat/completions`` URL; http(s) only.
        model: the endpoint's model name.
        api_key_env: NAME of the environment variable holding the key. The key is read at each
            call, sent only in the ``Authorization`` header, and redacted from every recorded
            reason; it is never stored.
        timeout_s: socket timeout of the request (connect and each read; a server that keeps
            trickling bytes can take longer in total).
        max_overshoot: an answer whose FLOPs (clipped to the allowed ranges, before projection)
            exceed ``target · (1 + max_overshoot)`` is rejected as over budget; None: the
            state's tolerance. Answers within it are projected onto the target.
        environ: where to read the key (None: ``os.environ`` at call time).

    The prompt holds the unit table (name, kind, dense/current/minimum width, quantum, FLOPs per
    channel, share of the dense FLOPs), the FLOPs formula, the round's target and the memory bank
    (last 64 entries). The answer must contain ``{"candidates": [...]}`` where each candidate is a
    list of keep ratios in unit order or an object ``{unit name: keep ratio}`` (missing units keep
    their current width).
    """

    url: str
    model: str
    api_key_env: str
    timeout_s: float
    max_overshoot: float | None = None
    fallback: Proxy = field(default_factory=SurrogateProxy)
    environ: Mapping[str, str] | None = None
    name: ClassVar[str] = "llm"

    def propose(self, state: ProxyState, memory: MemoryBank) -> list[Proposal]:
        key = (self.environ if self.environ is not None else os.environ).get(self.api_key_env, "")
        try:
            if not key:
                raise _LLMFailure(f"environment variable {self.api_key_env} is not set or empty")
            content = self._ask(state, memory, key)
            rows = self._parse(content, state)
            valid, reasons = self._check(rows, state)
        except Exception as exc:  # noqa: BLE001 - any failure of the optional LLM falls back
            reason = str(exc) if isinstance(exc, _LLMFailure) else f"unexpected {type(exc).__name__}: {exc}"
            reason = _redact(reason, key)
            return [p.model_copy(update={"fallback_reason": reason})
                    for p in self.fallback.propose(state, memory)]
        out = _project_rows(np.array(valid), state=state, proxy=self.name, n=state.num_candidates)
        if len(out) < state.num_candidates:
            reason = _redact(f"llm gave {len(out)} usable of {state.num_candidates} candidates"
                             + (f" ({reasons[0]})" if reasons else ""), key)
            seen = {tuple(p.widths) for p in out}
            for p in self.fallback.propose(state, memory):
                if len(out) < state.num_candidates and tuple(p.widths) not in seen:
                    seen.add(tuple(p.widths))
                    out.append(p.model_copy(update={"fallback_reason": reason}))
        return out

    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    def prompt(self, state: ProxyState, memory: MemoryBank) -> str:
        """The user message: unit table, target, FLOPs formula and memory bank, as JSON."""
        space = state.space
        dense = state.dense_flops
        units = [
            {"name": u.name, "kind": u.kind, "dense_width": u.dense_width, "current_width": int(c),
             "min_width": int(lo), "quantum": u.quantum, "flops_per_channel": u.flops_per_channel,
             "dense_flops_share": round(u.flops_per_channel * u.dense_width / dense, 4)}
            for u, c, lo in zip(space.units, state.current_widths, state.lower_widths)
        ]
        recent = memory.entries[-_MAX_MEMORY_IN_PROMPT:]
        mem = [{"round": e.round, "keep": [round(k, 3) for k in e.keep], "flops_fraction": round(e.flops / dense, 4),
                "score": e.score, "accepted": e.accepted} for e in recent]
        body = {
            "round": state.round, "rounds": state.rounds,
            "target_flops": state.target_flops, "target_fraction_of_dense": round(state.target_flops / dense, 4),
            "final_budget_fraction_of_dense": round(state.budget_flops / dense, 4),
            "current_fraction_of_dense": round(state.current_flops / dense, 4),
            "tolerance": state.tolerance,
            "flops_formula": "flops = fixed_flops + sum_i flops_per_channel_i * width_i, "
                             "width_i = keep_i * dense_width_i rounded to a multiple of quantum_i, "
                             "between min_width_i and current_width_i",
            "fixed_flops": space.fixed_flops, "dense_flops": dense, "units": units, "memory": mem,
            "answer_format": {"candidates": f"list of {state.num_candidates} candidates; each a list of "
                                            f"{len(units)} keep ratios in unit order (0..1)"},
        }
        return json.dumps(body)

    def _ask(self, state: ProxyState, memory: MemoryBank, key: str) -> str:
        url = self.endpoint()
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise _LLMFailure("prune.llm_url must be an http(s) URL")
        payload = {"model": self.model, "temperature": 0,
                   "messages": [{"role": "system", "content": _SYSTEM_PROMPT},
                                {"role": "user", "content": self.prompt(state, memory)}]}
        request = urllib.request.Request(
            url, data=json.dumps(payload).encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read(_MAX_RESPONSE_BYTES)
        except urllib.error.HTTPError as exc:
            raise _LLMFailure(f"endpoint answered HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise _LLMFailure(f"no answer within {self.timeout_s:g} s (timeout)") from None
            raise _LLMFailure(f"cannot reach the endpoint: {exc.reason}") from None
        except TimeoutError:
            raise _LLMFailure(f"no answer within {self.timeout_s:g} s (timeout)") from None
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise _LLMFailure(f"request failed: {type(exc).__name__}: {exc}") from None
        try:
            message = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _LLMFailure(f"response is not an OpenAI chat completion: {raw[:120]!r}") from None
        if not isinstance(message, str):
            raise _LLMFailure("response message content is not text")
        return message

    @staticmethod
    def _parse(content: str, state: ProxyState) -> list[np.ndarray]:
        """Answer text → raw keep vectors ``[U]`` (validated: shape, names, finite values in [0, 1])."""
        text = re.sub(r"^```(?:json)?|```$", "", content.strip(), flags=re.MULTILINE).strip()
        start, end = text.find("{"), text.rfind("}")
        try:
            answer = json.loads(text[start:end + 1]) if 0 <= start < end else None
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get("candidates"), list) or not answer["candidates"]:
            raise _LLMFailure(f"invalid answer (no JSON object with a non-empty 'candidates' list): {content[:120]!r}")
        names = state.space.names
        current = state.upper_keep
        rows = []
        for i, cand in enumerate(answer["candidates"]):
            if isinstance(cand, dict) and isinstance(cand.get("keep"), (list, dict)):
                cand = cand["keep"]
            if isinstance(cand, dict):
                unknown = sorted(set(cand) - set(names))
                if unknown:
                    raise _LLMFailure(f"invalid answer: candidate {i} names unknown units {unknown[:3]}")
                values = [cand.get(n, current[j]) for j, n in enumerate(names)]
            elif isinstance(cand, list):
                if len(cand) != len(names):
                    raise _LLMFailure(f"invalid answer: candidate {i} has {len(cand)} ratios, expected {len(names)}")
                values = cand
            else:
                raise _LLMFailure(f"invalid answer: candidate {i} is neither a list nor an object")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1
                       for v in values):
                raise _LLMFailure(f"invalid answer: candidate {i} has keep ratios outside [0, 1] or non-numbers")
            rows.append(np.asarray(values, dtype=np.float64))
        return rows

    def _check(self, rows: list[np.ndarray], state: ProxyState) -> tuple[list[np.ndarray], list[str]]:
        """Split into rows within the budget and reasons for the rejected ones.

        Raises:
            _LLMFailure: every row is over budget.
        """
        over = state.tolerance if self.max_overshoot is None else self.max_overshoot
        lo, up = state.lower_keep, state.upper_keep
        valid, reasons = [], []
        for i, row in enumerate(rows):
            clipped = np.clip(row, lo, up)
            w = _round_widths(clipped[None], space=state.space, lower=np.asarray(state.lower_widths),
                              upper=np.asarray(state.current_widths))[0]
            f = state.space.flops(w)
            if f > state.target_flops * (1 + over):
                reasons.append(f"over budget: candidate {i} needs {f / state.dense_flops:.3f} F, target "
                               f"{state.target_flops / state.dense_flops:.3f} F")
            else:
                valid.append(row)
        if not valid:
            raise _LLMFailure(reasons[0] + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""))
        return valid, reasons


def _redact(text: str, key: str) -> str:
    text = text.replace(key, "[redacted]") if key else text
    return text[:_MAX_REASON_CHARS]


# --- factory -------------------------------------------------------------------------------------


def make_proxy(config: PruneConfig, *, environ: Mapping[str, str] | None = None) -> Proxy:
    """The proxy named by ``prune.proxy``.

    Raises:
        ConfigError: ``proxy=llm`` without ``prune.llm_url``.
    """
    if config.proxy == "surrogate":
        return SurrogateProxy()
    if config.proxy == "evolutionary":
        return EvolutionaryProxy()
    if config.proxy == "random":
        return RandomProxy()
    if config.proxy == "llm":
        if not config.llm_url:
            raise ConfigError("prune.proxy=llm needs prune.llm_url (an OpenAI-compatible endpoint)")
        return LLMProxy(url=config.llm_url, model=config.llm_model, api_key_env=config.llm_api_key_env,
                        timeout_s=config.llm_timeout_s, environ=environ)
    raise ConfigError(f"prune.proxy={config.proxy!r}; allowed: surrogate, evolutionary, random, llm")
