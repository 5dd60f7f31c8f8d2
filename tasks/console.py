"""One-line stage messages for people watching a run (stdout; a worker's log on a server)."""

from __future__ import annotations

import sys
import time

__all__ = ["say"]

_T0 = time.perf_counter()


def say(text: str) -> None:
    elapsed = time.perf_counter() - _T0
    print(f"[{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {text}", flush=True, file=sys.stdout)
