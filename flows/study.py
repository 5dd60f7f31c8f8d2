"""The Prefect flow ``tdc-study``: every arm × training seed of a study through the pipeline flow,
then the study's summary (:mod:`tdc_core.run.study`).

Each replicate is the flow ``tdc`` run as a subflow over its own run folder (derived from its
config, as ``tdc run`` derives it). Replicates whose stage-1 settings are equal (arms that differ
only in stage-2 settings, at one training seed) share one stage-1 folder: the first trains it,
the others reuse it (:mod:`tdc_core.run.stage1`). A killed study resumes: finished replicates
are reused from their folders' caches, an unfinished one resumes from its checkpoints.
Replicates run one after another; each uses the machine's cores or GPUs for its own parallel
group fine-tunes. With ``replicates: deployment`` in the study file, every replicate is instead a
flow run of ``tdc/full-pipeline`` on any worker of its pool, all submitted at once; each
publishes its results to the study's ``storage``, and they come back into the replicate's run
folder here (``summary.json``, ``eval/``), so the summary reads them as it reads a local one.

Writes ``<out>/study.json``, ``study.md``, ``replicates.json`` (every replicate's numbers and
run folder), ``study.png`` (each arm's paired differences with their intervals),
``contrasts.png`` (each contrast's, when the study file has ``contrasts``) and ``curves.png``
(every replicate's single model along its training, its TDC beside it). One MLflow run
``study-<name>`` holds the study's numbers and files, with every pipeline and baseline run
beneath it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow
from prefect.futures import wait

from flows.pipeline import PipelineSummary, tdc
from tasks.console import say
from tasks.on_workers import replicate_on_worker_task
from tasks.tracking import open_study_tracking
from tdc_core.atomic import atomic_write_bytes
from tdc_core.config import PipelineConfig, read_run_config
from tdc_core.errors import ConfigError, TDCError
from tdc_core.evaluation.curves import Curve, plot_curves
from tdc_core.evaluation.plots import plot_intervals
from tdc_core.evaluation.units import fmt_flops
from tdc_core.records import load_record
from tdc_core.run.layout import RunLayout, default_run_dir
from tdc_core.run.stage1 import holds_stage1, stage1_dir
from tdc_core.run.study import (
    StudySpec,
    StudySummary,
    contrast_panels,
    difference_panels,
    equivalence,
    estimate,
    merge_replicates,
    not_run_yet,
    replicate_config,
    replicate_differences,
    replicate_metrics,
    select,
    study_key,
    study_markdown,
    summarise,
    summary_metrics,
    take_replicates,
)

__all__ = ["add_replicates", "plan_lines", "resummarise", "tdc_study"]


def plan_lines(spec: StudySpec) -> list[str]:
    """What the study will run (``tdc study --dry-run``): every replicate, its run folder, the
    stage-1 folder it shares, whether it is finished, and the planned compute."""
    n = len(spec.arms) * len(spec.seeds)
    lines = [f"study {spec.name}: {len(spec.arms)} arm(s) × {len(spec.seeds)} training seed(s) = {n} pipeline runs, "
             f"one after another"]
    first_with: dict[str, str] = {}
    total = {"stage1": 0.0, "imported": 0.0, "stage2": 0.0, "baseline": 0.0, "sampling": 0.0}
    for arm in spec.arms:
        for seed in spec.seeds:
            cfg = replicate_config(arm, seed=seed)
            est = estimate(arm, seed=seed)
            folder = default_run_dir(cfg)
            done = RunLayout(folder).comparison_json.is_file()
            shared = first_with.get(est.stage1_key)
            if shared is None:
                first_with[est.stage1_key] = f"{arm.name} seed {seed}"
                total["stage1"] += est.stage1_flops
                total["imported"] += est.stage1_flops if est.stage1_imported else 0.0
            total["stage2"] += est.stage2_flops
            total["baseline"] += est.baseline_extra_flops
            total["sampling"] += est.eval_sampling_flops
            # A stage-1 folder left by another study or run is reused (what it lacks is trained).
            found = stage1_dir(cfg, runs_root=folder.parent)
            stage1 = (f"stage 1 shared with {shared}" if shared
                      else f"stage 1 imported from {cfg.train.init_from} (charged {fmt_flops(est.stage1_flops)}, "
                           f"not run)" if est.stage1_imported
                      else f"stage 1 reused from {found} (started or finished by an earlier run)"
                      if holds_stage1(found)
                      else f"stage 1 trained here ({fmt_flops(est.stage1_flops)})")
            lines.append(f"  {arm.name} seed {seed}: {cfg.preset}, {cfg.train.steps} shared steps, "
                         f"{cfg.grouping.num_groups} groups × {cfg.finetune.steps} fine-tune steps, "
                         + ("baseline at equal training FLOPs" if cfg.baseline.enabled else "TDC alone (no baseline)")
                         + f"; {stage1} → {folder}" + ("  (finished: reused)" if done else ""))
    training = total["stage1"] + total["stage2"] + total["baseline"]
    imported = (f", of which {fmt_flops(total['imported'])} imported (IDDPM's published training, not run here)"
                if total["imported"] else "")
    lines.append(f"planned compute: training {fmt_flops(training)} (stage 1 {fmt_flops(total['stage1'])} for "
                 f"{len(first_with)} stage-1 folder(s){imported}, stage 2 {fmt_flops(total['stage2'])} at budget, "
                 f"baseline beyond stage 1 {fmt_flops(total['baseline'])}); evaluation sampling ≤ "
                 f"{fmt_flops(total['sampling'])}; pruning searches and held-out scoring come on top")
    return lines


@flow(name="tdc-study")
def tdc_study(spec: StudySpec, out_dir: str | None = None, tracking_uri: str | None = None) -> StudySummary:
    """Run every arm × seed of ``spec`` and write the study's summary into ``out_dir``
    (default ``studies/<name>``)."""
    out = Path(out_dir or Path("studies") / spec.name)
    t0 = time.perf_counter()
    tracking = open_study_tracking(name=spec.name, study_key=study_key(spec), tracking_uri=tracking_uri, out_dir=out,
                                   params={"arms": json.dumps([a.model_dump(mode="json") for a in spec.arms]),
                                           "seeds": json.dumps(list(spec.seeds))})
    reused = sum(RunLayout(default_run_dir(replicate_config(a, seed=s))).comparison_json.is_file()
                 for a in spec.arms for s in spec.seeds)
    results: dict[str, dict[int, dict]] = {}
    curves: dict[str, list[Curve]] = {}
    replicates = []
    try:
        on_workers = _replicates_on_workers(spec) if spec.replicates == "deployment" else {}
        for arm in spec.arms:
            for seed in spec.seeds:
                cfg = replicate_config(arm, seed=seed)
                if not cfg.eval.enabled:
                    raise ConfigError(f"study arm {arm.name}: eval.enabled=false leaves the study nothing to summarise")
                if on_workers:
                    summary = on_workers[(arm.name, seed)]
                else:
                    say(f"study {spec.name}: arm {arm.name}, training seed {seed}")
                    summary = tdc(config=cfg, run_dir=str(default_run_dir(cfg)), tracking_uri=tracking.tracking_uri,
                                  workers=spec.workers)
                tracking.adopt([r for r in (summary.mlflow_run_id, summary.baseline_run_id) if r],
                               tags={"tdc.study_arm": arm.name, "tdc.study_seed": str(seed)})
                metrics = replicate_metrics(summary.comparison)
                results.setdefault(arm.name, {})[seed] = metrics
                if (curve := _curve_of(summary.run_dir)) is not None:
                    curves.setdefault(arm.name, []).append(curve)
                replicates.append({"arm": arm.name, "seed": seed, "run_dir": summary.run_dir,
                                   "mlflow_run_id": summary.mlflow_run_id, **metrics})
        result = summarise(name=spec.name, arms=results, seconds=time.perf_counter() - t0, contrasts=spec.contrasts)
        result = result.model_copy(update={"equivalence": equivalence(curves), "reused": reused,
                                           "selection": select(spec, result)})
        files = _write(out, result, replicates=replicates, curves=curves)
        tracking.log_metrics(tracking.parent_run_id, {
            **summary_metrics(result),
            **{f"{e.arm}.equivalent_training_flops_ratio": e.ratio.mean for e in result.equivalence if e.ratio}})
        for p in files:
            tracking.log_artifact(tracking.parent_run_id, p, artifact_path="study")
    except BaseException:
        tracking.finish(tracking.parent_run_id, ok=False)
        raise
    tracking.finish(tracking.parent_run_id)
    return result


def study_replicate_config(spec: StudySpec, arm, *, seed: int) -> PipelineConfig:
    """A replicate's config; with ``replicates: deployment`` its pipeline publishes its results
    to the study's storage (``orchestration.storage``, which changes no run key)."""
    cfg = replicate_config(arm, seed=seed)
    if spec.replicates != "deployment":
        return cfg
    return cfg.model_copy(update={"orchestration": cfg.orchestration.model_copy(update={"storage": spec.storage})})


