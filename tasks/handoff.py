"""What a group worker receives and returns through the storage root (:mod:`tasks.storage`).

The inputs of a group fine-tune are four files of the pipeline's run folder, stored at the paths
they have in a run folder whose stage 1 lives inside it, so the worker's download *is* a run
folder (:class:`RunLayout` reads it unchanged):

    config.yaml, grouping/grouping.json, grouping/budgets.json, checkpoints/last.pt (shared model)

A group's output is its whole ``groups/group-<g>/`` folder but the pruning search's scratch
space. Its manifest records the digest of the inputs it was made from: a result made from other
inputs (another shared model) is never taken for this run's.

A finished pipeline with a storage root also publishes its results (summary, report, costs,
comparison, single-model curve) under ``results/<config key>``: what a study running its
replicates on workers reads back.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tasks.storage import Manifest, RunStore, bundle_files
from tdc_core.config import PipelineConfig
from tdc_core.run.layout import RunLayout

__all__ = ["finished_group", "group_prefix", "inputs_prefix", "publish_inputs", "publish_results", "pull_group",
           "pull_results", "push_group", "results_prefix"]

_SCRATCH = ("prune/work",)  # candidate and recovery checkpoints of the pruning search


def inputs_prefix(run_key: str) -> str:
    return f"{run_key}/inputs"


def group_prefix(run_key: str, group: int) -> str:
    return f"{run_key}/groups/group-{int(group)}"


def input_files(layout: RunLayout) -> dict[str, Path]:
    """The files a group fine-tune reads, by their path in a self-contained run folder."""
    return {"config.yaml": layout.config, "grouping/grouping.json": layout.grouping_json,
            "grouping/budgets.json": layout.budgets_json, "checkpoints/last.pt": layout.shared_checkpoint}


def publish_inputs(store: RunStore, *, run_key: str, layout: RunLayout) -> Manifest:
    """Upload the group inputs of ``layout`` (skipped when the store already holds exactly them)."""
    files = input_files(layout)
    stored = store.manifest(inputs_prefix(run_key))
    if stored is not None and stored.files == Manifest.of_files(files).files:
        return stored
    return store.put_bundle(files, prefix=inputs_prefix(run_key))


def finished_group(store: RunStore, *, run_key: str, group: int, inputs: Manifest) -> Manifest | None:
    """The group's stored manifest if it finished from exactly ``inputs``, else None."""
    done = store.manifest(group_prefix(run_key, group))
    return done if done is not None and done.inputs_sha256 == inputs.digest else None


def push_group(store: RunStore, *, run_key: str, layout: RunLayout, group: int, inputs: Manifest,
               ran_on: dict[str, str]) -> Manifest:
    """Upload a finished group's folder (its manifest last, naming the inputs it used)."""
    return store.put_bundle(bundle_files(layout.group_dir(group), skip=_SCRATCH), prefix=group_prefix(run_key, group),
                            inputs_sha256=inputs.digest, ran_on=ran_on)


def pull_group(store: RunStore, *, run_key: str, layout: RunLayout, group: int) -> Manifest:
    """Download a finished group's folder into ``layout`` (every file verified)."""
    return store.get_bundle(group_prefix(run_key, group), layout.group_dir(group))


# What a finished pipeline publishes (paths in its run folder): enough for a study's summary.
RESULT_FILES = ("summary.json", "report.md", "costs.json", "eval/comparison.json", "eval/comparison.md",
                "eval/curve.json")


def results_prefix(config: PipelineConfig) -> str:
    """``results/<hash of the whole config but orchestration.*>``: unlike the run's key, the
    evaluation settings count (other ``eval.*``, other numbers)."""
    body = config.model_dump_json(exclude={"orchestration"}).encode()
    return f"results/{hashlib.sha256(body).hexdigest()[:12]}"


def publish_results(store: RunStore, *, layout: RunLayout, config: PipelineConfig) -> Manifest:
    """Upload a finished run's results (those of :data:`RESULT_FILES` it has), manifest last."""
    files = {rel: layout.root / rel for rel in RESULT_FILES if (layout.root / rel).is_file()}
    return store.put_bundle(files, prefix=results_prefix(config))


def pull_results(store: RunStore, *, config: PipelineConfig, dest: Path) -> Manifest:
    """Download a run's published results into the run folder ``dest`` (every file verified)."""
    return store.get_bundle(results_prefix(config), dest)
