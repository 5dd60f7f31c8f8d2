"""Live progress of a long stage, for a person at a terminal or reading a log.

:class:`StageProgress` is a :class:`tdc_core.reporter.Reporter`:

- on a terminal, a live bar (tqdm) with step/total, rate, the latest loss and the ETA;
- otherwise (CI, a Prefect worker's log, output piped to a file), a plain line at the start,
  at each quarter, at the end, and at least every ``TDC_PROGRESS_SECONDS`` seconds (default
  30) in between, through :func:`tasks.console.say`, so the lines also reach the Prefect flow
  run's log.

A stage can run through several phases with their own totals (probe training, then the
profile's gradient batches; pruning rounds, then the fine-tune); a new total, or a step that
goes back, starts a new bar. Messages (a pruning round's outcome, an evaluation seed's score)
are shown as lines; checkpoint notices are not.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import TextIO

from tasks.console import say

__all__ = ["StageProgress", "progress_interval_s"]

_DEFAULT_INTERVAL_S = 30.0
_QUIET_MESSAGES = ("checkpoint at step",)


def progress_interval_s() -> float:
    """Seconds between plain progress lines: ``$TDC_PROGRESS_SECONDS`` (default 30)."""
    try:
        return max(0.0, float(os.environ.get("TDC_PROGRESS_SECONDS", _DEFAULT_INTERVAL_S)))
    except ValueError:
        return _DEFAULT_INTERVAL_S


def _fmt_eta(seconds: float) -> str:
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _fmt_rate(steps_per_s: float) -> str:
    """``4.7 steps/s``, or for slow steps (an evaluation's sampling seed) ``84 s/step``: a rate
    below 0.1 steps/s would print as 0.0."""
    return f"{steps_per_s:.1f} steps/s" if steps_per_s >= 1 else f"{1 / steps_per_s:.0f} s/step"


class StageProgress:
    """Progress of one stage (``what``: e.g. ``shared training``, ``group 3``).

    Args:
        stream: where the bar goes (default stdout); a bar only when it is a terminal.
        tty: force bar (True) or lines (False); default: ``stream.isatty()``.
    """

    def __init__(self, what: str, *, stream: TextIO | None = None, tty: bool | None = None,
                 interval_s: float | None = None) -> None:
        self.what = what
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval_s = progress_interval_s() if interval_s is None else interval_s
        self.loss: float | None = None
        self._bar = None
        self._total: int | None = None
        self._step = 0
        self._phase_start = (0.0, 0)       # (time, step) when the phase began
        self._last_line = (0.0, -1)        # (time, quarter) of the last plain line
        self._phase = 0

    # --- Reporter ----------------------------------------------------------------------------------

    def progress(self, *, step: int, total: int) -> None:
        now = time.monotonic()
        if self._total is None or total != self._total or step < self._step:
            self._new_phase(step=step, total=total, now=now)
        self._step = step
        if self.tty:
            self._bar.n = step
            self._bar.refresh()
            if step >= total:
                self._close_bar()
            return
        quarter = (4 * step) // max(total, 1)
        last_t, last_q = self._last_line
        if quarter > last_q or now - last_t >= self.interval_s or step >= total:
            if step >= total and last_q >= 4:
                return  # the end was already said
            self._line(now)
            self._last_line = (now, quarter)

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        loss = metrics.get("loss")
        if loss is not None:
            self.loss = float(loss)
            if self._bar is not None:
                self._bar.set_postfix(loss=f"{self.loss:.4f}", refresh=False)

    def message(self, text: str) -> None:
        if text.startswith(_QUIET_MESSAGES):
            return
        if self._bar is not None:
            from tqdm.auto import tqdm

            tqdm.write(f"  {self.what}: {text}", file=self.stream)
        else:
            say(f"{self.what}: {text}")

    def close(self) -> None:
        self._close_bar()

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------------------

    def _new_phase(self, *, step: int, total: int, now: float) -> None:
        self._close_bar()
        self._total, self._phase_start, self._last_line = total, (now, step), (0.0, -1)
        self._phase += 1
        if self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=step, desc=self.what, unit="step", file=self.stream,
                             dynamic_ncols=True, leave=False)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _line(self, now: float) -> None:
        total, step = self._total or 0, self._step
        t0, s0 = self._phase_start
        rate = (step - s0) / (now - t0) if now > t0 and step > s0 else None
        parts = [f"{self.what}: step {step}/{total} ({100 * step // max(total, 1)}%)"]
        if rate:
            parts.append(_fmt_rate(rate))
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if rate and step < total:
            parts.append(f"ETA {_fmt_eta((total - step) / rate)}")
        say(" · ".join(parts))