def _replicates_on_workers(spec: StudySpec) -> dict[tuple[str, int], PipelineSummary]:
    """Every replicate as a flow run of ``spec.deployment``, all submitted at once (how many run
    together is the work pool's concurrency limit); each one's results come back into its run
    folder here. Replicates already published are not run again.

    Raises:
        TDCError: naming every replicate whose flow run did not complete (the others are kept).
    """
    futures = {}
    for arm in spec.arms:
        for seed in spec.seeds:
            cfg = study_replicate_config(spec, arm, seed=seed)
            name = f"{spec.name}-{arm.name}-seed{seed}"
            futures[(arm.name, seed)] = replicate_on_worker_task.submit(
                cfg, deployment=spec.deployment, name=name, run_dir=str(default_run_dir(cfg).resolve()))
    say(f"study {spec.name}: {len(futures)} replicates submitted as flow runs of {spec.deployment} "
        f"(results via {spec.storage})")
    wait(list(futures.values()))
    out, failed = {}, []
    for key, future in futures.items():
        try:
            folder = future.result()
        except Exception as exc:  # noqa: BLE001 - collected and reported together
            failed.append(f"{key[0]} seed {key[1]}: {exc}")
            continue
        summary = PipelineSummary.model_validate_json(RunLayout(folder).summary_json.read_text())
        out[key] = summary.model_copy(update={"run_dir": str(folder)})
    if failed:
        raise TDCError(f"{len(failed)} of {len(futures)} replicates failed: {'; '.join(failed)}; re-run the study "
                       f"to submit only those")
    return out


