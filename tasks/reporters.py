"""Reporters that carry progress out of a subprocess: one JSON line per metrics report."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = ["JsonlReporter", "read_jsonl_metrics"]


class JsonlReporter:
    """Appends ``{"step": s, "metrics": {...}}`` lines to a file (flushed per line, so a crash
    loses at most the line being written)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        self._file.write(json.dumps({"step": step, "metrics": {k: float(v) for k, v in metrics.items()}}) + "\n")
        self._file.flush()

    def progress(self, *, step: int, total: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass

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
        yield int(rec["step"]), dict(rec["metrics"])
