"""Registering the assembled ensemble in the MLflow model registry.

One model version per pipeline run: the group checkpoints plus ``grouping.json`` (the
boundaries) are logged under the parent run's ``ensemble/`` artifacts and registered as a
version of ``tdc-ensemble-<preset>``; the alias ``champion`` moves to it when its score beats
the current champion's (lower is better). Loading needs only that folder:
``tdc_core.method.routing.load_router(checkpoints=..., boundaries=grouping["boundaries"])``.
"""

from __future__ import annotations

from pathlib import Path

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
    run_id = tracking.parent_run_id
    for g in range(num_groups):
        tracking.log_artifact(run_id, layout.group_checkpoint(g), artifact_path=f"ensemble/group-{g}")
    tracking.log_artifact(run_id, layout.grouping_json, artifact_path="ensemble")
    tracking.log_artifact(run_id, layout.budgets_json, artifact_path="ensemble")
    name = f"tdc-ensemble-{preset}"
    version = tracking.register_version(
        name=name, description="TDC routed ensembles: one expert per timestep group", run_id=run_id,
        artifact_path="ensemble", tags={"score_name": score_name, "num_groups": str(num_groups)}, score=score,
        alias=ALIAS,
    )
    tracking.set_tags(run_id, {"tdc.registered_model": f"{name}/{version.version}",
                               "tdc.champion": str(version.holds_alias)})
    return Registration(name=name, version=version.version, score_name=score_name, score=score,
                        champion=version.holds_alias, previous_champion_score=version.previous_score)
