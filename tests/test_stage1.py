"""Stage 1 by content: runs that differ only in stage-2 settings share one probe, profile and
shared model; the baseline continues that shared run instead of training its start again."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from tdc_core.config import load_config, stage1_key
from tdc_core.run.layout import RunLayout
from tdc_core.run.runlock import TOKEN_ENV, RunLock
from tdc_core.run.stage1 import attach_stage1, hold_stage1, stage1_dir
from tdc_core.run.stages import baseline_config, baseline_stage, group_stage, profile_stage, shared_stage
from tdc_core.training.checkpoint import load_checkpoint
from tdc_core.training.trainer import run_training

FAST = ["train.steps=8", "profile.profile_steps=4", "train.checkpoint_every=2", "profile.num_buckets=10"]


def _cfg(*extra: str):
    return load_config(preset="smoke", overrides=[*FAST, *extra])


@pytest.mark.parametrize("stage2", ["budget.k=0.8", "grouping.num_groups=2", "grouping.cost=snr", "finetune.lr=0.001",
                                    "prune.enabled=false", "baseline.steps=30", "eval.num_samples=9", "name=other"])
def test_stage2_settings_do_not_change_the_stage1_key(stage2):
    assert stage1_key(_cfg(stage2)) == stage1_key(_cfg())


@pytest.mark.parametrize("stage1", ["train.seed=1", "train.lr=0.0005", "train.steps=9", "profile.num_buckets=12",
                                    "model.base_channels=24", "diffusion.num_timesteps=200"])
def test_stage1_settings_change_the_stage1_key(stage1):
    assert stage1_key(_cfg(stage1)) != stage1_key(_cfg())


def _weights(path) -> dict[str, torch.Tensor]:
    p = load_checkpoint(path)
    return {f"{part}.{k}": v for part in ("model", "ema") for k, v in p[part].items()}


def test_two_runs_differing_in_budget_k_share_one_probe_profile_and_shared_model(tmp_path):
    a, b = RunLayout(tmp_path / "runs" / "a"), RunLayout(tmp_path / "runs" / "b")
    cfg_a, cfg_b = _cfg("budget.k=0.5"), _cfg("budget.k=0.8")
    assert attach_stage1(a, cfg_a) == attach_stage1(b, cfg_b) == stage1_dir(cfg_a, runs_root=tmp_path / "runs")
    assert a.shared_checkpoint == b.shared_checkpoint and a.profile_json == b.profile_json
    profile_a = profile_stage(cfg_a, a)
    shared_a = shared_stage(cfg_a, a)
    stamps = {p: p.stat().st_mtime_ns for p in (a.shared_checkpoint, a.profile_json)}

    profile_b = profile_stage(cfg_b, b)  # finds the shared profile: the probe is not profiled again
    shared_b = shared_stage(cfg_b, b)    # finds the shared model finished: no step trained
    assert profile_b == profile_a and shared_b.resumed_from == shared_a.step == cfg_a.train.steps
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    grouped_a, grouped_b = group_stage(cfg_a, a), group_stage(cfg_b, b)
    assert grouped_a.grouping == grouped_b.grouping  # one profile: the same groups
    assert [x.fraction for x in grouped_a.plan.budgets] != [x.fraction for x in grouped_b.plan.budgets]
    # Nothing of stage 1 in the run folders themselves.
    assert not (a.root / "checkpoints").exists() and not (b.root / "profile").exists()


def test_a_different_training_seed_gets_its_own_stage1(tmp_path):
    a, b = RunLayout(tmp_path / "a"), RunLayout(tmp_path / "b")
    assert attach_stage1(a, _cfg("train.seed=0")) != attach_stage1(b, _cfg("train.seed=1"))


def test_a_run_folder_with_stage1_of_its_own_keeps_it(tmp_path):
    """Run folders made before stage-1 folders existed resume where their stage 1 is."""
    cfg, layout = _cfg(), RunLayout(tmp_path / "old")
    run_training(cfg, run_dir=layout.root, steps=2)
    assert attach_stage1(layout, cfg) == layout.root
    assert not layout.stage1_pointer.exists() and layout.shared_checkpoint == layout.root / "checkpoints" / "last.pt"
    assert not list(tmp_path.glob("stage1-*"))


def test_baseline_continuing_the_shared_run_equals_training_it_from_scratch(tmp_path):
    cfg, layout = _cfg(), RunLayout(tmp_path / "runs" / "r")
    attach_stage1(layout, cfg)
    profile_stage(cfg, layout)
    shared_stage(cfg, layout)
    continued = baseline_stage(cfg, layout, steps=12)
    assert continued.resumed_from == cfg.train.steps and continued.step == 12  # only the last 4 steps trained
    scratch = run_training(baseline_config(cfg, steps=12), run_dir=tmp_path / "scratch")
    assert scratch.resumed_from == 0
    a, b = _weights(continued.checkpoint), _weights(scratch.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit


def test_a_baseline_shorter_than_the_shared_run_trains_from_scratch(tmp_path):
    cfg, layout = _cfg(), RunLayout(tmp_path / "runs" / "r")
    attach_stage1(layout, cfg)
    shared_stage(cfg, layout)
    assert baseline_stage(cfg, layout, steps=5).resumed_from == 0


def test_a_second_run_waits_for_the_stage1_folder_and_gives_the_outer_token_back(tmp_path):
    cfg, layout = _cfg(), RunLayout(tmp_path / "runs" / "r")
    attach_stage1(layout, cfg)
    other = RunLock(layout.stage1_root, command="another run's shared training").acquire()
    heard: list[str] = []
    entered = threading.Event()
    with RunLock(layout.root, command="tdc run"):
        outer = os.environ[TOKEN_ENV]

        def second() -> None:
            with hold_stage1(layout, command="flow tdc: shared training", warn=heard.append) as lock:
                assert lock is not None and os.environ[TOKEN_ENV] != outer  # its workers act under it
                entered.set()

        t = threading.Thread(target=second)
        t.start()
        assert not entered.wait(1.5)  # held by the other run: it waits
        other.release()
        t.join(timeout=60)
        assert entered.is_set()
        assert os.environ[TOKEN_ENV] == outer  # the run's group workers still find their owner's token
    assert len(heard) == 1 and "another run's shared training" in heard[0] and "waiting" in heard[0]


def test_no_lock_to_take_when_stage1_lives_in_the_run_folder(tmp_path):
    with hold_stage1(RunLayout(tmp_path / "plain"), command="x") as lock:
        assert lock is None


def test_snapshots_hold_the_ema_weights_the_run_had_at_those_steps(tmp_path):
    """The curve's points: stage 1 keeps 25/50/75 % of its steps, the baseline 25/50/75 % of the
    way beyond stage 1; each equals the EMA of a run stopped at that step."""
    from tdc_core.run.stages import baseline_snapshot_steps, stage1_snapshot_steps
    from tdc_core.training.trainer import load_model, snapshot_path

    cfg, layout = _cfg(), RunLayout(tmp_path / "runs" / "r")
    assert stage1_snapshot_steps(cfg) == [2, 4, 6] and baseline_snapshot_steps(cfg, steps=16) == [10, 12, 14]
    assert baseline_snapshot_steps(cfg, steps=5) == [1, 2, 4]  # not beyond stage 1: its whole length
    attach_stage1(layout, cfg)
    profile_stage(cfg, layout)  # the probe (4 steps) keeps steps 2 and 4, shared training step 6
    shared_stage(cfg, layout)
    baseline_stage(cfg, layout, steps=16)
    stage1 = RunLayout(layout.stage1_root).snapshots_dir
    base = RunLayout(layout.baseline_dir).snapshots_dir
    assert sorted(p.name for p in stage1.iterdir()) == ["step-2.pt", "step-4.pt", "step-6.pt"]
    assert sorted(p.name for p in base.iterdir()) == ["step-10.pt", "step-12.pt", "step-14.pt"]
    stopped = run_training(cfg, run_dir=tmp_path / "stopped", steps=12)
    a = load_model(snapshot_path(base, 12)).model.state_dict()
    b = load_checkpoint(stopped.checkpoint)["ema"]
    assert all(torch.equal(a[k], b[k]) for k in b) and load_model(snapshot_path(base, 12)).step == 12


def test_the_curve_says_what_tdcs_quality_costs_a_single_model():
    from tdc_core.evaluation.curves import Curve, CurvePoint

    def pt(name, flops, bpd, kind="single"):
        return CurvePoint(name=name, kind=kind, step=None, training_flops=flops, sampling_flops_per_image=1.0,
                          bits_per_dim=bpd, bits_per_dim_se=0.1, eps_mse=0.1, eps_mse_se=0.01, x0_mse=0.1,
                          eps_mse_min_snr=0.1)

    single = [pt("a", 1.0, 5.0), pt("b", 2.0, 4.0), pt("c", 4.0, 3.0)]
    curve = Curve(single=single, tdc=pt("tdc", 4.0, 3.5, kind="tdc"), num_images=1, heldout_per_image=1,
                  bpd_timesteps=None)
    assert curve.matching_flops() == 3.0  # halfway from (2, 4.0) to (4, 3.0)
    better = curve.model_copy(update={"tdc": pt("tdc", 4.0, 2.9, kind="tdc")})
    assert better.matching_flops() is None  # the single model never gets there
