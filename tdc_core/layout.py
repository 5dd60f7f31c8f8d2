"""Where every stage of a run keeps its files, under one run folder.

    <root>/config.yaml                     the resolved pipeline config
    <root>/checkpoints/last.pt             shared model (its first profile_steps are the probe)
    <root>/profile/profile.json, .png      difficulty profile (METHOD.md step 1)
    <root>/grouping/grouping.json, .png    timestep groups (step 2)
    <root>/grouping/budgets.json           FLOPs budget per group (step 3)
    <root>/groups/group-<g>/checkpoints/last.pt   fine-tuned expert of group g (step 6)
    <root>/groups/group-<g>/result.json    its summary (FLOPs, budget, held-out losses)
    <root>/costs.json                      sampling and training cost of the run

Group folders are named from integers only, so no name can escape the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunLayout"]


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def shared_checkpoint(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def profile_json(self) -> Path:
        return self.root / "profile" / "profile.json"

    @property
    def profile_png(self) -> Path:
        return self.root / "profile" / "profile.png"

    @property
    def grouping_json(self) -> Path:
        return self.root / "grouping" / "grouping.json"

    @property
    def grouping_png(self) -> Path:
        return self.root / "grouping" / "grouping.png"

    @property
    def budgets_json(self) -> Path:
        return self.root / "grouping" / "budgets.json"

    def group_dir(self, group: int) -> Path:
        if not isinstance(group, int) or group < 0:
            raise ValueError(f"group index must be a non-negative int, got {group!r}")
        return self.root / "groups" / f"group-{group}"

    def group_checkpoint(self, group: int) -> Path:
        return self.group_dir(group) / "checkpoints" / "last.pt"

    def group_result(self, group: int) -> Path:
        return self.group_dir(group) / "result.json"

    @property
    def costs_json(self) -> Path:
        return self.root / "costs.json"
