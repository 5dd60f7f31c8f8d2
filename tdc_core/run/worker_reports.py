"""Reporters that carry progress out of a subprocess: one JSON line per report.

A worker process (a group fine-tune, a ``torchrun`` rank 0) writes its metrics, its progress
(at most once a second, and at the end) and its messages to one file; the parent logs the
metrics to MLflow afterwards (:func:`read_jsonl_metrics`) and, while the worker runs, replays
progress and messages to its own reporter (:class:`JsonlTail`), so the user sees the worker's
progress live.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from tdc_core.reporter import Reporter

__all__ = ["JsonlReporter", "JsonlTail", "read_jsonl_metrics"]

_PROGRESS_EVERY_S = 1.0


class JsonlReporter:
    """Appends ``{"step": s, "metrics": {...}}``, ``{"progress": [step, total]}`` and
    ``{"message": text}`` lines to a file (flushed per line, so a crash loses at most the line
    being written)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._progress_at = 0.0

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        self._write({"step": step, "metrics": {k: float(v) for k, v in metrics.items()}})

    def progress(self, *, step: int, total: int) -> None:
        now = time.monotonic()
        if step >= total or now - self._progress_at >= _PROGRESS_EVERY_S:
            self._progress_at = now
            self._write({"progress": [step, total]})

    def message(self, text: str) -> None:
        self._write({"message": text})

    def close(self) -> None:
        self._file.close()


def read_jsonl_metrics(path: str | Path) -> Iterator[tuple[int, dict[str, float]]]:
    """(step, metrics) pairs from a :class:`JsonlReporter` file; a torn last line is skipped."""
    path = Path(path)
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "metrics" in rec:
            yield int(rec["step"]), dict(rec["metrics"])


class JsonlTail:
    """Replays what a :class:`JsonlReporter` appends to ``path`` into ``reporter``, from the
    file's end at construction (an earlier attempt's lines are not replayed); call
    :meth:`poll` while the writer runs and once after it ends."""

    def __init__(self, path: str | Path, reporter: Reporter) -> None:
        self.path, self.reporter = Path(path), reporter
        self._offset = self.path.stat().st_size if self.path.is_file() else 0

    def poll(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        end = chunk.rfind(b"\n") + 1  # only whole lines; a torn last line waits for the next poll
        self._offset += end
        for line in chunk[:end].decode("utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "progress" in rec:
                step, total = rec["progress"]
                self.reporter.progress(step=int(step), total=int(total))
            elif "message" in rec:
                self.reporter.message(str(rec["message"]))
            elif "metrics" in rec:
                self.reporter.log_metrics(rec["metrics"], step=int(rec["step"]))
