"""A study's selection rule: which candidate setting a validation study chooses, by a rule written
in the study file before its results are seen (``selection:``; studies/SELECTION.md).

Each candidate is an arm (its paired TDC − baseline) or a contrast (its paired a − b) of the
study. The rule, applied to means over training seeds:

0. a candidate whose mean of a ``require`` metric is not better than its bound (not below it;
   not above it for precision/recall) is out;
1. the remaining candidate with the best mean ``metric`` (lowest; highest for precision/recall) leads;
2. every candidate whose mean is within ``tie`` of the leader's ties with it, and among those the
   best mean ``tiebreak`` wins;
3. if still tied (equal tiebreak, or no tiebreak), the simpler setting wins: fewer settings
   changed from the study's own configuration; then the first candidate listed.

Intervals do not enter the rule: a choice on three validation seeds is re-tested on fresh seeds,
which alone support a claim. Pure: no files, no study runner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Candidate", "Selection", "SelectionRow", "SelectionRule", "choose", "selection_markdown"]


class SelectionRule(BaseModel):
    """``selection:`` in a study file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidates: tuple[str, ...] = Field(min_length=2)  # arm or contrast names of the study
    metric: str = "bits_per_dim"
    tie: float = Field(0.0, ge=0.0)  # in the metric's units
    tiebreak: str | None = None
    # Bounds a candidate must beat to be chosen, e.g. {bits_per_dim: 0.0}: its TDC − baseline
    # bits/dim must be below zero (TDC better) for it to compete on the metric.
    require: dict[str, float] = Field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    """One candidate's numbers: means over its seeds of the rule's metric and tiebreak (None when
    the study has no such number for it)."""

    name: str
    metric: float | None
    tiebreak: float | None
    settings_changed: int
    seeds: tuple[int, ...]
    required: dict[str, float | None] = field(default_factory=dict)  # mean of each ``require`` metric


class SelectionRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    candidate: str
    metric: float | None
    tiebreak: float | None
    settings_changed: int
    seeds: list[int]
    required: dict[str, float | None] = {}
    excluded: str | None = None  # why rule 0 put it out


class Selection(BaseModel):
    """The rule, every candidate's numbers, and what the rule chose (None: it cannot decide yet)."""

    model_config = ConfigDict(frozen=True)

    rule: SelectionRule
    rows: list[SelectionRow]
    choice: str | None
    reason: str


def choose(rule: SelectionRule, candidates: Sequence[Candidate], *, higher_is_better: Callable[[str], bool],
           label: Callable[[str], str] = str, seeds: Sequence[int] | None = None) -> Selection:
    """Apply ``rule`` to ``candidates`` (in the rule's order). Undecided, with the reason, while
    any candidate lacks the metric or has not run every one of ``seeds`` (the study's, when
    given: a part-run study does not choose on the seeds that happen to be done), or the
    tiebreak is needed and one of the tied lacks it. ``label`` names a metric in the reason."""
    metric, tiebreak = label(rule.metric), label(rule.tiebreak) if rule.tiebreak else None
    missing = [c.name for c in candidates if c.metric is None
               or any(c.required.get(m) is None for m in rule.require)]
    excluded = {c.name: _unmet(rule, c, higher_is_better=higher_is_better, label=label)
                for c in candidates if c.name not in missing}
    rows = [SelectionRow(candidate=c.name, metric=c.metric, tiebreak=c.tiebreak,
                         settings_changed=c.settings_changed, seeds=list(c.seeds), required=dict(c.required),
                         excluded=excluded.get(c.name)) for c in candidates]
    short = [c.name for c in candidates if seeds is not None and sorted(c.seeds) != sorted(seeds)]
    if short:
        return Selection(rule=rule, rows=rows, choice=None,
                         reason=f"undecided: {', '.join(short)} not yet run on every training seed "
                                f"({', '.join(map(str, seeds))})")
    if missing:
        needed = ", ".join([metric, *(label(m) for m in rule.require)])
        return Selection(rule=rule, rows=rows, choice=None,
                         reason=f"undecided: no {needed} yet for {', '.join(missing)}")
    out = [f"{name} is out ({why})" for name, why in excluded.items() if why is not None]
    candidates = [c for c in candidates if excluded[c.name] is None]

    def done(choice: str | None, reason: str) -> Selection:
        return Selection(rule=rule, rows=rows, choice=choice, reason="; ".join([*out, reason]))

    if not candidates:
        return done(None, "no candidate meets the rule's requirements: nothing is chosen")
    sign = -1.0 if higher_is_better(rule.metric) else 1.0  # compare as "lower is better"
    best = min(sign * c.metric for c in candidates)
    tied = [c for c in candidates if sign * c.metric - best <= rule.tie]
    leader = next(c for c in candidates if sign * c.metric == best)
    if len(tied) == 1:
        return done(leader.name, f"{leader.name} has the best mean {metric} ({leader.metric:+.4g}), and no other "
                                 f"candidate is within {rule.tie:g} of it")
    names = ", ".join(c.name for c in tied)
    if rule.tiebreak is not None:
        if any(c.tiebreak is None for c in tied):
            return done(None, f"undecided: {names} tie on {metric} and not all have {tiebreak}")
        tsign = -1.0 if higher_is_better(rule.tiebreak) else 1.0
        tbest = min(tsign * c.tiebreak for c in tied)
        tied_again = [c for c in tied if tsign * c.tiebreak == tbest]
        if len(tied_again) == 1:
            c = tied_again[0]
            return done(c.name, f"{names} are within {rule.tie:g} of the best mean {metric} "
                                f"({leader.name}, {leader.metric:+.4g}); {c.name} has the best mean "
                                f"{tiebreak} among them ({c.tiebreak:+.4g})")
        tied = tied_again
    simplest = min(tied, key=lambda c: c.settings_changed)  # min keeps the first listed among equals
    return done(simplest.name, f"{', '.join(c.name for c in tied)} tie; {simplest.name} changes the fewest "
                               f"settings ({simplest.settings_changed})")


