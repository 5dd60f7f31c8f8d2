"""A validation study's selection rule (tdc_core/run/selection.py, `selection:` in a study file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tdc_core.errors import ConfigError
from tdc_core.run.selection import Candidate, SelectionRule, choose, selection_markdown
from tdc_core.run.study import StudySummary, load_study, select

STUDIES = Path(__file__).resolve().parents[1] / "studies"
RULE = SelectionRule(candidates=("a", "b", "c"), metric="bits_per_dim", tie=0.005, tiebreak="fid_mean")


def _c(name: str, metric: float | None, tiebreak: float | None = 0.0, changed: int = 1) -> Candidate:
    return Candidate(name=name, metric=metric, tiebreak=tiebreak, settings_changed=changed, seeds=(100, 101, 102))


def _lower(metric: str) -> bool:
    return metric in {"precision", "recall"}


def test_the_best_mean_wins_when_nothing_is_within_the_tie():
    s = choose(RULE, [_c("a", -0.01), _c("b", -0.05, tiebreak=9.0), _c("c", -0.02, tiebreak=-9.0)],
               higher_is_better=_lower)
    assert s.choice == "b"  # a tiebreak never overturns a lead larger than the tie


def test_within_the_tie_the_better_tiebreak_wins_then_the_simpler_setting():
    s = choose(RULE, [_c("a", -0.050, tiebreak=0.003), _c("b", -0.054, tiebreak=0.004), _c("c", -0.01)],
               higher_is_better=_lower)
    assert s.choice == "a"  # 0.004 from the best mean, and the lower FID
    s = choose(RULE, [_c("a", -0.050, tiebreak=0.004, changed=2), _c("b", -0.054, tiebreak=0.004, changed=1),
                      _c("c", -0.049, tiebreak=0.004, changed=0)], higher_is_better=_lower)
    assert s.choice == "c"  # all tie on both: the fewest settings changed
    s = choose(RULE.model_copy(update={"tiebreak": None}), [_c("a", -0.05, changed=1), _c("b", -0.05, changed=1)],
               higher_is_better=_lower)
    assert s.choice == "a"  # and then the first listed


def test_higher_is_better_metrics_are_maximised():
    rule = SelectionRule(candidates=("a", "b"), metric="recall")
    assert choose(rule, [_c("a", 0.01), _c("b", 0.03)], higher_is_better=_lower).choice == "b"


def test_no_choice_until_every_candidate_has_run_every_seed():
    s = choose(RULE, [_c("a", -0.05), _c("b", -0.01), _c("c", -0.01)], higher_is_better=_lower, seeds=(100, 101, 102))
    assert s.choice == "a"
    part = Candidate(name="b", metric=-0.09, tiebreak=0.0, settings_changed=1, seeds=(100,))
    s = choose(RULE, [_c("a", -0.05), part, _c("c", -0.01)], higher_is_better=_lower, seeds=(100, 101, 102))
    assert s.choice is None and "b not yet run on every training seed" in s.reason


def test_no_choice_while_a_candidate_has_no_number():
    s = choose(RULE, [_c("a", -0.05), _c("b", None), _c("c", -0.01)], higher_is_better=_lower)
    assert s.choice is None and "b" in s.reason
    s = choose(RULE, [_c("a", -0.05, tiebreak=None), _c("b", -0.05), _c("c", -0.01)], higher_is_better=_lower)
    assert s.choice is None and "fid_mean" in s.reason  # the key, as no label was given


def test_a_candidate_that_misses_a_required_bound_is_out_whatever_its_metric():
    rule = SelectionRule(candidates=("a", "b", "c"), metric="fid_mean", tie=0.002, tiebreak="bits_per_dim",
                         require={"bits_per_dim": 0.0})

    def c(name, fid, bpd):
        return Candidate(name=name, metric=fid, tiebreak=bpd, settings_changed=1, seeds=(100,),
                         required={"bits_per_dim": bpd})

    s = choose(rule, [c("a", 0.010, -0.05), c("b", -0.020, +0.01), c("c", 0.005, -0.01)], higher_is_better=_lower)
    assert s.choice == "c"  # b has the best FID but is worse than the single model on bits/dim
    assert [r.excluded is not None for r in s.rows] == [False, True, False]
    table = selection_markdown(s, label=str, higher_is_better=_lower)
    assert "only candidates with bits_per_dim below +0" in table[2]
    assert table[4].count("bits_per_dim") == 1  # the bound's metric is the tiebreak: one column shows it
    assert table[7].endswith("| bits_per_dim +0.01 is not below +0 |")  # b's row says why it is out
    assert s.reason.startswith("b is out (bits_per_dim +0.01 is not below +0); c has the best")
    s = choose(rule, [c("a", 0.010, 0.0), c("b", -0.020, +0.01), c("c", 0.005, +0.2)], higher_is_better=_lower)
    assert s.choice is None and "no candidate meets" in s.reason  # a bound of 0 is strict
    s = choose(rule, [c("a", 0.010, None), c("b", -0.020, +0.01), c("c", 0.005, -0.01)], higher_is_better=_lower)
    assert s.choice is None and s.reason.endswith(" yet for a")  # a bound it cannot check yet: undecided
    higher = SelectionRule(candidates=("a", "b"), metric="fid_mean", require={"recall": 0.0})
    s = choose(higher, [Candidate(name="a", metric=-0.1, tiebreak=None, settings_changed=1, seeds=(1,),
                                  required={"recall": -0.01}),
                        Candidate(name="b", metric=0.0, tiebreak=None, settings_changed=1, seeds=(1,),
                                  required={"recall": 0.01})], higher_is_better=_lower)
    assert s.choice == "b"  # recall must rise above its bound


@pytest.mark.parametrize(("selection", "match"), [
    ("{candidates: [a, nope]}", "nope.*exactly one arm or contrast"),
    ("{candidates: [a, b], metric: training_flops}", "not an outcome metric"),
    ("{candidates: [a, b], tiebreak: fid}", "tiebreak 'fid'"),
    ("{candidates: [a, b], require: {sampling_flops_per_image: 0}}", "require 'sampling_flops_per_image'"),
    ("{candidates: [a, alone]}", "alone is an arm with baseline.enabled=false"),
])
def test_a_selection_must_name_candidates_and_metrics_the_study_has(tmp_path, selection, match):
    f = tmp_path / "s.yaml"
    f.write_text("name: s\narms: [{name: a, preset: smoke}, {name: b, preset: smoke, overrides: [train.lr=0.002]},\n"
                 "  {name: alone, preset: smoke, overrides: [baseline.enabled=false]}]\nseeds: [0]\n"
                 f"selection: {selection}\n")
    with pytest.raises(ConfigError, match=match):
        load_study(f)


@pytest.mark.parametrize(("study", "chosen"), [
    ("digits-recipe-validation", "cosine"),                        # SELECTION.md, 2026-12-01
    ("digits-levers-validation", "sensitivity-vs-single-model"),   # SELECTION.md, 2026-12-03
])
def test_the_committed_validation_studies_rule_makes_the_recorded_choice(study, chosen):
    spec = load_study(STUDIES / f"{study}.yaml")
    summary = StudySummary.model_validate_json((STUDIES / study / "study.json").read_text())
    assert select(spec, summary).choice == chosen
