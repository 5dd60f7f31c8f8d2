"""The GPU suite (benchmarks/gpu_suite.py) runs end to end before any GPU is lent: its CPU dry run
runs every step at toy size, records each step's result or error and goes on, writes a valid
results file, and adapts to the device count (DDP over ≥ 2, a clear "skipped: 1 GPU" otherwise).
And a CUDA DDP world never asks for a GPU that does not exist (tdc_core/training/distributed.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_suite
from tdc_core.errors import ConfigError
from tdc_core.training.distributed import check_gpus_for_processes, init_distributed

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["anchors", "sampling", "ddp", "train_step"]


def _suite(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--cpu-dry-run", "--out", str(out), *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    results = out / "results.json"
    assert results.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(results.read_text())


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step_and_writes_one_results_file(tmp_path):
    done, rec = _suite(tmp_path)
    assert done.returncode == 0, done.stdout[-4000:]
    assert {"suite", "mode", "started", "finished", "elapsed_s", "budget_s", "machine", "devices", "plan", "steps",
            "targets"} <= set(rec)
    assert rec["mode"] == "cpu-dry-run" and rec["devices"] == 2
    assert [p["step"] for p in rec["plan"]] == STEPS and list(rec["steps"]) == STEPS
    for name, step in rec["steps"].items():
        assert step["status"] == "ok", (name, step.get("error"))
        assert step["result"]["benchmark"] == name  # each step's own JSON, read back
        assert step["tables"], name  # its Markdown rows
    # Only the results files come back to $OUT (the device tool returns at most 8 files).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]

    anchors = rec["steps"]["anchors"]["result"]["models"][0]
    assert anchors["preset"] == "imagenet64"
    assert 121.0e6 < anchors["params"] < 121.1e6  # the anchor: IDDPM ImageNet-64, 121 M
    assert 79.4e9 < anchors["forward_flops_per_image"] < 79.5e9
    assert 2.9 < anchors["train_flops_per_image"] / anchors["forward_flops_per_image"] < 3.1

    sampling = rec["steps"]["sampling"]["result"]
    assert all(len(arm["repeats"]) == 2 for arm in sampling["arms"].values())  # warm-up untimed, 2 rounds timed
    assert 0 < sampling["flops_ratio"] < 1  # the pruned ensemble does less work than the dense model

    ddp = rec["steps"]["ddp"]["result"]
    assert ddp["processes"] == 2 and ddp["device"] == "cpu"
    assert ddp["ranks_identical"] and ddp["resume_exact"]  # gloo on CPU: bit for bit

    train = rec["steps"]["train_step"]["result"]
    assert set(train["phases"]) == {"eager", "compile"}  # the compiled phase ran too (dynamo, eager backend)
    compiled = train["phases"]["compile"]
    assert {"fp32-eager", "fp32+compile[eager]"} <= set(compiled)
    assert compiled["fp32-eager"]["speedup_vs_fp32_eager"] == 1.0
    assert all(len(v["step_s"]["repeats"]) == 2 for ph in train["phases"].values() for v in ph.values())

    # A dry run claims no GPU result: every target says it was not measured.
    assert len(rec["targets"]) == 5
    assert all(t["status"].startswith("not measured") for t in rec["targets"]), rec["targets"]
    md = (tmp_path / "results.md").read_text()
    assert "| target | measured | status |" in md
    assert all(f"| {name} | ok |" in md for name in STEPS)


def test_with_one_device_ddp_is_skipped_with_a_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the dry run sets it; restored after the test
    code = gpu_suite.main(["--cpu-dry-run", "--dry-run-devices", "1", "--only", "ddp", "--out", str(tmp_path)])
    assert code == 0
    assert "skipped: 1 GPU" in capsys.readouterr().out
    rec = json.loads((tmp_path / "results.json").read_text())
    assert rec["steps"]["ddp"]["status"] == "skipped" and "skipped: 1 GPU" in rec["steps"]["ddp"]["reason"]
    ddp_target = next(t for t in rec["targets"] if t["target"].startswith("multi-GPU"))
    assert "skipped: 1 GPU" in ddp_target["status"]


def test_gpu_plan_adapts_to_the_gpu_count_and_fits_the_budget(tmp_path, monkeypatch):
    # The ImageNet-64 UNet's FLOPs per image as benchmarks/anchors.py counts them (the dry run
    # checks that count); counting them again here would cost seconds of meta-device tracing.
    import benchmarks.anchors

    monkeypatch.setattr(benchmarks.anchors, "count", lambda preset: {
        "forward_flops_per_image": 79.47e9, "train_flops_per_image": 238.39e9})
    one = {s.name: s for s in gpu_suite.plan(dry_run=False, devices=1, out=tmp_path)}
    assert list(one) == STEPS
    assert one["ddp"].skip_reason is not None and "skipped: 1 GPU" in one["ddp"].skip_reason
    eight = {s.name: s for s in gpu_suite.plan(dry_run=False, devices=8, out=tmp_path)}
    assert eight["ddp"].skip_reason is None
    cmd = eight["ddp"].command
    assert cmd[cmd.index("--processes") + 1] == "8"
    # Sized from the anchors' FLOPs: the planned steps fit the default budget on one GPU.
    assert sum(s.estimate_s for s in one.values() if s.skip_reason is None) <= 330.0


def test_a_failing_step_is_recorded_and_the_next_still_runs(tmp_path):
    steps = [gpu_suite.Step("boom", [sys.executable, "-c", "print('about to fail'); raise SystemExit(3)"], 30.0),
             gpu_suite.Step("fine", [sys.executable, "-c", "print('| a | b |')"], 30.0)]
    seen = []
    recs = gpu_suite.run_all(steps, budget_s=300.0, scratch=tmp_path, on_step=lambda n, r: seen.append(n))
    assert seen == ["boom", "fine"]
    assert recs["boom"]["status"] == "error" and recs["boom"]["returncode"] == 3
    assert "about to fail" in recs["boom"]["error"]
    assert recs["fine"]["status"] == "ok" and recs["fine"]["tables"] == ["| a | b |"]


def test_a_hanging_step_is_killed_with_its_children_and_recorded_as_a_timeout(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '300']); "
              f"open({str(pidfile)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(300)")
    rec = gpu_suite.run_step(gpu_suite.Step("hang", [sys.executable, "-c", script], 1.0), out=tmp_path, timeout_s=3.0)
    assert rec["status"] == "timeout" and "timed out after 3 s" in rec["error"]
    child = int(pidfile.read_text())
    for _ in range(100):  # the killed grandchild is reaped by init; give it a moment
        stat = Path(f"/proc/{child}/stat")
        if not stat.exists() or stat.read_text().split()[2] == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the step's child process {child} outlived the timeout")


def test_targets_follow_from_the_measurements():
    steps = {
        "train_step": {"status": "ok", "result": {
            "best": {"variant": "bf16+nhwc+compile", "mfu": 0.35, "speedup_vs_fp32_eager": 3.4},
            "targets": {"mfu_met": False, "speedup_met": True, "memory_met": True, "default_variant_peak_gib": 41.0}}},
        "sampling": {"status": "timeout", "error": "timed out"},
        "ddp": {"status": "skipped", "reason": "skipped: 1 GPU (DDP needs ≥ 2; NCCL not run)"},
    }
    by = {t["target"]: t for t in gpu_suite.targets(steps, dry_run=False)}
    assert by["shared training ≥ 40 % MFU, ImageNet-64, batch 128"]["status"] == "missed"
    assert "35.0 %" in by["shared training ≥ 40 % MFU, ImageNet-64, batch 128"]["measured"]
    assert by["shared training ≥ 3× fp32 eager, same run"]["status"] == "met"
    assert by["ImageNet-64 batch 128 training fits 80 GB"]["status"] == "met"
    sampling = next(t for t in by.values() if t["target"].startswith("ensemble sampling"))
    assert sampling["status"] == "not measured (sampling timeout)"
    assert "skipped: 1 GPU" in by["multi-GPU DDP: same code path, correct resume"]["status"]


def test_check_gpus_for_processes_refuses_more_processes_than_gpus():
    check_gpus_for_processes(2, visible=2)
    check_gpus_for_processes(1, visible=1)
    with pytest.raises(ConfigError, match="2 processes per node needs 2 GPUs, but 1 is visible"):
        check_gpus_for_processes(2, visible=1)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_cuda_ddp_world_larger_than_the_visible_gpus_is_refused_in_every_rank(monkeypatch, rank):
    """On one GPU, torchrun --nproc_per_node=2: both ranks refuse before touching a GPU or waiting
    for each other (rank 1 used to ask for cuda:1; rank 0 used to wait for it)."""
    touched = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: touched.append(i))
    for key, value in {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="2 processes per node needs 2 GPUs, but 1 is visible"):
        init_distributed(device_type="cuda")
    assert touched == [] and not torch.distributed.is_initialized()