def _unmet(rule: SelectionRule, c: Candidate, *, higher_is_better: Callable[[str], bool],
           label: Callable[[str], str]) -> str | None:
    """Why ``c`` fails rule 0 (the first unmet bound), or None when it meets every bound."""
    for m, bound in rule.require.items():
        value = c.required[m]
        if not (value > bound if higher_is_better(m) else value < bound):
            side = "above" if higher_is_better(m) else "below"
            return f"{label(m)} {value:+.4g} is not {side} {bound:+g}"
    return None


def selection_markdown(s: Selection, *, label: Callable[[str], str],
                       higher_is_better: Callable[[str], bool]) -> list[str]:
    """The selection as Markdown lines: the rule, a row per candidate, the choice and why.
    ``label`` names a metric for a reader."""
    r = s.rule
    # A bound's metric gets a column of its own unless the rule's metric or tiebreak shows it.
    shown = [m for m in r.require if m not in (r.metric, r.tiebreak)]
    rule = (f"best mean {label(r.metric)}; within {r.tie:g} of it, the best mean {label(r.tiebreak)}"
            if r.tiebreak else f"best mean {label(r.metric)}")
    bounds = "".join(f"{label(m)} {'above' if higher_is_better(m) else 'below'} {b:+g}; "
                     for m, b in r.require.items())
    lines = ["## Selection (the study file's rule)", "",
             f"Rule: {'only candidates with ' + bounds if bounds else ''}{rule}; then the fewest settings "
             "changed from the study's own configuration. "
             "Each candidate's number is its arm's TDC − baseline or its contrast's a − b, mean over training "
             "seeds (intervals are in the tables above and do not enter the rule).", "",
             f"| candidate | {label(r.metric)} |" + (f" {label(r.tiebreak)} |" if r.tiebreak else "")
             + "".join(f" {label(m)} |" for m in shown) + " settings changed | seeds |"
             + (" out |" if r.require else ""),
             "|---|---|" + ("---|" if r.tiebreak else "") + "---|" * len(shown) + "---|---|"
             + ("---|" if r.require else "")]
    for row in s.rows:
        cells = [row.candidate, _num(row.metric)]
        if r.tiebreak:
            cells.append(_num(row.tiebreak))
        cells += [_num(row.required.get(m)) for m in shown]
        cells += [str(row.settings_changed), str(row.seeds)]
        if r.require:
            cells.append(row.excluded or "")
        lines.append("| " + " | ".join(cells) + " |")
    chosen = f"**Chosen: `{s.choice}`**" if s.choice else "**No choice yet**"
    lines += ["", f"{chosen}: {s.reason}.", ""]
    return lines


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:+.4g}"
