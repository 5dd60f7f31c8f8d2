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


def _curve_point(flops: float, bpd: float, kind: str = "single"):
    """A curve point with only training FLOPs and bits/dim of interest (the rest fixed)."""
    from tdc_core.evaluation.curves import CurvePoint

    return CurvePoint(name="x", kind=kind, step=None, training_flops=flops, sampling_flops_per_image=1.0,
                      bits_per_dim=bpd, bits_per_dim_se=0.1, eps_mse=0.1, eps_mse_se=0.01, x0_mse=0.1,
                      eps_mse_min_snr=0.1)


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


def test_memorization_is_a_study_metric_where_the_run_measured_it():
    """A replicate's memorized share enters the study (lower is better); a run without training
    images to compare with (share None) leaves the metric out rather than counting it as 0."""
    from types import SimpleNamespace as NS

    from tdc_core.run.study import replicate_metrics

    def comparison(share_tdc, share_base):
        row = NS(eval=NS(fid_mean=0.1), cost=NS(sampling_flops_per_image=1.0, training_flops=None))
        return NS(tdc=row, baseline=row, heldout=[], likelihood=[], sample_quality=[
            NS(name="tdc", precision=0.8, recall=0.9, memorized_share=share_tdc),
            NS(name="baseline", precision=0.8, recall=0.9, memorized_share=share_base)])

    measured = replicate_metrics(comparison(0.03, 0.01))
    assert measured["tdc"]["memorized_share"] == 0.03 and measured["baseline"]["memorized_share"] == 0.01
    assert "memorized_share" not in replicate_metrics(comparison(None, None))["tdc"]
    s = summarise(name="x", arms={"a": {seed: replicate_metrics(comparison(0.03, 0.01 + seed / 1000))
                                        for seed in (0, 1, 2)}})
    m = next(m for m in s.arms[0].metrics if m.metric == "memorized_share")
    assert m.difference.mean == pytest.approx(0.019) and m.verdict == "TDC worse"


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


