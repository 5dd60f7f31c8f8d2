"""Is the MLflow tracking store usable? Checked before a run starts, in seconds.

Kept apart from :mod:`tasks.tracking` so that the check before a run does not import MLflow
for a local store (MLflow is imported only to reach a server).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tdc_core.atomic import probe_writable
from tdc_core.errors import TDCError, first_line

__all__ = ["TrackingError", "check_tracking", "default_tracking_uri", "reason"]


class TrackingError(TDCError):
    """The MLflow tracking store cannot be reached or refuses a write."""


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else a SQLite store ``./mlflow.db`` in the current folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def reason(exc: BaseException) -> str:
    """The OS-level reason inside MLflow's long connection error messages, else the first line."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\][^'\")\]]*", text)
    return found.group(0).strip() if found else first_line(exc)


def check_tracking(uri: str, *, timeout_s: int = 10) -> None:
    """Fail fast when the tracking store cannot be used: a server that does not answer (one
    request, no retries), or a local store (``sqlite:///``, ``file:``) whose folder cannot be
    written.

    MLflow itself retries a failed HTTP request for about four minutes; a pipeline that cannot
    log should say so at once instead.

    Raises:
        TrackingError: naming the URI and the reason (e.g. connection refused).
    """
    if uri.startswith(("http://", "https://")):
        _check_server(uri, timeout_s=timeout_s)
    elif uri.startswith("sqlite:///"):
        _check_local(uri, Path(uri.removeprefix("sqlite:///")).parent)
    elif uri.startswith("file:") or "://" not in uri:
        _check_local(uri, Path(uri.removeprefix("file://").removeprefix("file:")))


def _check_server(uri: str, *, timeout_s: int) -> None:
    from mlflow import MlflowClient

    # MLflow reads these per request; only this check runs while they are set.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)})
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track"
        raise TrackingError(f"MLflow tracking server {uri} is unreachable: {reason(exc)} "
                            f"(start it, or set MLFLOW_TRACKING_URI to a reachable store)") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_local(uri: str, folder: Path) -> None:
    """The nearest existing folder on the way to the store accepts a new file."""
    try:
        probe_writable(folder)
    except OSError as exc:
        where = exc.filename or folder
        raise TrackingError(f"MLflow tracking store {uri} cannot be written: {where} refuses new files "
                            f"({exc.strerror or type(exc).__name__}); set MLFLOW_TRACKING_URI to a writable "
                            f"store") from None
