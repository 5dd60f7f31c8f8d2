"""The Prefect flow `tdc` with MLflow lineage, on the smoke preset (throwaway stores)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tdc_core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.steps=12", "profile.profile_steps=6", "finetune.steps=4"]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _runs(uri: str):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("tdc")
    return c, c.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def flow_run(harness, tmp_path_factory):
    from flows.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("flow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config(preset="smoke", overrides=FAST)
    summary = run_pipeline(cfg, run_dir=str(tmp / "run"), workers=2, tracking_uri=uri)
    return cfg, summary, uri, tmp


def test_run_tree_params_metrics_and_artifacts(flow_run):
    cfg, summary, uri, _ = flow_run
    client, runs = _runs(uri)
    parent = client.get_run(summary.mlflow_run_id)
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"profile", "group", "shared-train", "group-0", "group-1", "group-2"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert parent.data.params["train.lr"] == str(cfg.train.lr) and len(parent.data.params) > 50
    for key in ("sampling_flops_ratio", "training_flops_ratio", "training_flops"):
        assert key in parent.data.metrics
    loss = client.get_metric_history(children["shared-train"].info.run_id, "loss")
    assert [m.step for m in loss] == sorted(m.step for m in loss) and loss[-1].step == cfg.train.steps
    profile = client.get_metric_history(children["profile"].info.run_id, "bucket_loss_mean")
    assert len(profile) == cfg.profile.num_buckets
    arts = lambda run, path="": {a.path for a in client.list_artifacts(run.info.run_id, path)}  # noqa: E731
    assert {"profile/profile.json", "profile/profile.png"} <= arts(children["profile"], "profile")
    assert "grouping/grouping.png" in arts(children["group"], "grouping")
    assert "checkpoints/last.pt" in arts(children["group-1"], "checkpoints")
    assert {"report.md", "costs.json"} <= arts(parent)
    baseline = client.get_run(summary.baseline_run_id)
    assert baseline.data.tags["tdc.kind"] == "baseline" and "mlflow.parentRunId" not in baseline.data.tags
    assert baseline.data.metrics["steps"] >= summary.shared.step
    assert parent.data.tags["tdc.baseline_run_id"] == baseline.info.run_id
    assert parent.data.tags["prefect.flow_run_id"]
    champion = client.get_model_version_by_alias("tdc-ensemble-smoke", "champion")
    # Ranked by held-out bits/dim: stable at small n and free of any feature extractor.
    assert champion.run_id == parent.info.run_id and champion.tags["score_name"] == "bits_per_dim"
    assert float(champion.tags["score"]) == next(lk.bpd for lk in summary.comparison.likelihood if lk.name == "tdc")
    for run in (parent, baseline):  # the same metric names on both: side by side in the UI
        assert {"fid_mean", "sampling_flops_per_image", "heldout_eps_mse", "bits_per_dim", "precision",
                "recall", "memorized_share"} <= set(run.data.metrics)
        assert "kid_mean" not in run.data.metrics  # 64 images per seed: KID is not reported below 2,000
        assert "not comparable with Inception FID" in run.data.tags["fid.comparability"]
    # The shared model is scored by the same evaluator, on its own run.
    assert {"heldout_eps_mse", "bits_per_dim"} <= set(client.get_run(children["shared-train"].info.run_id).data.metrics)
    assert "tdc_minus_baseline_bpd_ci_high" in parent.data.metrics
    assert len(client.get_metric_history(parent.info.run_id, "fid_per_seed")) == len(cfg.eval.seeds)
    assert {"comparison/comparison.md", "comparison/comparison.png"} <= arts(parent, "comparison")
    ensemble = {a.path for a in client.list_artifacts(parent.info.run_id, "ensemble")}
    assert "ensemble/grouping.json" in ensemble and "ensemble/group-2" in ensemble


def test_group_fine_tunes_overlap_in_time(flow_run):
    _, summary, _, _ = flow_run
    spans = sorted((g.started_at, g.finished_at) for g in summary.groups)
    assert any(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1)), spans


def test_rerun_reuses_finished_stages_and_run_tree(flow_run):
    from flows.pipeline import run_pipeline

    cfg, summary, uri, tmp = flow_run
    from tdc_core.run.layout import RunLayout

    run = Path(summary.run_dir)
    stamps = {p: p.stat().st_mtime_ns for p in [RunLayout(run).profile_json, run / "grouping" / "grouping.json",
                                                  *(run / "groups").glob("group-*/result.json")]}
    again = run_pipeline(cfg, run_dir=str(tmp / "run"), workers=2, tracking_uri=uri)
    assert again.mlflow_run_id == summary.mlflow_run_id
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing recomputed
    _, runs = _runs(uri)
    names = sorted(r.info.run_name for r in runs)
    assert len(names) == len(set(names)) == 8  # parent, baseline, 6 children: no duplicates


def test_changing_an_eval_setting_reevaluates_without_training(flow_run):
    from flows.pipeline import run_pipeline
    from tdc_core.run.layout import RunLayout

    cfg, summary, uri, tmp = flow_run
    layout = RunLayout(Path(summary.run_dir))
    trained = [layout.shared_checkpoint, layout.profile_json, layout.grouping_json, layout.baseline_checkpoint,
               *(layout.group_checkpoint(g) for g in range(len(summary.groups))),
               *(layout.group_result(g) for g in range(len(summary.groups)))]
    stamps = {p: p.stat().st_mtime_ns for p in trained}
    other = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"heldout_per_image": 7})})
    again = run_pipeline(other, run_dir=summary.run_dir, workers=2, tracking_uri=uri)
    assert {p: p.stat().st_mtime_ns for p in trained} == stamps  # no training stage ran
    assert all(h.per_image == 7 for h in again.comparison.heldout)  # the evaluation did
    assert again.mlflow_run_id == summary.mlflow_run_id and again.baseline_run_id == summary.baseline_run_id
    client, runs = _runs(uri)
    assert len(runs) == 8  # parent, baseline, 6 children: the same runs
    assert client.get_run(summary.mlflow_run_id).data.tags["eval.heldout_per_image"] == "7"


def test_without_a_baseline_the_flow_scores_tdc_alone(harness, tmp_path):
    """baseline.enabled=false: no single model is trained, and TDC still gets its evaluation
    (FID, precision/recall, held-out error and bits/dim) in the run folder, report and MLflow."""
    from flows.pipeline import run_pipeline
    from tdc_core.run.layout import RunLayout

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(preset="smoke", overrides=[*FAST, "baseline.enabled=false", "eval.num_samples=16",
                                                 "eval.seeds=[0]"])
    summary = run_pipeline(cfg, run_dir=str(tmp_path / "run"), workers=2, tracking_uri=uri)
    layout = RunLayout(Path(summary.run_dir))
    assert summary.baseline is None and summary.baseline_run_id is None
    c = summary.comparison
    assert c.baseline is None and c.fid_difference is None and c.tdc.eval.fid_mean > 0
    assert [h.name for h in c.heldout] == ["tdc", "shared"] and layout.comparison_json.is_file()
    assert not layout.baseline_checkpoint.exists() and not layout.curve_json.exists()  # the curve needs a baseline
    assert "## TDC alone (no baseline)" in (layout.root / "report.md").read_text()
    client, runs = _runs(uri)
    assert not [r for r in runs if r.data.tags.get("tdc.kind") == "baseline"]
    metrics = client.get_run(summary.mlflow_run_id).data.metrics
    assert {"fid_mean", "bits_per_dim", "precision", "tdc_minus_shared_bpd"} <= set(metrics)
    assert not any(k.startswith("tdc_minus_baseline") for k in metrics)


@pytest.mark.slow
def test_killed_pipeline_resumes_shared_training(tmp_path):
    """SIGKILL during shared training; the re-run skips profiling and resumes the checkpoint."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "MLFLOW_TRACKING_URI":
           f"sqlite:///{tmp_path / 'mlflow.db'}", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--run-dir", str(tmp_path / "run"),
            "train.steps=400", "train.checkpoint_every=20", "profile.profile_steps=10", "finetune.steps=2",
            "baseline.enabled=false", "eval.enabled=false"]
    # Its own process group: the kill takes Prefect's temporary API server (a child) with it.
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    from tdc_core.run.stage1 import stage1_dir

    stage1 = stage1_dir(load_config(preset="smoke", overrides=args[args.index("train.steps=400"):]), runs_root=tmp_path)
    profile_json, ckpt = stage1 / "profile" / "profile.json", stage1 / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    try:
        while not (profile_json.exists() and ckpt.stat().st_mtime > profile_json.stat().st_mtime + 0.5):
            assert proc.poll() is None and time.time() < deadline, "shared training never started"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    from tdc_core.training.checkpoint import load_checkpoint

    killed_at = load_checkpoint(ckpt)["step"]
    assert 10 < killed_at < 400
    profiled = profile_json.stat().st_mtime_ns
    done = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert profile_json.stat().st_mtime_ns == profiled  # the finished stage was not recomputed
    assert "Traceback" not in done.stdout
    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = c.search_runs([c.get_experiment_by_name("tdc").experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert names.count("shared-train") == 1 and names.count("profile") == 1 and len(names) == len(set(names))
    shared = next(r for r in runs if r.info.run_name == "shared-train")
    assert shared.info.status == "FINISHED" and shared.data.metrics["steps"] == 400
    history = c.get_metric_history(shared.info.run_id, "loss")
    assert max(m.step for m in history) == 400


def test_single_model_curve_places_tdc_against_its_dense_run(flow_run):
    """The curve: the dense run's snapshots (stage 1, then the baseline continuing it) on the
    comparison's held-out set, the shared model and the baseline with the comparison's own
    numbers, TDC at its training FLOPs; in the report and on the baseline's MLflow run."""
    from tdc_core.evaluation.curves import Curve
    from tdc_core.records import load_record
    from tdc_core.run.layout import RunLayout

    cfg, summary, uri, _ = flow_run
    layout = RunLayout(Path(summary.run_dir))
    curve = load_record(layout.curve_json, Curve, what="curve")
    c = summary.comparison
    steps = [p.step for p in curve.single]
    base_steps = summary.costs.training.baseline_steps
    assert steps[:4] == [3, 6, 9, 12] and steps[-1] == base_steps and steps == sorted(steps)
    assert [p.name for p in curve.single][3] == "shared" and curve.single[-1].name == "baseline"
    lk = {s.name: s.bpd for s in c.likelihood}
    assert curve.single[3].bits_per_dim == lk["shared"] and curve.single[-1].bits_per_dim == lk["baseline"]
    assert curve.tdc.bits_per_dim == lk["tdc"] and curve.tdc.training_flops == summary.costs.training.tdc_flops
    per_step = curve.single[-1].training_flops / base_steps
    assert all(p.training_flops == pytest.approx(p.step * per_step) for p in curve.single)
    assert curve.num_images == c.heldout[0].num_images and layout.curve_png.stat().st_size > 10_000
    assert "## Single model along its training" in layout.report_md.read_text()
    client = MlflowClient(uri)
    history = client.get_metric_history(summary.baseline_run_id, "curve_bits_per_dim")
    assert sorted(m.step for m in history) == steps