def test_study_overrides_apply_to_every_arm_before_its_own(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("name: s\noverrides: [train.steps=12, train.lr=0.001]\n"
                 "arms: [{name: a, preset: smoke}, {name: b, preset: smoke, overrides: [train.lr=0.002]}]\n"
                 "seeds: [0]\n")
    a, b = (replicate_config(arm, seed=0) for arm in load_study(f).arms)
    assert a.train.steps == b.train.steps == 12
    assert a.train.lr == 0.001 and b.train.lr == 0.002  # the arm's own value wins
    # the same configs as the study-level values written into each arm
    f.write_text("name: s\narms: [{name: a, preset: smoke, overrides: [train.steps=12, train.lr=0.001]},\n"
                 "  {name: b, preset: smoke, overrides: [train.steps=12, train.lr=0.002]}]\nseeds: [0]\n")
    assert [replicate_config(arm, seed=0) for arm in load_study(f).arms] == [a, b]
    f.write_text("name: s\noverrides: [train.stepz=7]\narms: [{name: a, preset: smoke}]\nseeds: [0]\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_study(f)


SMOKE = ["train.steps=12", "profile.profile_steps=6", "finetune.steps=4", "eval.num_samples=16",
         "eval.heldout_per_image=10", "eval.bpd_timesteps=10"]


def test_the_dry_run_lists_shared_stage1_folders_and_planned_compute(tmp_path, monkeypatch):
    from flows.study import plan_lines
    from tdc_core.run.study import StudySpec, estimate

    monkeypatch.chdir(tmp_path)  # run folders are relative: none of a developer's runs/ is seen
    spec = StudySpec(name="s", seeds=(0, 1), arms=(Arm(name="a", preset="smoke", overrides=tuple(SMOKE)),
                                                   Arm(name="b", preset="smoke", overrides=(*SMOKE, "budget.k=0.8"))))
    lines = plan_lines(spec)
    assert "stage 1 shared with a seed 0" in lines[3] and "stage 1 shared with a seed 1" in lines[4]
    assert "stage 1 trained here" in lines[1] and "2 stage-1 folder(s)" in lines[-1]
    a, b = estimate(spec.arms[0], seed=0), estimate(spec.arms[1], seed=0)
    assert a.stage1_key == b.stage1_key and a.stage1_flops == b.stage1_flops > 0
    # Stage 2 at budget: Σ_i (i + (N - i)·k)/N of F per fine-tune step; k = 0.8 costs more than k = 0.5.
    n, f = 3, a.stage1_flops / 12  # smoke: 3 groups; stage 1 = 12 steps × F × batch × 3
    assert a.stage2_flops == pytest.approx(sum((i + (n - i) * 0.5) / n for i in range(1, n + 1)) * 4 * f)
    assert b.stage2_flops > a.stage2_flops
    unpruned = estimate(Arm(name="c", preset="smoke", overrides=(*SMOKE, "prune.enabled=false")), seed=0)
    assert unpruned.stage2_flops == pytest.approx(n * 4 * f)  # every expert at full width


def test_the_dry_run_says_when_a_stage1_folder_is_already_there(tmp_path, monkeypatch):
    """A stage 1 left by another study (same stage-1 fields) is reused, and the plan says so."""
    from flows.study import plan_lines
    from tdc_core.run.layout import default_run_dir
    from tdc_core.run.stage1 import stage1_dir
    from tdc_core.run.study import StudySpec, replicate_config

    monkeypatch.chdir(tmp_path)
    spec = StudySpec(name="s", seeds=(0, 1), arms=(Arm(name="a", preset="smoke", overrides=tuple(SMOKE)),))
    cfg = replicate_config(spec.arms[0], seed=1)
    found = stage1_dir(cfg, runs_root=default_run_dir(cfg).parent)
    (found / "checkpoints").mkdir(parents=True)
    (found / "checkpoints" / "last.pt").write_bytes(b"")
    lines = plan_lines(spec)
    assert "stage 1 trained here" in lines[1]  # seed 0: nothing there
    assert f"stage 1 reused from {found} (started or finished by an earlier run)" in lines[2]


@pytest.mark.slow
def test_a_two_arm_two_seed_study_is_killed_and_resumes_without_redoing_finished_replicates(tmp_path):
    """``tdc study`` on two arms that differ only in budget.k × two training seeds: killed after
    its first replicate, then run again. The finished replicate is not recomputed; arms share
    stage 1 per seed; the intervals equal a hand computation; MLflow holds one study run with
    every pipeline and baseline run beneath it, none twice."""
    import json
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from mlflow import MlflowClient

    root = Path(__file__).resolve().parents[1]
    study = tmp_path / "s.yaml"
    study.write_text(json.dumps({"name": "s", "seeds": [0, 1], "workers": 2, "arms": [
        {"name": "a", "preset": "smoke", "overrides": SMOKE},
        {"name": "b", "preset": "smoke", "overrides": [*SMOKE, "budget.k=0.8"]}]}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "MLFLOW_TRACKING_URI": uri,
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    args = [sys.executable, "-m", "flows.cli", "study", str(study), "--out-dir", str(tmp_path / "out")]
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600  # a guard against a hang, not a speed limit
    try:
        # The second replicate's run folder appears once the first replicate's flow has returned.
        while len(list(tmp_path.glob("runs/tdc-*"))) < 2:
            assert proc.poll() is None and time.time() < deadline, "the first replicate never finished"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    (first,) = [p.parents[1] for p in tmp_path.glob("runs/*/eval/comparison.json")]
    finished = [*first.glob("groups/group-*/checkpoints/last.pt"), first / "baseline" / "checkpoints" / "last.pt",
                first / "eval" / "comparison.json", *tmp_path.glob("runs/stage1-*/checkpoints/last.pt")]
    stamps = {p: p.stat().st_mtime_ns for p in finished}

    done = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in finished} == stamps  # the finished replicate was not redone
    assert len(list(tmp_path.glob("runs/stage1-*/checkpoints/last.pt"))) == 2  # one stage 1 per seed, both arms

    replicates = json.loads((tmp_path / "out" / "replicates.json").read_text())
    assert [(r["arm"], r["seed"]) for r in replicates] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    result = json.loads((tmp_path / "out" / "study.json").read_text())
    for arm in ("a", "b"):
        d = [r["tdc"]["bits_per_dim"] - r["baseline"]["bits_per_dim"] for r in replicates if r["arm"] == arm]
        half = stats.t.ppf(0.975, 1) * np.std(d, ddof=1) / math.sqrt(2)
        m = next(m for a in result["arms"] if a["arm"] == arm for m in a["metrics"] if m["metric"] == "bits_per_dim")
        ci = (m["difference"]["low"], m["difference"]["high"])
        assert ci == pytest.approx((np.mean(d) - half, np.mean(d) + half))
    for name in ("study.md", "study.png", "curves.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tdc").experiment_id], max_results=1000)
    kinds = [r.data.tags.get("tdc.kind") for r in runs]
    assert kinds.count("study") == 1 and kinds.count("pipeline") == 4 and kinds.count("baseline") == 4
    (study_run,) = [r for r in runs if r.data.tags.get("tdc.kind") == "study"]
    beneath = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == study_run.info.run_id]
    assert sorted(r.data.tags["tdc.kind"] for r in beneath) == ["baseline"] * 4 + ["pipeline"] * 4
    assert study_run.info.status == "FINISHED"
    m = next(m for a in result["arms"] if a["arm"] == "b" for m in a["metrics"] if m["metric"] == "bits_per_dim")
    assert study_run.data.metrics["b.bits_per_dim.difference"] == pytest.approx(m["difference"]["mean"])
    # What TDC's bits/dim costs the single model: one entry per seed, from each replicate's curve.
    assert [len(e["per_seed"]) for e in result["equivalence"]] == [2, 2]
    assert result["reused"] == 1  # the replicate finished before the kill
    assert "(1 of 4 replicates were already finished and reused)" in (tmp_path / "out" / "study.md").read_text()
    assert "What TDC's quality costs a single model" in (tmp_path / "out" / "study.md").read_text()


