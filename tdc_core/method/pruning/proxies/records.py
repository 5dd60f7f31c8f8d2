"""The records of a pruning search: proposals, scored candidates, round decisions, the memory bank,
and the state a proxy sees (docs/METHOD.md step 5).

The :class:`MemoryBank` holds every proposal of every round with its FLOPs, score and whether it
was accepted; it is each proxy's input in the next round, it serialises to JSON, and
:class:`tdc_core.method.pruning.proxies.replay.ReplayProxy` re-proposes a recorded run's candidates exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tdc_core.method.pruning.space import PruneSpace, Unit
from tdc_core.records import load_record, save_record

__all__ = [
    "MemoryBank",
    "MemoryEntry",
    "Proposal",
    "ProxyState",
    "RoundRecord",
]


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
