"""The fast paths compute the same function as the plain ones: channels_last, torch.compile,
and DDP under torchrun (same code path, exact resume, ranks in sync)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tdc_core.config import load_config
from tdc_core.model.unet import UNet
from tdc_core.training.trainer import spec_for

ROOT = Path(__file__).resolve().parents[1]


def _model_and_input(cfg):
    torch.manual_seed(0)
    model = UNet(spec_for(cfg)).eval()
    with torch.no_grad():  # zero-initialised output layers would make every comparison 0 == 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(4, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    t = torch.tensor([0, 10, 50, 99])
    return model, x, t


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_channels_last_model_computes_the_same_function(one_thread):
    cfg = load_config(preset="smoke")
    model, x, t = _model_and_input(cfg)
    with torch.no_grad():
        ref = model(x, t)
        fast = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t)
    assert _rel_err(fast, ref) < 1e-5


def test_bf16_autocast_stays_within_bf16_tolerance(one_thread):
    cfg = load_config(preset="smoke")
    model, x, t = _model_and_input(cfg)
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model(x, t).float()
    assert _rel_err(fast, ref) < 3e-2  # bf16 keeps 8 mantissa bits: ~0.4 % per op


@pytest.mark.slow
def test_compiled_training_step_matches_eager(tmp_path, one_thread):
    """train.compile=true trains the same model: after a few steps, weights agree with eager."""
    from tests.test_train import make_trainer

    # One UNet level (its residual block, attention, the middle block, the up path): every kind of
    # layer the digits models have, in half the smoke model's kernels, since inductor's code
    # generation on CPU is what this test spends its time on.
    base = ["train.steps=3", "train.log_every=1", "profile.profile_steps=0", "model.channel_mult=[1]",
            "model.attention_resolutions=[8]"]
    eager = make_trainer(load_config(preset="smoke", overrides=base))
    compiled = make_trainer(load_config(preset="smoke", overrides=[*base, "train.compile=true"]))
    assert compiled.train_model is not compiled.model  # really the compiled module
    eager.fit(until_step=3, checkpoint_path=tmp_path / "e.pt")
    compiled.fit(until_step=3, checkpoint_path=tmp_path / "c.pt")
    for (k, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), k


@pytest.mark.slow
def test_ddp_under_torchrun_resumes_exactly_and_keeps_ranks_in_sync(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "helpers" / "ddp_worker.py"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"result-{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["local_batch"] == 8  # the global batch 16, split
    assert not torch.equal(r0["first_batch"], r1["first_batch"])  # each rank draws its own data
    for key, a in r0["straight"].items():
        assert torch.equal(a, r1["straight"][key]), f"ranks diverged at {key}"  # DDP keeps them equal
        assert torch.equal(a, r0["resumed"][key]), f"resume differs at {key}"  # kill + resume = straight
        assert torch.equal(a, r1["resumed"][key])
    ckpt = torch.load(tmp_path / "b.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2 and ckpt["step"] == 10


@pytest.mark.slow
def test_pipeline_dense_training_runs_under_torchrun_and_continues_the_probe(tmp_path):
    """train.processes=2: the pipeline's shared training is a DDP job (gloo on CPU) that resumes
    the single-process probe's checkpoint, and its metrics and result reach MLflow and the flow."""
    from mlflow import MlflowClient

    from tasks.stage_tasks import _train_under_torchrun, train_processes
    from tasks.tracking import open_tracking
    from tdc_core.reporter import RecordingReporter
    from tdc_core.training.checkpoint import load_checkpoint
    from tdc_core.training.trainer import run_training

    # device=cpu: gloo on CPU even where one GPU is visible (two processes need two GPUs).
    cfg = load_config(preset="smoke", overrides=["train.steps=10", "profile.profile_steps=4", "train.batch_size=16",
                                                 "train.log_every=2", "train.processes=2", "train.num_threads=1",
                                                 "train.device=cpu"])
    assert train_processes(cfg) == 2
    run_training(cfg, run_dir=tmp_path, steps=4)  # the probe: one process
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = open_tracking(config=cfg, run_key="ddp", run_dir=tmp_path, tracking_uri=uri)
    progress = RecordingReporter()
    summary = _train_under_torchrun(cfg, tmp_path, tracking=tracking, run_id=tracking.parent_run_id,
                                    progress=progress, snapshot_steps=[7])
    assert summary.step == 10 and summary.resumed_from == 4
    snap = load_checkpoint(tmp_path / "snapshots" / "step-7.pt")  # rank 0 keeps the EMA weights on the way
    assert snap["kind"] == "snapshot" and snap["step"] == 7 and "optimizer" not in snap
    # Rank 0's progress reached this process while the job ran (or at its end): up to step 10.
    assert progress.steps and progress.steps[-1] == (10, 10) and progress.steps[0][0] >= 4
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["step"] == 10 and ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
    loss = MlflowClient(uri).get_metric_history(tracking.parent_run_id, "loss")
    assert sorted(m.step for m in loss) == [6, 8, 10]  # rank 0 alone reports, every log_every steps
