"""The headline tables: TDC against each baseline (``studies/headline.yaml``), or TDC at each
setting against its equal-FLOPs single model (``studies/levers.yaml``), one row per committed
study result.

A headline file names, per row, a label, a study and where in its summary TDC meets the other
model:

- ``arm: tdc``: the arm's own paired difference, TDC − its equal-FLOPs single model;
- ``contrast: NAME``: a study contrast whose ``a`` is a TDC ensemble (``<arm>.tdc``), e.g.
  ``tdc.tdc − all-timesteps.tdc``.

:func:`headline_markdown` turns the rows and the studies' ``study.json`` (a
:class:`~tdc_core.run.study.StudySummary`) into one Markdown table: per row the number of training
seeds, the paired difference with its 95 % t interval and verdict for each outcome, and the
sampling and training FLOPs as ratios TDC / baseline. Every number is read from a committed
``study.json``; nothing here computes a statistic of its own, so the table cannot drift from the
studies it cites.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tdc_core.errors import ConfigError
from tdc_core.run.study import METRICS, Interval, StudySummary, load_yaml_model

__all__ = ["HeadlineRow", "HeadlineSpec", "OUTCOMES", "headline_markdown", "load_headline"]

# The outcome columns, in order (each a paired difference TDC − baseline); costs come after.
OUTCOMES = ("bits_per_dim", "heldout_eps_mse_min_snr", "fid_mean", "precision", "recall", "memorized_share")
_POINTS = {"precision", "recall", "memorized_share"}  # shares, shown in percentage points
_DECIMALS = {"heldout_eps_mse_min_snr": 4}             # others: 3
_COSTS = ("sampling_flops_per_image", "training_flops")


class HeadlineRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str = Field(min_length=1)     # the row's first cell: the baseline, or TDC's setting
    study: str = Field(min_length=1)     # studies/<study>/study.json
    arm: str | None = None               # TDC − this arm's own baseline
    contrast: str | None = None          # or this contrast of the study (a = TDC)

    @model_validator(mode="after")
    def _one_source(self) -> HeadlineRow:
        if (self.arm is None) == (self.contrast is None):
            raise ValueError("give exactly one of arm (TDC − that arm's baseline) or contrast (a study contrast "
                             "whose a is TDC)")
        return self


class HeadlineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    title: str = "TDC against each baseline"
    row_header: str = "TDC vs"                # the first column's header
    cells: str = "TDC − the baseline"         # what every cell is, for the table's first lines
    rows: list[HeadlineRow] = Field(min_length=1)


def load_headline(path: str | Path) -> HeadlineSpec:
    """Read and validate a headline file.

    Raises:
        ConfigError: naming the file and the field.
    """
    return load_yaml_model(path, HeadlineSpec, what="headline file")


def _row_metrics(row: HeadlineRow, summary: StudySummary) -> tuple[list[int], dict[str, tuple[Interval, Interval,
                                                                                             Interval, str]]]:
    """``(seeds, {metric: (tdc, other, tdc − other, verdict)})`` of one row, the verdict worded for TDC."""
    if row.arm is not None:
        arm = next((a for a in summary.arms if a.arm == row.arm), None)
        if arm is None:
            raise ConfigError(f"headline row {row.label!r}: study {summary.name} has no arm {row.arm!r} "
                              f"(arms: {', '.join(a.arm for a in summary.arms)})")
        if any(m.difference is None for m in arm.metrics):
            raise ConfigError(f"headline row {row.label!r}: arm {row.arm!r} of study {summary.name} evaluated "
                              f"TDC alone (no baseline); name a contrast of that study instead")
        return arm.seeds, {m.metric: (m.tdc, m.baseline, m.difference, m.verdict) for m in arm.metrics}
    c = next((c for c in summary.contrasts if c.name == row.contrast), None)
    if c is None:
        raise ConfigError(f"headline row {row.label!r}: study {summary.name} has no contrast {row.contrast!r} "
                          f"(contrasts: {', '.join(x.name for x in summary.contrasts) or 'none'})")
    if not c.a.endswith(".tdc"):
        raise ConfigError(f"headline row {row.label!r}: contrast {c.name} compares {c.a} with {c.b}; "
                          f"its a must be a TDC ensemble (<arm>.tdc)")
    # A contrast's verdict names its side ("a better"); here a is TDC.
    worded = {"a better": "TDC better", "b better": "TDC worse"}
    return c.seeds, {m.metric: (m.a, m.b, m.difference, worded.get(m.verdict, m.verdict)) for m in c.metrics}


def _cell(diff: Interval, verdict: str, *, percent: bool = False, decimals: int = 3) -> str:
    f = (lambda x: f"{100 * x:+.1f} pt") if percent else (lambda x: f"{x:+.{decimals}f}")
    text = f(diff.mean) if diff.low is None else f"{f(diff.mean)} [{f(diff.low)}, {f(diff.high)}]"
    short = {"TDC better": "**TDC better**", "TDC worse": "**TDC worse**", "no clear difference": "n.s."}
    return f"{text} {short.get(verdict, '(no interval)')}"


def headline_markdown(spec: HeadlineSpec, summaries: Mapping[str, StudySummary], *, source: str = "") -> str:
    """The headline table as Markdown; ``summaries`` maps each row's study name to its summary.

    Raises:
        ConfigError: a row names a study, arm or contrast that the summaries lack.
    """
    head = [spec.row_header, "seeds", *(METRICS[m] for m in OUTCOMES), "sampling FLOPs TDC / vs",
            "training FLOPs TDC / vs", "re-derive"]
    lines = [f"# {spec.title}", "",
             f"Generated from the committed studies by `uv run tdc headline {source or 'HEADLINE.yaml'}`; do not "
             f"edit by hand. Each cell is {spec.cells}, paired by training seed: mean [95 % Student-t "
             "interval over seeds] and the verdict (n.s.: the interval includes 0). Lower is better except "
             "precision and recall; precision, recall and the memorized share are in percentage points. "
             "FLOPs are ratios of the means.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in spec.rows:
        summary = summaries.get(row.study)
        if summary is None:
            raise ConfigError(f"headline row {row.label!r}: no summary of study {row.study!r} "
                              f"(studies/{row.study}/study.json)")
        seeds, metrics = _row_metrics(row, summary)
        cells = [row.label, ", ".join(map(str, seeds))]
        for m in OUTCOMES:
            cells.append(_cell(metrics[m][2], metrics[m][3], percent=m in _POINTS, decimals=_DECIMALS.get(m, 3))
                         if m in metrics else "not measured")
        for m in _COSTS:
            tdc, other = (metrics[m][0].mean, metrics[m][1].mean) if m in metrics else (0.0, 0.0)
            cells.append(f"{tdc / other:.2f}" if other else "—")
        partial = " --partial" if summary.not_run else ""  # a part-run study re-derives only so
        cells.append(f"`tdc study studies/{row.study}.yaml --summary-only{partial}`")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