def _curve_of(run_dir: str | Path) -> Curve | None:
    """A replicate's single-model curve, when its run folder still holds one."""
    path = RunLayout(Path(run_dir)).curve_json
    return load_record(path, Curve, what="curve") if path.is_file() else None


def add_replicates(spec: StudySpec, *, sources: list[str], out_dir: str | Path | None = None) -> list[str]:
    """Copy replicates run elsewhere into the study's ``replicates.json`` (``tdc study
    --summary-only --add SOURCE``): one-replicate study files run side by side, or another
    study's arm reused. SOURCE is a ``replicates.json`` or a study folder holding one, optionally
    followed by ``:THEIRS=OURS`` to take its arm THEIRS as arm OURS. An added replicate replaces
    one of the same arm and seed, and records where it came from (``added_from``).

    Each one is checked to be a replicate of its arm before anything is written: the config its
    run folder was made with must be the arm's at that seed (see
    :func:`tdc_core.run.study.replicate_differences`) or, with the folder gone, the folder's name
    must carry the arm's config hash. Returns what was done, one line each.

    Raises:
        ConfigError: a source cannot be read, names an arm the study lacks, or holds a run that
            is not (or cannot be shown to be) a replicate of its arm; nothing is written then.
    """
    out = Path(out_dir or Path("studies") / spec.name)
    path = out / "replicates.json"
    existing = _read_replicates(path) if path.is_file() else []
    added, lines = [], []
    for source in sources:
        where, rename = _parse_source(source)
        taken, notes = take_replicates(spec, _read_replicates(where), source=source, rename=rename)
        lines += notes
        for r in taken:
            lines.append(f"added {r['arm']} seed {r['seed']} from {source}: {_check_replicate(spec, r, source=source)}")
        added += taken
    merged, replaced = merge_replicates(spec, existing=existing, added=added)
    lines += [f"replaced {key} (the earlier record is in git's history, if it was committed)" for key in replaced]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(merged, indent=1).encode())
    return lines


