"""`tdc study`: replicates over training seeds and intervals computed from their numbers."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from scipy import stats

from tdc_core.errors import ConfigError
from tdc_core.run.study import Arm, interval, load_study, replicate_config, study_markdown, summarise


def _replicate(tdc_bpd: float, base_bpd: float) -> dict[str, dict[str, float]]:
    return {"tdc": {"bits_per_dim": tdc_bpd, "precision": 0.5},
            "baseline": {"bits_per_dim": base_bpd, "precision": 0.4}}


def test_intervals_are_students_t_over_seeds_and_differences_are_paired():
    tdc, base = [1.00, 1.10, 0.95], [1.05, 1.16, 1.005]
    s = summarise(name="x", arms={"a": {seed: _replicate(t, b) for seed, t, b in zip((0, 1, 2), tdc, base)}})
    m = next(m for m in s.arms[0].metrics if m.metric == "bits_per_dim")
    d = np.subtract(tdc, base)
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)  # by hand
    assert m.difference.mean == pytest.approx(d.mean())
    assert (m.difference.low, m.difference.high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert m.tdc.values == tdc and m.verdict == "TDC better"  # every seed lower: the interval excludes 0
    # Paired: the unpaired spread of each arm is far wider than the difference's.
    assert m.tdc.high - m.tdc.low > 5 * (m.difference.high - m.difference.low)
    p = next(m for m in s.arms[0].metrics if m.metric == "precision")
    assert p.difference.low == p.difference.high == pytest.approx(0.1) and p.verdict == "TDC better"  # higher is better


def test_costs_get_a_ratio_not_a_verdict():
    reps = {s: {"tdc": {"training_flops": 99.0 + s}, "baseline": {"training_flops": 100.0 + s}} for s in (0, 1, 2)}
    m = summarise(name="x", arms={"a": reps}).arms[0].metrics[0]
    assert m.metric == "training_flops" and m.verdict == "cost: TDC / baseline = 0.990"


def test_one_seed_has_no_interval_and_says_so():
    s = summarise(name="x", arms={"a": {0: _replicate(1.0, 1.1)}})
    m = s.arms[0].metrics[0]
    assert m.difference.low is None and m.verdict.startswith("—")
    assert interval([2.0]).low is None
    assert "one seed" in study_markdown(s)


def test_study_files_fail_before_any_training(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: s\narms: [{name: a, preset: smoke, overrides: [train.lrr=1]}]\nseeds: [0]\n")
    with pytest.raises(ConfigError, match="lrr"):
        load_study(bad)
    bad.write_text("name: s\narms: [{name: a, preset: smoke}]\nseeds: [0, 0]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: seeds: .*distinct"):
        load_study(bad)
    bad.write_text("name: s\narms: [{name: a}]\nsedes: [0]\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_study(bad)


def test_replicates_differ_in_training_seed_only():
    arm = Arm(name="a", preset="smoke", overrides=("train.steps=3", "profile.profile_steps=1"))
    a, b = (replicate_config(arm, seed=s) for s in (0, 1))
    assert a.train.seed == 0 and b.train.seed == 1 and a.train.steps == b.train.steps == 3
    assert a.data == b.data  # the same split: every replicate is scored on the same held-out images


@pytest.mark.slow
def test_a_smoke_study_completes_and_a_rerun_reuses_its_replicates(tmp_path, monkeypatch):
    """One arm × two training seeds through the real flow; the study's interval equals a hand
    computation from its replicates; running it again recomputes nothing."""
    import json

    monkeypatch.chdir(tmp_path)
    os.environ["PREFECT_HOME"] = str(tmp_path / "prefect")
    from prefect.testing.utilities import prefect_test_harness

    from flows.study import tdc_study
    from tdc_core.run.study import StudySpec

    spec = StudySpec(name="smoke", seeds=(0, 1), workers=2, arms=(Arm(name="smoke", preset="smoke", overrides=(
        "train.steps=12", "profile.profile_steps=6", "finetune.steps=4", "eval.num_samples=16",
        "eval.heldout_per_image=10", "eval.bpd_timesteps=10")),))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with prefect_test_harness(server_startup_timeout=120):
        result = tdc_study(spec, out_dir=str(tmp_path / "out"), tracking_uri=uri)
        replicates = json.loads((tmp_path / "out" / "replicates.json").read_text())
        assert [r["seed"] for r in replicates] == [0, 1]
        m = next(m for m in result.arms[0].metrics if m.metric == "bits_per_dim")
        d = [r["tdc"]["bits_per_dim"] - r["baseline"]["bits_per_dim"] for r in replicates]
        half = stats.t.ppf(0.975, 1) * np.std(d, ddof=1) / math.sqrt(2)
        assert (m.difference.low, m.difference.high) == pytest.approx((np.mean(d) - half, np.mean(d) + half))
        assert replicates[0]["tdc"]["bits_per_dim"] != replicates[1]["tdc"]["bits_per_dim"]  # different seeds
        checkpoints = sorted(tmp_path.glob("runs/*/checkpoints/last.pt"))
        assert len(checkpoints) == 2
        stamps = {p: p.stat().st_mtime_ns for p in checkpoints}
        again = tdc_study(spec, out_dir=str(tmp_path / "out"), tracking_uri=uri)
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == stamps
    assert again.arms == result.arms
    assert "TDC − baseline" in (tmp_path / "out" / "study.md").read_text()
