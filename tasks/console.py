"""One-line stage messages for people watching a run, and what Prefect's console shows.

:func:`say` prints a line on stdout (the user's terminal, or a worker's log on a server) and,
inside a Prefect flow or task run, sends it to that run's log too, so the Prefect UI shows
the same lines. Those records are marked so that Prefect's console handler does not print
them a second time.

:class:`QuietConsole` is the filter on Prefect's console handler that keeps it to what the
user needs: the marked records are dropped; a user error (:class:`TDCError`) is shown as its
one line, without the traceback (the run's API log keeps everything). Under ``tdc run``
(:func:`cli_reports_failures`), where the command itself prints the failure as its one line,
Prefect's error records about failed task and flow runs are not shown at all.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from tdc_core.errors import TDCError

__all__ = ["QuietConsole", "cli_reports_failures", "install_quiet_console", "say"]

_T0 = time.perf_counter()
_PRINT_LOCK = threading.Lock()
_MARK = "tdc_console_echo"  # record attribute: already printed by say()


def say(text: str) -> None:
    elapsed = time.perf_counter() - _T0
    line = f"[{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {text}"
    with _PRINT_LOCK:
        print(line, flush=True, file=sys.stdout)
    _to_run_log(text)


def _to_run_log(text: str) -> None:
    """Also log ``text`` to the current Prefect run, if any (never fails the caller)."""
    if "prefect" not in sys.modules:
        return  # not inside Prefect (a CLI stage command): nothing to send to
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        install_quiet_console()
        get_run_logger(**{_MARK: True}).info(text)
    except Exception:  # noqa: BLE001, S110 - the line is printed; the run log is a copy
        pass


_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
_cli = {"reports_failures": False}


def cli_reports_failures() -> None:
    """The command line prints a failed run's error itself (``tdc run``): Prefect's console
    need not repeat it."""
    _cli["reports_failures"] = True


class QuietConsole(logging.Filter):
    """Filter for Prefect's console handler (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _MARK, False):
            return False
        if _cli["reports_failures"] and record.levelno >= logging.ERROR and record.name.startswith(_RUN_LOGGERS):
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, TDCError):
            record.exc_info, record.exc_text = None, None
        return True


_INSTALL_LOCK = threading.Lock()
_installed = {"done": False}


def install_quiet_console() -> None:
    """Put :class:`QuietConsole` on Prefect's console handlers. Once per process: Prefect sets
    its handlers up when it is imported, and the flow calls this at its start; later calls
    (every stage line) return at once."""
    if _installed["done"]:
        return
    with _INSTALL_LOCK:
        try:
            from prefect.logging.handlers import PrefectConsoleHandler
        except ImportError:  # pragma: no cover - prefect is a dependency
            return
        seen = set()
        loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
        for logger in loggers:
            for handler in getattr(logger, "handlers", []):
                if isinstance(handler, PrefectConsoleHandler) and id(handler) not in seen:
                    seen.add(id(handler))
                    if not any(isinstance(f, QuietConsole) for f in handler.filters):
                        handler.addFilter(QuietConsole())
        _installed["done"] = bool(seen)  # none found yet (logging not set up): try again next time
