"""The benchmark scripts run end to end (on the smoke model) and print their tables: they
must not rot between the GPU sessions that produce benchmarks/RESULTS.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_train_step_benchmark_reports_every_variant():
    out = _run("benchmarks.bench_train_step", "--preset", "smoke", "--steps", "1", "--repeats", "1", "--no-compile")
    assert "| fp32-eager |" in out and "| fp32+nhwc |" in out and "1.00×" in out
    assert "GFLOP forward+backward per image" in out


@pytest.mark.slow
def test_sampling_benchmark_compares_time_with_flops():
    out = _run("benchmarks.bench_sampling", "--preset", "smoke", "--batch", "4", "--steps", "2", "--repeats", "1")
    assert "| single model |" in out and "| TDC ensemble |" in out
    assert "time / FLOPs =" in out