def test_equivalence_is_the_matching_single_model_flops_over_tdcs_per_seed():
    from tdc_core.evaluation.curves import Curve
    from tdc_core.run.study import equivalence

    pt = _curve_point

    def curve(tdc_bpd):
        return Curve(single=[pt(1.0, 5.0), pt(2.0, 4.0), pt(4.0, 3.0)], tdc=pt(4.0, tdc_bpd, kind="tdc"),
                     num_images=1, heldout_per_image=1, bpd_timesteps=None)

    (e,) = equivalence({"a": [curve(3.5), curve(3.0), curve(2.5), curve(6.0)]})
    assert e.per_seed == [0.75, 1.0, None, None]  # 3 of 4 FLOPs, all 4, beyond the curve, before it
    assert e.ratio.values == [0.75, 1.0] and e.ratio.mean == pytest.approx(0.875)
    # The two ways to have no ratio are told apart: better than every point, or worse than the first.
    assert e.per_seed_text == ["0.750", "1.000", "TDC beyond the curve",
                               "TDC worse than the curve's first point (< 0.250)"]


def test_the_curves_zoom_keeps_the_end_of_every_run_in_view():
    """Arms of very different lengths (a short and a 4x longer stage 1): the y axis shows the end
    of both, TDC included, and still leaves the far worse early snapshots out."""
    from matplotlib.figure import Figure

    from tdc_core.evaluation.curves import _zoom

    short = [(1.0, 8.0), (2.0, 4.8), (3.0, 4.65), (4.0, 4.6), (4.0, 4.58)]       # (training FLOPs, bits/dim)
    long = [(1.0, 8.0), (4.0, 4.6), (8.0, 4.4), (12.0, 4.35), (16.0, 4.3), (16.0, 4.28)]
    ax = Figure().subplots()
    _zoom(ax, [short, long])
    lo, hi = ax.get_ylim()
    assert lo < 4.28 and hi > 4.65  # the last half of each run, its TDC point included
    assert hi < 8.0  # the first snapshots stay out of the zoom


