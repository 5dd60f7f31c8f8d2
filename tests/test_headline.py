"""The headline table (`tdc headline`): every number read from a study summary, verdicts worded
for TDC, and the committed studies/RESULTS.md equal to what the committed studies say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tdc_core.errors import ConfigError
from tdc_core.run.headline import HeadlineSpec, headline_markdown, load_headline
from tdc_core.run.study import Contrast, StudySummary, summarise

ROOT = Path(__file__).resolve().parents[1]


def _rep(tdc: float, other: float, *, flops: tuple[float, float] = (72.0, 100.0)) -> dict[str, dict[str, float]]:
    return {"tdc": {"bits_per_dim": tdc, "recall": 0.90, "sampling_flops_per_image": flops[0]},
            "baseline": {"bits_per_dim": other, "recall": 0.93, "sampling_flops_per_image": flops[1]}}


def _summaries() -> dict[str, StudySummary]:
    arms = {"tdc": {s: _rep(4.50 + s / 100, 4.60 + s / 100) for s in (0, 1, 2)},
            "control": {s: _rep(4.40 + s / 100, 4.45, flops=(100.0, 100.0)) for s in (0, 1, 2)}}
    study = summarise(name="st", arms=arms, contrasts=[Contrast(name="vs-control", a="tdc.tdc", b="control.tdc"),
                                                       Contrast(name="backwards", a="tdc.baseline", b="control.tdc")])
    return {"st": study}


def test_rows_read_the_arms_difference_and_the_contrasts_worded_for_tdc():
    spec = HeadlineSpec(rows=[{"label": "single model", "study": "st", "arm": "tdc"},
                              {"label": "control", "study": "st", "contrast": "vs-control"}])
    rows = [ln for ln in headline_markdown(spec, _summaries()).splitlines() if ln.startswith("| single")
            or ln.startswith("| control")]
    single, control = (ln.split(" | ") for ln in rows)
    assert single[1] == "0, 1, 2"
    assert single[2] == "-0.100 [-0.100, -0.100] **TDC better**"  # every seed 0.1 lower: a zero-width interval
    assert single[3] == single[4] == single[5] == single[7] == "not measured"  # not in these replicates
    assert single[6].startswith("-3.0 pt") and single[6].endswith("**TDC worse**")  # recall is higher-better
    assert single[8] == "0.72"
    # TDC 4.50, 4.51, 4.52 against the control's 4.40, 4.41, 4.42: the contrast's "b better" is TDC worse.
    assert control[2].startswith("+0.100") and control[2].endswith("**TDC worse**")
    assert control[8] == "0.72" and "`tdc study studies/st.yaml --summary-only`" in control[-1]
    # A part-run study is re-derived with --partial: the row says so.
    part = {"st": _summaries()["st"].model_copy(update={"not_run": ["other seeds 0"]})}
    assert "`tdc study studies/st.yaml --summary-only --partial`" in headline_markdown(spec, part)


def test_a_row_that_does_not_fit_its_study_is_one_config_error(tmp_path):
    summaries = _summaries()
    for row, words in [({"arm": "nope"}, "has no arm 'nope' (arms: tdc, control)"),
                       ({"contrast": "nope"}, "has no contrast 'nope' (contrasts: vs-control, backwards)"),
                       ({"contrast": "backwards"}, "its a must be a TDC ensemble")]:
        spec = HeadlineSpec(rows=[{"label": "b", "study": "st", **row}])
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            headline_markdown(spec, summaries)
    with pytest.raises(ConfigError, match="no summary of study 'other'"):
        headline_markdown(HeadlineSpec(rows=[{"label": "b", "study": "other", "arm": "tdc"}]), summaries)
    # An arm that scored TDC alone has no difference to put in the table.
    alone = summarise(name="st", arms={"n2": {s: {"tdc": {"bits_per_dim": 4.5}, "baseline": {}} for s in (0, 1)}})
    with pytest.raises(ConfigError, match="arm 'n2' of study st evaluated TDC alone"):
        headline_markdown(HeadlineSpec(rows=[{"label": "b", "study": "st", "arm": "n2"}]), {"st": alone})
    bad = tmp_path / "h.yaml"
    bad.write_text("rows:\n  - {label: b, study: st, arm: tdc, contrast: x}\n")
    with pytest.raises(ConfigError, match=r"headline file .*h\.yaml: rows\.0: .*exactly one of arm"):
        load_headline(bad)


@pytest.mark.parametrize(("spec", "table"), [("headline.yaml", "RESULTS.md"), ("levers.yaml", "LEVERS.md")])
def test_the_committed_tables_are_what_the_committed_studies_say(spec, table):
    """studies/RESULTS.md and LEVERS.md are regenerated from studies/*/study.json, byte for byte: a
    study re-summarised without regenerating the tables fails here."""
    done = subprocess.run([sys.executable, "-m", "flows.cli", "headline", f"studies/{spec}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == (ROOT / "studies" / table).read_text()
