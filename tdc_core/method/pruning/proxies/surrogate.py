"""The surrogate proxy (the default): a ridge regression of score on the squared pruned fractions
over the memory bank, and the best predicted of many sampled candidates that meet the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tdc_core.method.pruning.proxies.base import (
    _around,
    _box_samples,
    _deepen,
    _fill_up,
    _prior,
    _scored,
    _within_round_ranks,
)
from tdc_core.method.pruning.proxies.projection import _project, _project_rows
from tdc_core.method.pruning.proxies.records import MemoryBank, Proposal, ProxyState

__all__ = [
    "SurrogateProxy",
]


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
