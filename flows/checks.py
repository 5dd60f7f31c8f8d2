"""Everything a run needs, checked before it starts (``tdc run``, the flow ``tdc``, deployments).

Cheap on purpose (seconds): no Prefect server, no MLflow run, no run folder is created by it,
so a refused run leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from tasks.tracking_check import check_tracking, default_tracking_uri
from tdc_core.config import PipelineConfig
from tdc_core.run.preflight import Need, preflight, run_needs

__all__ = ["check_before_run"]


def check_before_run(config: PipelineConfig, *, run_dir: str | Path, tracking_uri: str | None = None,
                     needs: Collection[Need] | None = None) -> list[str]:
    """:func:`tdc_core.run.preflight.preflight` for the whole pipeline, then the tracking store.
    Returns one line per check passed.

    Raises:
        TDCError: the first problem, as one line naming the field or file.
    """
    lines = preflight(config, run_dir=run_dir, needs=run_needs(config) if needs is None else needs)
    uri = tracking_uri or default_tracking_uri()
    check_tracking(uri)
    return [*lines, f"tracking: {uri}"]