def _parse_source(source: str) -> tuple[Path, tuple[str, str] | None]:
    """``PATH`` or ``PATH:THEIRS=OURS`` → (the replicates.json, the rename)."""
    where, sep, arms = source.rpartition(":")
    if not sep or "=" not in arms:
        where, rename = source, None
    else:
        theirs, _, ours = arms.partition("=")
        if not theirs or not ours:
            raise ConfigError(f"--add {source}: after ':' comes THEIRS=OURS (an arm of the source, an arm of the "
                              f"study), e.g. studies/digits-final:tdc=n5-combined")
        rename = (theirs, ours)
    path = Path(where)
    return (path / "replicates.json" if path.is_dir() else path), rename


def _read_replicates(path: Path) -> list[dict]:
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read as a study's replicates ({exc})") from None
    if not isinstance(records, list):
        raise ConfigError(f"{path} is not a study's replicates: a JSON list of replicates was expected")
    return records


def _check_replicate(spec: StudySpec, record: dict, *, source: str) -> str:
    """How ``record`` was shown to be a replicate of its arm (raises ConfigError when it is not)."""
    arm = next(a for a in spec.arms if a.name == record["arm"])
    seed = int(record["seed"])
    run = RunLayout(Path(str(record.get("run_dir", ""))))
    what = f"--add {source}: {arm.name} seed {seed}"
    if run.config.is_file():
        differences = replicate_differences(arm, seed=seed, made_with=read_run_config(run))
        if differences:
            raise ConfigError(f"{what}: its run folder {run.root} was made with other settings than the arm "
                              f"({len(differences)}, as 'key: run value, arm value'): "
                              f"{'; '.join(differences[:6])}")
        return f"its run folder's config.yaml is the arm's ({run.root})"
    expected = default_run_dir(replicate_config(arm, seed=seed)).name
    if run.root.name != expected:
        raise ConfigError(f"{what}: its run folder {run.root} is gone and its name is not the arm's config's "
                          f"({expected}), so it cannot be shown to be a replicate of the arm; run it (e.g. a study "
                          f"file of that arm and seed) and add that")
    return f"run folder gone; its name carries the arm's config hash ({expected})"


