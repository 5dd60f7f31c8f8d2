"""The Prefect flow ``tdc-study``: every arm × training seed of a study through the pipeline flow,
then the study's summary (:mod:`tdc_core.run.study`).

Each replicate is the flow ``tdc`` run as a subflow over its own run folder (derived from its
config, as ``tdc run`` derives it), so a killed study resumes: finished replicates are reused
from their folders' caches, an unfinished one resumes from its checkpoints. Replicates run one
after another; each uses the machine's cores or GPUs for its own parallel group fine-tunes.
Writes ``<out>/study.json``, ``study.md`` and ``replicates.json`` (every replicate's numbers and
run folder).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow

from flows.pipeline import tdc
from tasks.console import say
from tdc_core.atomic import atomic_write_bytes
from tdc_core.errors import ConfigError
from tdc_core.run.layout import RunLayout, default_run_dir
from tdc_core.run.study import StudySpec, StudySummary, replicate_config, replicate_metrics, study_markdown, summarise

__all__ = ["plan_lines", "tdc_study"]


def plan_lines(spec: StudySpec) -> list[str]:
    """What the study will run (``tdc study --dry-run``): every replicate, its run folder and
    whether that folder already holds a finished comparison."""
    lines = [f"study {spec.name}: {len(spec.arms)} arm(s) × {len(spec.seeds)} training seed(s) = "
             f"{len(spec.arms) * len(spec.seeds)} pipeline runs, one after another"]
    for arm in spec.arms:
        for seed in spec.seeds:
            cfg = replicate_config(arm, seed=seed)
            folder = default_run_dir(cfg)
            done = RunLayout(folder).comparison_json.is_file()
            lines.append(f"  {arm.name} seed {seed}: {cfg.preset}, {cfg.train.steps} shared steps, "
                         f"{cfg.grouping.num_groups} groups × {cfg.finetune.steps} fine-tune steps, baseline at equal "
                         f"training FLOPs → {folder}" + ("  (finished: reused)" if done else ""))
    return lines


@flow(name="tdc-study")
def tdc_study(spec: StudySpec, out_dir: str | None = None, tracking_uri: str | None = None) -> StudySummary:
    """Run every arm × seed of ``spec`` and write the study's summary into ``out_dir``
    (default ``studies/<name>``)."""
    out = Path(out_dir or Path("studies") / spec.name)
    t0 = time.perf_counter()
    results: dict[str, dict[int, dict]] = {}
    replicates = []
    for arm in spec.arms:
        for seed in spec.seeds:
            cfg = replicate_config(arm, seed=seed)
            if not cfg.baseline.enabled:
                raise ConfigError(f"study arm {arm.name}: baseline.enabled=false leaves nothing to compare with")
            say(f"study {spec.name}: arm {arm.name}, training seed {seed}")
            summary = tdc(config=cfg, run_dir=str(default_run_dir(cfg)), tracking_uri=tracking_uri,
                          workers=spec.workers)
            metrics = replicate_metrics(summary.comparison)
            results.setdefault(arm.name, {})[seed] = metrics
            replicates.append({"arm": arm.name, "seed": seed, "run_dir": summary.run_dir,
                               "mlflow_run_id": summary.mlflow_run_id, **metrics})
    result = summarise(name=spec.name, arms=results, seconds=time.perf_counter() - t0)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "replicates.json", json.dumps(replicates, indent=1).encode())
    atomic_write_bytes(out / "study.json", result.model_dump_json(indent=1).encode())
    atomic_write_bytes(out / "study.md", study_markdown(result).encode())
    return result
