"""The replay proxy: re-proposes a recorded run's candidates exactly, from its memory bank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tdc_core.method.pruning.proxies.projection import _proposal
from tdc_core.method.pruning.proxies.records import MemoryBank, Proposal, ProxyState

__all__ = [
    "ReplayProxy",
]


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