def resummarise(spec: StudySpec, *, out_dir: str | Path | None = None, partial: bool = False) -> StudySummary:
    """Re-derive a study's summary files from its ``replicates.json`` without running anything
    (``tdc study --summary-only``): e.g. after adding ``contrasts`` to the study file. Curves are
    read back from the replicates' run folders where those still exist; the wall time recorded by
    the invocation that ran the replicates is kept. With ``partial`` (``--partial``), a study whose
    replicates are not all there yet is summarised over those that are: each arm over its seeds,
    each contrast over the seeds both its arms ran, and what is missing named in ``not_run``.

    Raises:
        ConfigError: ``replicates.json`` is missing or unreadable, or (unless ``partial``) lacks an
            arm × seed of ``spec``; with ``partial``, holds none of them.
    """
    out = Path(out_dir or Path("studies") / spec.name)
    path = out / "replicates.json"
    try:
        replicates = json.loads(path.read_text())
        by_key = {(r["arm"], int(r["seed"])): r for r in replicates}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} cannot be read as a study's replicates ({exc}); run the study first") from None
    missing = [f"{a.name} seed {s}" for a in spec.arms for s in spec.seeds if (a.name, s) not in by_key]
    if missing and not partial:
        raise ConfigError(f"{path} lacks {len(missing)} replicate(s) of the study file: {', '.join(missing[:5])}; "
                          f"run the study (without --summary-only) to make them, or summarise the others "
                          f"with --partial")
    if len(missing) == len(spec.arms) * len(spec.seeds):
        raise ConfigError(f"{path} holds no replicate of the study file's arms and seeds; run the study first")
    results: dict[str, dict[int, dict]] = {}
    curves: dict[str, list[Curve]] = {}
    kept = []
    for arm in spec.arms:
        for seed in (s for s in spec.seeds if (arm.name, s) in by_key):
            r = by_key[(arm.name, seed)]
            kept.append(r)
            results.setdefault(arm.name, {})[seed] = {"tdc": r["tdc"], "baseline": r["baseline"]}
            # A TDC-alone replicate has no curve (the curve's last point is the baseline), even one
            # whose numbers were taken from a run that trained a baseline beside the same TDC.
            if r["baseline"] and (curve := _curve_of(r["run_dir"])) is not None:
                curves.setdefault(arm.name, []).append(curve)
    previous = None
    if (out / "study.json").is_file():
        try:
            previous = StudySummary.model_validate_json((out / "study.json").read_text())
        except ValueError:
            previous = None
    # The wall time (and reuse count) describes the invocation that ran these replicates: kept only
    # while the summary covers the same arms and seeds (not after replicates were added by hand).
    same = previous is not None and {(a.arm, tuple(a.seeds)) for a in previous.arms} == {
        (a.name, tuple(spec.seeds)) for a in spec.arms}
    contrasts, not_run = not_run_yet(spec, results)
    result = summarise(name=spec.name, arms=results, seconds=previous.seconds if same else None,
                       contrasts=contrasts)
    update: dict = {"reused": previous.reused if same else 0, "not_run": not_run, "selection": select(spec, result)}
    if curves and all(len(v) == len(spec.seeds) for v in curves.values()):
        update["equivalence"] = equivalence(curves)
    elif previous:
        update["equivalence"] = previous.equivalence  # run folders gone: keep what was measured
    result = result.model_copy(update=update)
    _write(out, result, replicates=kept, curves=curves)
    return result


def _write(out: Path, result: StudySummary, *, replicates: list[dict], curves: dict[str, list[Curve]]) -> list[Path]:
    """The study's files (see the module docstring), each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "replicates.json", out / "study.json", out / "study.md"]
    atomic_write_bytes(files[0], json.dumps(replicates, indent=1).encode())
    atomic_write_bytes(files[1], result.model_dump_json(indent=1).encode())
    atomic_write_bytes(files[2], study_markdown(result).encode())
    panels = difference_panels(result)
    if panels:
        files.append(plot_intervals(panels, out / "study.png", title=f"Study {result.name}: TDC − baseline per "
                                    f"arm (diamond = mean, bar = 95 % interval over training seeds, dots = seeds)"))
    if panels := contrast_panels(result):
        files.append(plot_intervals(panels, out / "contrasts.png", title=f"Study {result.name}: contrasts, a − b "
                                    f"(diamond = mean, bar = 95 % interval over training seeds, dots = seeds)"))
    if curves:
        files.append(plot_curves(curves, out / "curves.png", title=f"Study {result.name}: single model vs TDC, "
                                 f"every training seed"))
    return files
