"""Shared benchmark plumbing: timing with warm-up and medians, machine description, tables.

Timing follows the usual rules: warm-up calls first (allocator, cuDNN autotune, compilation),
then ``repeats`` timed calls, each closed by ``torch.cuda.synchronize`` on CUDA so the clock
measures finished work; the median is reported (robust to a noisy neighbour).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["bench_config", "machine", "median_seconds", "table"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], *, device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` synchronised calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> str:
    """One line: CPU cores, GPU model and count, torch version."""
    gpu = (f"{torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
           else "no GPU")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, "
            f"torch {torch.__version__}, python {platform.python_version()}")


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (pasted into benchmarks/RESULTS.md as printed)."""
    cells = [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def bench_config(preset: str, overrides: list[str] | None = None):  # noqa: ANN201 - PipelineConfig
    """A preset's config for a benchmark that feeds synthetic images: presets whose data lives
    on disk (cifar10, imagenet64) get a placeholder path, never read."""
    from tdc_core.config import load_config

    extra = [] if preset in ("smoke", "digits") else ["data.path=/synthetic/not-read"]
    return load_config(preset=preset, overrides=[*extra, *(overrides or [])])
