"""Where every stage of a run keeps its files, under one run folder.

    <root>/config.yaml                     the resolved pipeline config
    <root>/stage1.json                     which stage-1 folder the run uses (see below)
    <stage1>/checkpoints/last.pt           shared model (its first profile_steps are the probe)
    <stage1>/profile/profile.json, .png    difficulty profile (docs/METHOD.md step 1)
    <root>/grouping/grouping.json, .png    timestep groups (step 2)
    <root>/grouping/budgets.json           FLOPs budget per group (step 3)
    <root>/groups/group-<g>/checkpoints/last.pt   fine-tuned expert of group g (step 6)
    <root>/groups/group-<g>/result.json    its summary (FLOPs, budget, held-out losses)
    <root>/groups/group-<g>/prune/         its pruning rounds (memory.json, prune.png)
    <root>/costs.json                      sampling and training cost of the run
    <root>/baseline/                       the single-model baseline (its own training folder)
    <root>/eval/                           the comparison (comparison.md/.json/.png, sample grids),
                                           the single-model curve (curve.json/.png)
    <stage1>/snapshots/, <root>/baseline/snapshots/   EMA weights on the way (the curve's points)
    <root>/report.md                       the run report
    <root>/summary.json                    the pipeline's summary (what the flow returns)

``<stage1>`` is the stage-1 folder: ``<runs>/stage1-<stage-1 key>`` beside the run folder, shared
by every run whose stage-1 settings are equal (:mod:`tdc_core.run.stage1`), or the run folder
itself for runs made before stage-1 folders existed.

Group folders are named from non-negative integers only, and :func:`safe_child` joins any
other name that comes from a config or a user, so no name can escape the run folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tdc_core.config import PipelineConfig, config_key
from tdc_core.errors import ConfigError

__all__ = ["RunLayout", "default_run_dir", "safe_child"]

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def safe_child(parent: str | Path, name: str, *, what: str = "name") -> Path:
    """``parent / name`` for a single, plain path component ``name``.

    Raises:
        ConfigError: ``name`` is empty, starts with ".", holds a separator or anything but
            letters, digits, ".", "_" and "-" (so it cannot be "..", absolute, or hidden).
    """
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise ConfigError(
            f"{what}={name!r} cannot be a file or folder name; allowed: 1-200 letters, digits, '.', '_' "
            f"or '-', starting with a letter or digit"
        )
    return Path(parent) / name


def default_run_dir(config: PipelineConfig) -> Path:
    """``runs/<name>-<preset>-<config hash>`` (relative to the working folder): the same config
    always maps to the same folder, so a re-run resumes it."""
    return Path("runs") / f"{config.name}-{config.preset}-{config_key(config)}"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def stage1_pointer(self) -> Path:
        """``stage1.json``: names the stage-1 folder this run uses (written by
        :func:`tdc_core.run.stage1.attach_stage1`); absent when stage 1 lives in this folder."""
        return self.root / "stage1.json"

    @property
    def stage1_root(self) -> Path:
        """The folder holding stage 1 (probe, profile, shared model): the one ``stage1.json``
        names, shared by every run with the same stage-1 settings; else this folder (runs made
        before stage-1 folders existed, and ``tdc profile``/``tdc train`` folders).

        Raises:
            ConfigError: ``stage1.json`` exists but cannot be read.
        """
        try:
            record = json.loads(self.stage1_pointer.read_text())
            return (self.root / record["dir"]).resolve()
        except FileNotFoundError:
            return self.root
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.stage1_pointer} is damaged ({exc}); delete it to keep stage 1 in "
                              f"{self.root}") from None

    @property
    def shares_stage1(self) -> bool:
        """Whether stage 1 lives in a stage-1 folder of its own (see :attr:`stage1_root`)."""
        return self.stage1_pointer.is_file()

    @property
    def shared_checkpoint(self) -> Path:
        return self.stage1_root / "checkpoints" / "last.pt"

    @property
    def profile_json(self) -> Path:
        return self.stage1_root / "profile" / "profile.json"

    @property
    def profile_png(self) -> Path:
        return self.stage1_root / "profile" / "profile.png"

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
        """Raises ConfigError (a ValueError) for anything but an int >= 0 (bool included)."""
        if isinstance(group, bool) or not isinstance(group, int) or group < 0:
            raise ConfigError(f"group index must be an int >= 0, got {group!r}")
        return self.groups_dir / f"group-{group}"

    def group_checkpoint(self, group: int) -> Path:
        return self.group_dir(group) / "checkpoints" / "last.pt"

    def group_result(self, group: int) -> Path:
        return self.group_dir(group) / "result.json"

    def group_metrics(self, group: int) -> Path:
        """The group worker's metrics and progress, JSON lines (replayed and logged by its task)."""
        return self.group_dir(group) / "metrics.jsonl"

    def prune_dir(self, group: int) -> Path:
        """Pruning rounds of one group: memory.json (decision log), prune.png, pruned.pt, work/."""
        return self.group_dir(group) / "prune"

    def prune_memory(self, group: int) -> Path:
        """The pruning rounds' decision log (a MemoryBank)."""
        return self.prune_dir(group) / "memory.json"

    def prune_png(self, group: int) -> Path:
        return self.prune_dir(group) / "prune.png"

    def pruned_checkpoint(self, group: int) -> Path:
        """The group's model right after pruning, before its fine-tune."""
        return self.prune_dir(group) / "pruned.pt"

    def prune_work_dir(self, group: int) -> Path:
        """Scratch space of the pruning search (candidate and recovery checkpoints)."""
        return self.prune_dir(group) / "work"

    @property
    def groups_dir(self) -> Path:
        return self.root / "groups"

    @property
    def costs_json(self) -> Path:
        return self.root / "costs.json"

    @property
    def baseline_dir(self) -> Path:
        """The single-model baseline's own training folder (a run folder of ``tdc train``)."""
        return self.root / "baseline"

    @property
    def baseline_checkpoint(self) -> Path:
        return self.baseline_dir / "checkpoints" / "last.pt"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def comparison_json(self) -> Path:
        """The evaluation's record (markdown and plot beside it): written last, so its presence
        means the run was evaluated."""
        return self.eval_dir / "comparison.json"

    @property
    def curve_json(self) -> Path:
        """The single model's quality vs training compute, TDC beside it (``curve.png`` beside)."""
        return self.eval_dir / "curve.json"

    @property
    def curve_png(self) -> Path:
        return self.eval_dir / "curve.png"

    @property
    def summary_json(self) -> Path:
        """The pipeline's summary record (what the flow ``tdc`` returns), written at its end."""
        return self.root / "summary.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def run_uid(self) -> Path:
        """The folder's random id, written once: a recreated folder gets a new one."""
        return self.root / ".run_uid"

    @property
    def train_metrics(self) -> Path:
        """Metrics and progress of a ``torchrun`` training job in this folder (rank 0 writes)."""
        return self.root / "train-metrics.jsonl"

    @property
    def train_result(self) -> Path:
        return self.root / "train-result.json"

    @property
    def snapshots_dir(self) -> Path:
        """EMA weights of a dense run at a few steps on the way (``step-<n>.pt``): the points of
        the single-model quality-vs-compute curve (``tdc_core.run.curve``)."""
        return self.root / "snapshots"

    @property
    def samples_png(self) -> Path:
        return self.root / "samples.png"
