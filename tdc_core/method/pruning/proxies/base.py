"""The proxy interface (:class:`Proxy`) and the helpers the proxies share: samples in the allowed
box, log-normal perturbations, the no-memory prior, scaling pruning depths to the target, topping
up a candidate list, and reading the scored entries of the memory bank.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from tdc_core.method.pruning.proxies.projection import _project_rows
from tdc_core.method.pruning.proxies.records import MemoryBank, MemoryEntry, Proposal, ProxyState

__all__ = [
    "Proxy",
]


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