def test_contrasts_pair_two_arms_models_by_seed():
    from tdc_core.run.study import Contrast

    arms = {"new": {s: _replicate(1.0 + 0.1 * s, 2.0) for s in (0, 1, 2)},
            "old": {s: _replicate(1.05 + 0.1 * s + 0.01 * s, 1.5) for s in (0, 1, 2, 3)}}
    contrasts = [Contrast(name="recipe", a="new.tdc", b="old.tdc"),
                 Contrast(name="cross", a="new.tdc", b="old.baseline")]
    s = summarise(name="x", arms=arms, contrasts=contrasts)
    recipe = s.contrasts[0]
    assert recipe.seeds == [0, 1, 2]  # only the seeds both arms ran
    m = next(m for m in recipe.metrics if m.metric == "bits_per_dim")
    assert m.difference.values == pytest.approx([-0.05, -0.06, -0.07])  # per seed, a − b
    assert m.verdict == "a better"
    cross = next(m for m in s.contrasts[1].metrics if m.metric == "bits_per_dim")
    assert cross.difference.values == pytest.approx([-0.5, -0.4, -0.3]) and cross.verdict == "a better"
    p = next(m for m in recipe.metrics if m.metric == "precision")
    assert p.difference.mean == pytest.approx(0.0) and p.verdict == "no clear difference"
    assert "## Contrasts between arms" in study_markdown(s) and "`recipe`" in study_markdown(s)


