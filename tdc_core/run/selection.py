"""A study's selection rule: which candidate setting a validation study chooses, by a rule written
in the study file before its results are seen (``selection:``; studies/SELECTION.md).

Each candidate is an arm (its paired TDC − baseline) or a contrast (its paired a − b) of the
study. The rule, applied to means over training seeds:

1. the candidate with the best mean ``metric`` (lowest; highest for precision/recall) leads;
2. every candidate whose mean is within ``tie`` of the leader's ties with it, and among those the
   best mean ``tiebreak`` wins;
3. if still tied (equal tiebreak, or no tiebreak), the simpler setting wins: fewer settings
   changed from the study's own configuration; then the first candidate listed.

Intervals do not enter the rule: a choice on three validation seeds is re-tested on fresh seeds,
which alone support a claim. Pure: no files, no study runner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Candidate", "Selection", "SelectionRow", "SelectionRule", "choose", "selection_markdown"]


class SelectionRule(BaseModel):
    """``selection:`` in a study file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidates: tuple[str, ...] = Field(min_length=2)  # arm or contrast names of the study
    metric: str = "bits_per_dim"
    tie: float = Field(0.0, ge=0.0)  # in the metric's units
    tiebreak: str | None = None


@dataclass(frozen=True)
class Candidate:
    """One candidate's numbers: means over its seeds of the rule's metric and tiebreak (None when
    the study has no such number for it)."""

    name: str
    metric: float | None
    tiebreak: float | None
    settings_changed: int
    seeds: tuple[int, ...]


class SelectionRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    candidate: str
    metric: float | None
    tiebreak: float | None
    settings_changed: int
    seeds: list[int]


class Selection(BaseModel):
    """The rule, every candidate's numbers, and what the rule chose (None: it cannot decide yet)."""

    model_config = ConfigDict(frozen=True)

    rule: SelectionRule
    rows: list[SelectionRow]
    choice: str | None
    reason: str


def choose(rule: SelectionRule, candidates: Sequence[Candidate], *, higher_is_better: Callable[[str], bool],
           label: Callable[[str], str] = str) -> Selection:
    """Apply ``rule`` to ``candidates`` (in the rule's order). Undecided, with the reason, while
    any candidate lacks the metric, or the tiebreak is needed and one of the tied lacks it.
    ``label`` names a metric in the reason."""
    metric, tiebreak = label(rule.metric), label(rule.tiebreak) if rule.tiebreak else None
    rows = [SelectionRow(candidate=c.name, metric=c.metric, tiebreak=c.tiebreak,
                         settings_changed=c.settings_changed, seeds=list(c.seeds)) for c in candidates]
    missing = [c.name for c in candidates if c.metric is None]
    if missing:
        return Selection(rule=rule, rows=rows, choice=None,
                         reason=f"undecided: no {metric} yet for {', '.join(missing)}")
    sign = -1.0 if higher_is_better(rule.metric) else 1.0  # compare as "lower is better"
    best = min(sign * c.metric for c in candidates)
    tied = [c for c in candidates if sign * c.metric - best <= rule.tie]
    leader = next(c for c in candidates if sign * c.metric == best)
    if len(tied) == 1:
        return Selection(rule=rule, rows=rows, choice=leader.name,
                         reason=f"{leader.name} has the best mean {metric} ({leader.metric:+.4g}), and no other "
                                f"candidate is within {rule.tie:g} of it")
    names = ", ".join(c.name for c in tied)
    if rule.tiebreak is not None:
        if any(c.tiebreak is None for c in tied):
            return Selection(rule=rule, rows=rows, choice=None,
                             reason=f"undecided: {names} tie on {metric} and not all have {tiebreak}")
        tsign = -1.0 if higher_is_better(rule.tiebreak) else 1.0
        tbest = min(tsign * c.tiebreak for c in tied)
        tied_again = [c for c in tied if tsign * c.tiebreak == tbest]
        if len(tied_again) == 1:
            c = tied_again[0]
            return Selection(rule=rule, rows=rows, choice=c.name,
                             reason=f"{names} are within {rule.tie:g} of the best mean {metric} "
                                    f"({leader.name}, {leader.metric:+.4g}); {c.name} has the best mean "
                                    f"{tiebreak} among them ({c.tiebreak:+.4g})")
        tied = tied_again
    simplest = min(tied, key=lambda c: c.settings_changed)  # min keeps the first listed among equals
    return Selection(rule=rule, rows=rows, choice=simplest.name,
                     reason=f"{', '.join(c.name for c in tied)} tie; {simplest.name} changes the fewest settings "
                            f"({simplest.settings_changed})")


def selection_markdown(s: Selection, *, label: Callable[[str], str]) -> list[str]:
    """The selection as Markdown lines: the rule, a row per candidate, the choice and why.
    ``label`` names a metric for a reader."""
    r = s.rule
    rule = (f"best mean {label(r.metric)}; within {r.tie:g} of it, the best mean {label(r.tiebreak)}"
            if r.tiebreak else f"best mean {label(r.metric)}")
    lines = ["## Selection (the study file's rule)", "",
             f"Rule: {rule}; then the fewest settings changed from the study's own configuration. "
             "Each candidate's number is its arm's TDC − baseline or its contrast's a − b, mean over training "
             "seeds (intervals are in the tables above and do not enter the rule).", "",
             f"| candidate | {label(r.metric)} |" + (f" {label(r.tiebreak)} |" if r.tiebreak else "")
             + " settings changed | seeds |",
             "|---|---|" + ("---|" if r.tiebreak else "") + "---|---|"]
    for row in s.rows:
        cells = [row.candidate, "—" if row.metric is None else f"{row.metric:+.4g}"]
        if r.tiebreak:
            cells.append("—" if row.tiebreak is None else f"{row.tiebreak:+.4g}")
        cells += [str(row.settings_changed), str(row.seeds)]
        lines.append("| " + " | ".join(cells) + " |")
    chosen = f"**Chosen: `{s.choice}`**" if s.choice else "**No choice yet**"
    lines += ["", f"{chosen}: {s.reason}.", ""]
    return lines
