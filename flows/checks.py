"""Everything a run needs, checked before it starts (``tdc run``, the flow ``tdc``, deployments).

Cheap on purpose (seconds): no Prefect server, no MLflow run, no run folder is created by it,
so a refused run leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from tasks.tracking_check import check_tracking, default_tracking_uri
from tdc_core.config import PipelineConfig
from tdc_core.errors import ConfigError
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
    if config.orchestration.groups == "deployment":
        lines += check_group_workers(config, run_dir=Path(run_dir))
    uri = tracking_uri or default_tracking_uri()
    check_tracking(uri)
    return [*lines, f"tracking: {uri}"]


def check_group_workers(config: PipelineConfig, *, run_dir: Path) -> list[str]:
    """For ``orchestration.groups=deployment``: a Prefect server is configured, the group
    deployment exists on it, and the storage root can be written.

    Raises:
        ConfigError: no ``PREFECT_API_URL``, or the deployment is not there (naming the field).
        StorageError: the storage root cannot be written.
    """
    from tasks.on_workers import storage_root
    from tasks.storage import open_store

    name = config.orchestration.group_deployment
    lines = [check_deployment(name, field="orchestration.group_deployment", why="orchestration.groups=deployment "
                              "submits each group as a flow run for a Prefect server's workers")]
    if config.orchestration.storage is None:  # inside the run folder, which this check does not create
        return [*lines, f"storage {storage_root(config, run_dir=run_dir)}: on this machine only (set "
                        f"orchestration.storage for workers elsewhere)"]
    return [*lines, open_store(config.orchestration.storage).check_writable()]


def check_deployment(name: str, *, field: str, why: str) -> str:
    """The deployment ``name`` exists on the Prefect server of ``PREFECT_API_URL``.

    Raises:
        ConfigError: no server configured, unreachable, or no such deployment (naming ``field``).
    """
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        raise ConfigError(f"{why}: set PREFECT_API_URL to that server (README, 'Several machines')")
    try:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise ConfigError(f"{field}={name!r} is not deployed on {api}; deploy it with "
                          f"prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml") from None
    except Exception as exc:  # noqa: BLE001 - an unreachable server, one line
        raise ConfigError(f"{field}={name!r}: the Prefect server {api} cannot be reached "
                          f"({type(exc).__name__}: {exc})") from None
    return f"flow runs of {name} (work pool {deployment.work_pool_name}) on {api}"