def test_contrasts_must_name_arms_of_the_study(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: s\narms: [{name: a, preset: smoke}, {name: b, preset: smoke}]\nseeds: [0]\n"
                   "contrasts: [{name: c, a: a.tdc, b: z.baseline}]\n")
    with pytest.raises(ConfigError, match=r"b='z.baseline' names no arm"):
        load_study(bad)
    bad.write_text("name: s\narms: [{name: a, preset: smoke}]\nseeds: [0]\n"
                   "contrasts: [{name: c, a: a.tdc, b: a.shared}]\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_study(bad)


def test_an_arm_without_baseline_reports_tdc_alone_and_enters_contrasts_as_tdc():
    """baseline.enabled=false: the arm's TDC numbers with intervals, no difference or verdict
    made up, and its TDC compared with other arms' models through contrasts."""
    from tdc_core.run.study import ALONE, Contrast, contrast_panels, difference_panels, summary_metrics

    arms = {"n5": {s: _replicate(1.0 + 0.1 * s, 1.2) for s in (0, 1, 2)},
            "n2": {s: {"tdc": {"bits_per_dim": 1.03 + 0.1 * s, "precision": 0.5}, "baseline": {}} for s in (0, 1, 2)}}
    s = summarise(name="x", arms=arms, contrasts=[Contrast(name="n2-vs-n5", a="n2.tdc", b="n5.tdc")])
    alone = next(a for a in s.arms if a.arm == "n2")
    m = next(m for m in alone.metrics if m.metric == "bits_per_dim")
    assert m.baseline is None and m.difference is None and m.verdict == ALONE
    assert m.tdc.values == pytest.approx([1.03, 1.13, 1.23]) and m.tdc.low < m.tdc.mean < m.tdc.high
    d = next(m for m in s.contrasts[0].metrics if m.metric == "bits_per_dim")
    assert d.difference.values == pytest.approx([0.03, 0.03, 0.03]) and d.verdict == "b better"
    # The difference plot and the MLflow metrics hold the arm with a baseline only; the alone arm's
    # TDC numbers are still logged.
    assert all(r.label == "n5" for _, rows in difference_panels(s) for r in rows)
    # The contrast plot holds every contrast, the alone arm's included: a − b per seed.
    panels = dict(contrast_panels(s))
    (row,) = panels["held-out bits/dim: a − b"]
    assert row.label == "n2-vs-n5" and row.values == pytest.approx((0.03, 0.03, 0.03))
    flat = summary_metrics(s)
    assert flat["n2.bits_per_dim.tdc"] == pytest.approx(m.tdc.mean) and "n2.bits_per_dim.difference" not in flat
    md = study_markdown(s)
    assert "## Arm `n2`: 3 training seeds [0, 1, 2], TDC alone (no baseline)" in md
    assert f"| held-out bits/dim | {m.tdc.mean:.4g} [" in md


def test_a_study_refuses_an_arm_without_evaluation_and_the_baseline_of_an_arm_without_one(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("name: s\narms: [{name: a, preset: smoke}, {name: b, preset: smoke, overrides: "
                 "[baseline.enabled=false]}]\nseeds: [0]\ncontrasts: [{name: c, a: a.tdc, b: b.tdc}]\n")
    assert [a.name for a in load_study(f).arms] == ["a", "b"]  # TDC alone is a valid arm
    f.write_text(f.read_text().replace("b: b.tdc", "b: b.baseline"))
    with pytest.raises(ConfigError, match=r"contrast c: b='b.baseline', but arm b has baseline.enabled=false"):
        load_study(f)
    f.write_text(f.read_text().replace("baseline.enabled=false", "eval.enabled=false").replace("b.baseline", "b.tdc"))
    with pytest.raises(ConfigError, match="arm b: eval.enabled=false leaves the study nothing to summarise"):
        load_study(f)


def test_summary_only_rederives_the_study_from_its_replicates(tmp_path, capsys):
    """`tdc study --summary-only`: from replicates.json alone (no run folders), nothing trained."""
    import json

    from flows.cli import main

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("name: s\narms: [{name: a, preset: smoke}, {name: b, preset: smoke, "
                         "overrides: [finetune.steps=3]}]\nseeds: [0, 1]\n"
                         "contrasts: [{name: ab, a: b.tdc, b: a.tdc}]\n")
    out = tmp_path / "out"
    out.mkdir()
    reps = [{"arm": arm, "seed": seed, "run_dir": str(tmp_path / "gone"), **_replicate(t, 2.0)}
            for arm, seed, t in (("a", 0, 1.0), ("a", 1, 1.2), ("b", 0, 0.9), ("b", 1, 1.0))]
    (out / "replicates.json").write_text(json.dumps(reps))
    assert main(["study", str(spec_file), "--summary-only", "--out-dir", str(out)]) == 0
    from tdc_core.run.study import StudySummary

    s = StudySummary.model_validate_json((out / "study.json").read_text())
    ab = next(m for m in s.contrasts[0].metrics if m.metric == "bits_per_dim")
    assert ab.difference.values == pytest.approx([-0.1, -0.2])
    assert "### `ab`" in (out / "study.md").read_text()
    assert (out / "contrasts.png").stat().st_size > 1000
    # The wall time of the invocation that ran the replicates survives a re-summary of the same
    # replicates, but not one that adds a seed (it no longer describes them).
    (out / "study.json").write_text(s.model_copy(update={"seconds": 600.0, "reused": 1}).model_dump_json())
    assert main(["study", str(spec_file), "--summary-only", "--out-dir", str(out)]) == 0
    assert "Wall time of this invocation: 10.0 min (1 of 4" in (out / "study.md").read_text()
    spec_file.write_text(spec_file.read_text().replace("seeds: [0, 1]", "seeds: [0, 1, 2]"))
    more = [*reps, *({"arm": arm, "seed": 2, "run_dir": str(tmp_path / "gone"), **_replicate(1.1, 2.0)}
                     for arm in ("a", "b"))]
    (out / "replicates.json").write_text(json.dumps(more))
    assert main(["study", str(spec_file), "--summary-only", "--out-dir", str(out)]) == 0
    assert "Wall time" not in (out / "study.md").read_text()
    assert StudySummary.model_validate_json((out / "study.json").read_text()).reused == 0
    spec_file.write_text(spec_file.read_text().replace("seeds: [0, 1, 2]", "seeds: [0, 1]"))
    (out / "replicates.json").write_text(json.dumps(reps[:3]))
    assert main(["study", str(spec_file), "--summary-only", "--out-dir", str(out)]) != 0
    assert "lacks 1 replicate(s) of the study file: b seed 1" in capsys.readouterr().err
    # A part-run study (--partial): each arm over the seeds it ran, the contrast over the seeds
    # both arms ran, and what is missing named, in study.json and at the top of study.md.
    assert main(["study", str(spec_file), "--summary-only", "--partial", "--out-dir", str(out)]) == 0
    s = StudySummary.model_validate_json((out / "study.json").read_text())
    assert s.not_run == ["b seeds 1"] and [a.seeds for a in s.arms] == [[0, 1], [0]]
    assert s.contrasts[0].seeds == [0]
    assert next(m for m in s.contrasts[0].metrics if m.metric == "bits_per_dim").difference.values == pytest.approx(
        [-0.1])
    assert "**Part run.** Not run yet, so not below: b seeds 1." in (out / "study.md").read_text()
    (out / "replicates.json").write_text(json.dumps(reps[:2]))  # arm b not run at all: its contrast neither
    assert main(["study", str(spec_file), "--summary-only", "--partial", "--out-dir", str(out)]) == 0
    s = StudySummary.model_validate_json((out / "study.json").read_text())
    assert s.not_run == ["b seeds 0, 1", "contrast ab (needs b)"] and s.contrasts == []
    assert [a.arm for a in s.arms] == ["a"]
    capsys.readouterr()
    assert main(["study", str(spec_file), "--partial"]) == 2
    assert "--partial summarises the replicates a study has (with --summary-only)" in capsys.readouterr().err


def test_a_run_is_a_replicate_of_an_arm_when_only_where_it_ran_or_an_unscored_baseline_differ():
    from tdc_core.config import apply_overrides
    from tdc_core.run.study import replicate_differences

    alone = Arm(name="a", preset="smoke", overrides=("baseline.enabled=false", "finetune.steps=3"))
    made = replicate_config(alone, seed=1)
    assert replicate_differences(alone, seed=1, made_with=made) == []
    # where it ran, and the baseline that TDC's numbers do not depend on, do not count...
    elsewhere = apply_overrides(made, ["orchestration.group_retries=3", "baseline.enabled=true"])
    assert replicate_differences(alone, seed=1, made_with=elsewhere) == []
    # ...but a training setting or the seed does, and the baseline for an arm that scores one
    assert replicate_differences(alone, seed=0, made_with=made) == ["train.seed: 1, 0"]
    assert replicate_differences(alone, seed=1, made_with=apply_overrides(made, ["finetune.steps=4"])) == [
        "finetune.steps: 4, 3"]
    with_baseline = Arm(name="b", preset="smoke", overrides=("finetune.steps=3",))
    assert replicate_differences(with_baseline, seed=1, made_with=made) == ["baseline.enabled: False, True"]


def test_summary_only_adds_replicates_run_elsewhere_checked_against_their_arms(tmp_path, capsys):
    """`tdc study --summary-only --add SOURCE`: replicates run as one-replicate study files (or
    another study's arm, renamed) join the study, each shown to be a replicate of its arm."""
    import json

    from flows.cli import main
    from tdc_core.config import write_run_config
    from tdc_core.run.layout import RunLayout, default_run_dir
    from tdc_core.run.study import StudySummary

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("name: s\narms: [{name: a, preset: smoke, overrides: [baseline.enabled=false]}, "
                         "{name: b, preset: smoke, overrides: [baseline.enabled=false, finetune.steps=3]}]\n"
                         "seeds: [0, 1]\ncontrasts: [{name: ab, a: b.tdc, b: a.tdc}]\n")
    spec = load_study(spec_file)
    a, b = spec.arms

    def rep(arm: str, seed: int, bpd: float, run_dir) -> dict:
        return {"arm": arm, "seed": seed, "run_dir": str(run_dir), "tdc": {"bits_per_dim": bpd}, "baseline": {}}

    def folder(name: str, arm: Arm, seed: int):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        write_run_config(RunLayout(run), replicate_config(arm, seed=seed))
        return run

    out = tmp_path / "out"
    out.mkdir()
    original = [rep("a", 0, 1.0, tmp_path / "gone"), rep("a", 1, 1.2, tmp_path / "gone"),
                rep("b", 0, 0.9, tmp_path / "gone")]
    (out / "replicates.json").write_text(json.dumps(original))
    one = tmp_path / "one"
    one.mkdir()
    (one / "replicates.json").write_text(json.dumps([rep("b", 1, 1.0, folder("b1", b, 1)),
                                                    rep("b", 7, 1.0, tmp_path / "gone")]))
    assert main(["study", str(spec_file), "--summary-only", "--out-dir", str(out), "--add", str(one)]) == 0
    said = capsys.readouterr().out
    assert f"added b seed 1 from {one}: its run folder's config.yaml is the arm's" in said
    assert "b seed 7 left out (study s replicates seeds 0, 1)" in said
    s = StudySummary.model_validate_json((out / "study.json").read_text())
    assert s.not_run == [] and [x.seeds for x in s.arms] == [[0, 1], [0, 1]]
    assert next(m for m in s.contrasts[0].metrics if m.metric == "bits_per_dim").difference.values == pytest.approx(
        [-0.1, -0.2])
    added = json.loads((out / "replicates.json").read_text())
    assert [(r["arm"], r["seed"]) for r in added] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert added[3]["added_from"] == str(one)

    # Another study's arm, renamed; its folder is gone but carries the arm's config hash: it
    # replaces the replicate of that arm and seed, and says so.
    other = tmp_path / "other.json"
    other.write_text(json.dumps([rep("x", 0, 1.1, tmp_path / "runs" / default_run_dir(
        replicate_config(a, seed=0)).name), rep("y", 0, 5.0, tmp_path / "gone")]))
    assert main(["study", str(spec_file), "--summary-only", "--out-dir", str(out), "--add", f"{other}:x=a"]) == 0
    said = capsys.readouterr().out
    assert "run folder gone; its name carries the arm's config hash" in said and "replaced a seed 0" in said
    added = json.loads((out / "replicates.json").read_text())
    assert added[0]["tdc"] == {"bits_per_dim": 1.1} and added[0]["added_from"] == f"{other}:x=a arm x"

    # What cannot be shown to be a replicate of its arm is refused, and nothing is written.
    before = (out / "replicates.json").read_text()
    for records, source_suffix, message in (
            ([rep("a", 1, 9.0, folder("a-as-b", b, 1))], "", "made with other settings than the arm (1, as "
                                                            "'key: run value, arm value'): finetune.steps: 3, "),
            ([rep("a", 1, 9.0, tmp_path / "runs" / "elsewhere")], "", "is gone and its name is not the arm's"),
            ([rep("z", 1, 9.0, tmp_path / "gone")], "", "arm z is not an arm of study s; allowed: a, b"),
            ([rep("a", 1, 9.0, tmp_path / "gone")], ":q=a", "holds no replicate of arm q"),
            ([{"arm": "a", "seed": 1}], "", "is not a study replicate")):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(records))
        assert main(["study", str(spec_file), "--summary-only", "--out-dir", str(out), "--add",
                     f"{bad}{source_suffix}"]) == 2
        assert message in capsys.readouterr().err
        assert (out / "replicates.json").read_text() == before
    assert main(["study", str(spec_file), "--add", str(one)]) == 2
    assert "--add copies replicates into a study's summary (with --summary-only)" in capsys.readouterr().err


def test_summary_only_draws_no_curve_for_a_tdc_alone_replicate(tmp_path):
    """A TDC-alone arm's replicate may take its numbers from a run that also trained a baseline
    (TDC's numbers do not depend on it); that run's single-model curve is not the arm's."""
    import json

    from flows.cli import main
    from tdc_core.evaluation.curves import Curve
    from tdc_core.run.layout import RunLayout

    pt = _curve_point

    run = tmp_path / "run-with-baseline"
    RunLayout(run).curve_json.parent.mkdir(parents=True)
    RunLayout(run).curve_json.write_text(Curve(single=[pt(1.0, 5.0), pt(2.0, 4.0)], tdc=pt(2.0, 3.9, kind="tdc"),
                                               num_images=1, heldout_per_image=1, bpd_timesteps=None).model_dump_json())
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("name: s\narms: [{name: a, preset: smoke, overrides: [baseline.enabled=false]}]\n"
                         "seeds: [0, 1]\n")
    out = tmp_path / "out"
    out.mkdir()
    reps = [{"arm": "a", "seed": seed, "run_dir": str(run), "tdc": {"bits_per_dim": t}, "baseline": {}}
            for seed, t in ((0, 3.9), (1, 3.8))]
    (out / "replicates.json").write_text(json.dumps(reps))
    assert main(["study", str(spec_file), "--summary-only", "--out-dir", str(out)]) == 0
    assert not (out / "curves.png").exists()
    reps = [{**r, "baseline": {"bits_per_dim": 4.0}} for r in reps]  # the same runs, as a with-baseline arm
    spec_file.write_text(spec_file.read_text().replace("overrides: [baseline.enabled=false]", "overrides: []"))
    (out / "replicates.json").write_text(json.dumps(reps))
    assert main(["study", str(spec_file), "--summary-only", "--out-dir", str(out)]) == 0
    assert (out / "curves.png").stat().st_size > 1000


def test_every_committed_study_file_loads_with_valid_replicate_configs():
    """What a reader re-runs must still parse: a renamed config field or a removed preset shows
    here, not in the middle of someone's multi-hour study."""
    from pathlib import Path

    # studies/headline.yaml and levers.yaml are the generated tables' row lists (tests/test_headline.py), not studies.
    files = sorted(f for f in (Path(__file__).resolve().parents[1] / "studies").glob("*.yaml")
                   if f.name not in {"headline.yaml", "levers.yaml"})
    assert len(files) >= 5
    for f in files:
        spec = load_study(f)  # builds every arm × seed config
        assert spec.arms and spec.seeds, f


def test_forest_panels_with_the_same_rows_name_them_once_per_figure_row():
    """Contrast names are long: repeated in every panel they crowd the x tick labels."""
    from tdc_core.evaluation.plots import interval_figure
    from tdc_core.run.study import DifferenceRow

    def row(label: str) -> DifferenceRow:
        return DifferenceRow(label=label, mean=0.1, low=0.0, high=0.2, values=(0.05, 0.15))

    rows = [row("sensitivity-vs-single-model"), row("carried-vs-fresh-adamw")]
    fig = interval_figure([(f"metric {i}", rows) for i in range(4)])
    def named(fig) -> list[list[str]]:
        return [[t.get_text() for t in ax.get_yticklabels() if t.get_text()] for ax in fig.axes if ax.get_visible()]

    assert named(fig) == [["sensitivity-vs-single-model", "carried-vs-fresh-adamw"], [], [],
                     ["sensitivity-vs-single-model", "carried-vs-fresh-adamw"]]
    fig = interval_figure([("a", rows), ("b", rows[:1])])  # different rows: each panel names its own
    assert named(fig) == [
        ["sensitivity-vs-single-model", "carried-vs-fresh-adamw"], ["sensitivity-vs-single-model"]]


def test_forest_panels_keep_at_most_two_rows_of_padding_however_many_rows():
    """A margin proportional to the rows left a third of an 11-contrast panel empty."""
    from tdc_core.evaluation.plots import interval_figure
    from tdc_core.run.study import DifferenceRow

    for n in (1, 3, 11):
        rows = [DifferenceRow(label=f"c{i}", mean=0.1, low=0.0, high=0.2, values=(0.05, 0.15)) for i in range(n)]
        ax = interval_figure([("m", rows)]).axes[0]
        low, high = ax.get_ylim()
        assert low < 0 and high > n - 1  # every row inside the panel
        assert (high - low) - (n - 1) <= 2.0  # padding above and below together at most two rows
