"""The evolutionary proxy: crossover and mutation of the best-scored entries' pruning depths."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tdc_core.method.pruning.proxies.base import _box_samples, _deepen, _fill_up, _prior, _scored, _within_round_ranks
from tdc_core.method.pruning.proxies.projection import _project_rows
from tdc_core.method.pruning.proxies.records import MemoryBank, Proposal, ProxyState

__all__ = [
    "EvolutionaryProxy",
]


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
