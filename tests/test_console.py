"""What Prefect's console shows (:mod:`tasks.console`): a user error as one line, no traceback."""

from __future__ import annotations

import logging
import sys

import pytest

import tasks.console as console
from tdc_core.errors import DataError


def _record(name: str, level: int, exc: BaseException | None, **extra) -> logging.LogRecord:
    info = None
    if exc is not None:
        try:
            raise exc
        except BaseException:  # noqa: BLE001
            info = sys.exc_info()
    record = logging.LogRecord(name, level, __file__, 1, "Task run failed with exception: %r", (exc,), info)
    record.__dict__.update(extra)
    return record


@pytest.fixture
def quiet(monkeypatch):
    monkeypatch.setitem(console._cli, "reports_failures", False)
    return console.QuietConsole()


def test_a_user_errors_traceback_is_removed_but_its_line_kept(quiet) -> None:
    record = _record("prefect.task_runs", logging.ERROR, DataError("data.path /x does not exist"))
    assert quiet.filter(record) and record.exc_info is None
    assert "data.path /x does not exist" in logging.Formatter().format(record)
    assert "Traceback" not in logging.Formatter().format(record)


def test_a_bugs_traceback_is_kept(quiet) -> None:
    record = _record("prefect.task_runs", logging.ERROR, KeyError("oops"))
    assert quiet.filter(record) and "Traceback" in logging.Formatter().format(record)


def test_lines_said_already_are_not_printed_twice(quiet) -> None:
    assert not quiet.filter(_record("prefect.flow_runs", logging.INFO, None, **{console._MARK: True}))
    assert quiet.filter(_record("prefect.flow_runs", logging.INFO, None))


def test_under_tdc_run_failed_run_records_are_left_to_the_command(quiet, monkeypatch) -> None:
    monkeypatch.setitem(console._cli, "reports_failures", True)
    assert not quiet.filter(_record("prefect.task_runs", logging.ERROR, DataError("x")))
    assert not quiet.filter(_record("prefect.flow_runs", logging.ERROR, None))
    assert quiet.filter(_record("prefect.events.clients", logging.WARNING, None))  # other warnings still shown
