"""How progress and metrics leave the core: a small reporter interface the caller supplies.

The core never prints or logs; the CLI adapts a reporter to a progress bar, the Prefect tasks
to MLflow. All methods are optional to act on; :class:`NullReporter` ignores everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

__all__ = ["MultiReporter", "NullReporter", "RecordingReporter", "Reporter"]


class Reporter(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        """Scalar metrics at a training step (called every ``log_every`` steps, not per step)."""

    def progress(self, *, step: int, total: int) -> None:
        """Training has reached ``step`` of ``total``."""

    def message(self, text: str) -> None:
        """A one-line event (checkpoint written, stage finished)."""


class NullReporter:
    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        pass

    def progress(self, *, step: int, total: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass


class RecordingReporter(NullReporter):
    """Keeps everything in lists (tests, and callers that report after the fact)."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.messages: list[str] = []
        self.steps: list[tuple[int, int]] = []  # (step, total) of every progress report

    def progress(self, *, step: int, total: int) -> None:
        self.steps.append((step, total))

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def message(self, text: str) -> None:
        self.messages.append(text)

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(s, m[name]) for s, m in self.metrics if name in m]


class MultiReporter:
    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        for r in self.reporters:
            r.log_metrics(metrics, step=step)

    def progress(self, *, step: int, total: int) -> None:
        for r in self.reporters:
            r.progress(step=step, total=total)

    def message(self, text: str) -> None:
        for r in self.reporters:
            r.message(text)
