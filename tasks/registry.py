"""Registering the assembled ensemble in the MLflow model registry.

One model version per pipeline run: the group checkpoints plus ``grouping.json`` (the
boundaries) are logged under the parent run's ``ensemble/`` artifacts and registered as a
version of ``tdc-ensemble-<preset>``; the alias ``champion`` moves to it when its score beats
the current champion's (lower is better). Loading needs only that folder:
``tdc_core.method.routing.load_router(checkpoints=..., boundaries=grouping["boundaries"])``.
"""

from __future__ import annotations

import math
from pathlib import Path

from mlflow.exceptions import MlflowException
from prefect import task
from pydantic import BaseModel, ConfigDict

from tasks.tracking import TrackingRef
from tdc_core.run.layout import RunLayout

__all__ = ["Registration", "register_task"]

ALIAS = "champion"


class Registration(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    score_name: str
    score: float
    champion: bool          # whether the alias now points at this version
    previous_champion_score: float | None


@task(name="register", retries=2, retry_delay_seconds=5)  # registry writes are network I/O
def register_task(*, tracking: TrackingRef, run_dir: str, preset: str, num_groups: int, score_name: str,
                  score: float) -> Registration:
    layout = RunLayout(Path(run_dir))
    client = tracking.client()
    run_id = tracking.parent_run_id
    for g in range(num_groups):
        tracking.log_artifact(run_id, layout.group_checkpoint(g), artifact_path=f"ensemble/group-{g}")
    tracking.log_artifact(run_id, layout.grouping_json, artifact_path="ensemble")
    tracking.log_artifact(run_id, layout.budgets_json, artifact_path="ensemble")
    name = f"tdc-ensemble-{preset}"
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="TDC routed ensembles: one expert per timestep group")
    existing = [v for v in client.search_model_versions(f"name = '{name}'") if v.run_id == run_id]
    version = existing[0] if existing else client.create_model_version(
        name, source=f"{client.get_run(run_id).info.artifact_uri}/ensemble", run_id=run_id,
        tags={"score_name": score_name, "score": repr(score), "num_groups": str(num_groups)},
    )
    previous = None
    try:
        current = client.get_model_version_by_alias(name, ALIAS)
        previous = float(current.tags.get("score", "nan"))
    except MlflowException:
        current = None
    better = current is None or current.version == version.version or not math.isfinite(previous) or score < previous
    if better:
        client.set_registered_model_alias(name, ALIAS, version.version)
    tracking.set_tags(run_id, {"tdc.registered_model": f"{name}/{version.version}", "tdc.champion": str(better)})
    return Registration(name=name, version=str(version.version), score_name=score_name, score=score,
                        champion=better, previous_champion_score=previous)
