"""Shared benchmark plumbing: warm-up, alternating repeats, medians and spread, machine line, tables.

Every benchmark compares arms (variants) measured in one process, the same way:
  1. warm-up calls of every arm first (allocator, cuDNN autotune, compilation, file cache);
  2. ``repeats`` rounds; each round times every arm once, in alternating order (A B C, then
     C B A, ...), so drift in the machine's load falls on every arm alike;
  3. each timed call is closed by ``torch.cuda.synchronize`` on CUDA, so the clock measures
     finished work; the median is reported, with the spread (min–max) of the repeats.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["Timing", "alternating_medians", "bench_config", "machine", "machine_info", "median_seconds",
           "table", "write_json"]


# torch is imported where it is used: the GPU suite's driver and the DDP launcher need none of
# it (each torch import costs seconds of CPU, and the CPU dry run is a CI test).


def _sync(device: Any) -> None:
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """One arm's timed repeats, in seconds."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.times), max(self.times)

    def spread_pct(self) -> float:
        """(max − min) / median, in percent: how much the repeats disagree."""
        lo, hi = self.spread
        return 100.0 * (hi - lo) / self.median

    def summary(self, scale: float = 1.0) -> dict[str, object]:
        lo, hi = self.spread
        return {"median": self.median * scale, "min": lo * scale, "max": hi * scale,
                "repeats": [t * scale for t in self.times], "spread_pct": self.spread_pct()}


def alternating_medians(arms: Mapping[str, Callable[[], object]], *, device: Any = None,
                        warmup: int = 1, repeats: int = 3,
                        on_time: Callable[[str, int, float], None] | None = None) -> dict[str, Timing]:
    """Time every arm ``repeats`` times in alternating order after ``warmup`` calls of each.

    Round r runs the arms in their given order when r is even and reversed when r is odd.
    ``on_time(arm, round, seconds)`` is called after each timed call (progress printing).
    """
    if repeats < 1:
        raise ValueError("repeats must be ≥ 1")
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    _sync(device)
    out = {name: Timing() for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            arms[name]()
            _sync(device)
            secs = time.perf_counter() - t0
            out[name].times.append(secs)
            if on_time is not None:
                on_time(name, r, secs)
    return out


def median_seconds(fn: Callable[[], object], *, device: Any, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` synchronised calls (one arm)."""
    return alternating_medians({"fn": fn}, device=device, warmup=warmup, repeats=repeats)["fn"].median


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(*, query_gpus: bool | None = None) -> dict[str, object]:
    """The machine, as a record: CPU, cores, GPUs, torch and Python versions, load average.

    GPUs are queried through torch when ``query_gpus`` (default: when torch is already imported);
    otherwise ``gpus`` is None (not queried) and the torch version comes from its metadata."""
    if query_gpus is None:
        query_gpus = "torch" in sys.modules
    gpus = None
    if query_gpus:
        import torch

        cuda = torch.cuda.is_available()
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
        version = torch.__version__
    else:
        try:
            version = metadata.version("torch")
        except metadata.PackageNotFoundError:
            version = "not installed"
    return {"cpu": platform.processor() or platform.machine(), "cpu_cores": os.cpu_count(), "gpus": gpus,
            "torch": version, "python": platform.python_version(), "load_average_1_5_15": _load_average()}


def machine(*, query_gpus: bool | None = None) -> str:
    """One line: CPU cores, GPU model and count, torch version, load average at the time."""
    info = machine_info(query_gpus=query_gpus)
    gpus = info["gpus"]
    gpu = "GPUs not queried" if gpus is None else (f"{len(gpus)}× {gpus[0]}" if gpus else "no GPU")
    return (f"{info['cpu']}, {info['cpu_cores']} CPU cores, {gpu}, torch {info['torch']}, "
            f"python {info['python']}, load average {info['load_average_1_5_15']}")


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (pasted into benchmarks/RESULTS.md as printed)."""
    cells = [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def write_json(path: str | Path | None, record: dict[str, object]) -> None:
    """Write ``record`` (plus the machine) as JSON to ``path`` (atomically; nothing when None)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"machine": machine_info(), **record}, indent=2, default=_jsonable))
    tmp.replace(path)


def _jsonable(obj: object) -> object:
    if isinstance(obj, Timing):
        return obj.summary()
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)  # type: ignore[arg-type]
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def bench_config(preset: str, overrides: list[str] | None = None):  # noqa: ANN201 - PipelineConfig
    """A preset's config for a benchmark that feeds synthetic images: presets whose data lives
    on disk (cifar10, imagenet64) get a placeholder path, never read."""
    from tdc_core.config import load_config

    extra = [] if preset in ("smoke", "digits") else ["data.path=/synthetic/not-read"]
    return load_config(preset=preset, overrides=[*extra, *(overrides or [])])
