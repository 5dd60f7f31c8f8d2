"""The random proxy: uniform keep ratios in the allowed box (the ablation baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tdc_core.method.pruning.proxies.base import _box_samples
from tdc_core.method.pruning.proxies.projection import _project_rows
from tdc_core.method.pruning.proxies.records import MemoryBank, Proposal, ProxyState

__all__ = [
    "RandomProxy",
]


@dataclass(frozen=True)
class RandomProxy:
    """Uniform random keep ratios in the allowed box, projected (the ablation baseline)."""

    name: ClassVar[str] = "random"

    def propose(self, state: ProxyState, memory: MemoryBank) -> list[Proposal]:
        rng = state.rng(salt=1)
        rows = _box_samples(state, max(8 * state.num_candidates, 32), rng)
        return _project_rows(rows, state=state, proxy=self.name, n=state.num_candidates)
