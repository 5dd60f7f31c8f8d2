"""A study: pipeline runs replicated over training seeds, and what they say together.

A study file (YAML) names arms — each a preset plus overrides, run through the whole pipeline,
which trains TDC and its equal-cost single-model baseline side by side — and the training seeds
every arm is replicated over (``train.seed``; the stage-2 seeds derive from it). The data split
does not change with the seed, so every replicate is scored on the same held-out images.

Per arm and metric, :func:`summarise` reports the mean and 95 % interval over training seeds of
TDC, of the baseline and of the **paired difference** TDC − baseline (the two models of one
replicate share data, split and evaluation draws, so the difference is taken per seed first),
with Student's t at n − 1 degrees of freedom. An interval needs two seeds; with one it is
reported as missing, never as zero.

**Contrasts** compare models of two arms, paired by training seed: ``a: cosine.tdc`` and
``b: inherit.tdc`` gives, per metric, the interval of (a − b) over the seeds both arms ran. Arms
that share a stage 1 differ only in what the contrast isolates (e.g. stage 2's recipe), and a
model may be any arm's TDC or baseline (e.g. TDC against another arm's Min-SNR single model).

An arm with ``baseline.enabled=false`` trains and scores TDC alone (about half a replicate's
time): its table has TDC's numbers without a difference, and it enters contrasts as ``<arm>.tdc``
only. That suits ablations whose question is TDC against TDC (N, grouping cost, proxies).

Pure: reading the study file and aggregating records; running the pipelines is the caller's
(``flows/study.py``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from scipy import stats

from tdc_core.config import PipelineConfig, Seed, flatten, load_config, stage1_key
from tdc_core.errors import ConfigError
from tdc_core.evaluation.curves import Curve
from tdc_core.evaluation.results import Comparison
from tdc_core.method.budgets import budget_fractions
from tdc_core.method.pruning.space import count_spec_flops
from tdc_core.run.selection import Candidate, Selection, SelectionRule, choose, selection_markdown
from tdc_core.training.trainer import spec_for

__all__ = [
    "Arm",
    "ArmSummary",
    "Contrast",
    "ContrastMetric",
    "ContrastSummary",
    "DifferenceRow",
    "Equivalence",
    "Interval",
    "MetricSummary",
    "ReplicateEstimate",
    "StudySpec",
    "StudySummary",
    "contrast_panels",
    "difference_panels",
    "equivalence",
    "estimate",
    "load_study",
    "merge_replicates",
    "not_run_yet",
    "replicate_config",
    "replicate_differences",
    "replicate_metrics",
    "select",
    "settings_changed",
    "study_key",
    "study_markdown",
    "summarise",
    "summarise_contrast",
    "summary_metrics",
    "take_replicates",
]

# Metrics taken from each replicate's comparison (lower is better for all but precision/recall).
METRICS: dict[str, str] = {
    "bits_per_dim": "held-out bits/dim",
    "heldout_eps_mse": "held-out ε-MSE (uniform t)",
    "heldout_x0_mse": "held-out x0-MSE",
    "heldout_eps_mse_min_snr": "held-out Min-SNR-5 ε-MSE",
    "fid_mean": "FID (mean over sampling seeds)",
    "precision": "precision",
    "recall": "recall",
    "memorized_share": "memorized share (first seed's samples)",
    "sampling_flops_per_image": "sampling FLOPs per image",
    "training_flops": "training FLOPs",
}
HIGHER_IS_BETTER = {"precision", "recall"}
ALONE = "TDC alone (no baseline)"  # the verdict of an arm with baseline.enabled=false
# Costs are not outcomes: the baseline's training FLOPs are set to at least TDC's by design, so
# a verdict there would only restate the design; their ratio is reported instead.
COSTS = {"sampling_flops_per_image", "training_flops"}


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    preset: str = "digits"
    overrides: tuple[str, ...] = ()


_MODELS = ("tdc", "baseline")
_M = TypeVar("_M", bound=BaseModel)


class Contrast(BaseModel):
    """Model ``a`` against model ``b``, each ``<arm>.tdc`` or ``<arm>.baseline``, paired by seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    a: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*\.(tdc|baseline)$")
    b: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*\.(tdc|baseline)$")

    def parts(self, which: str) -> tuple[str, str]:
        """(arm, model) of ``a`` or ``b``."""
        arm, _, model = getattr(self, which).rpartition(".")
        return arm, model


class StudySpec(BaseModel):
    """A study file: ``name``, ``arms`` (each ``name``, ``preset``, ``overrides``), ``seeds`` and
    optional ``contrasts`` between arms' models.

    ``overrides`` at the top level apply to every arm, before the arm's own (so an arm's own
    value of the same key wins): e.g. a study that ran before a preset's default changed names the
    earlier value once. Once read, each arm's ``overrides`` hold the study's followed by its own,
    which is what every replicate's config is built from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    overrides: tuple[str, ...] = ()
    arms: tuple[Arm, ...] = Field(min_length=1)
    seeds: tuple[Seed, ...] = Field(min_length=1)
    workers: int | None = Field(None, ge=1)  # parallel group fine-tunes inside each pipeline run
    contrasts: tuple[Contrast, ...] = ()
    # A validation study's rule for choosing among its candidates (tdc_core/run/selection.py).
    selection: SelectionRule | None = None
    # Where replicates run: here, one after another (local), or each as a flow run of
    # ``deployment`` on any worker of its pool, all submitted at once (deployment). Workers
    # publish results to ``storage`` (any fsspec URL), from where the study reads them.
    replicates: Literal["local", "deployment"] = "local"
    deployment: str = "tdc/full-pipeline"
    storage: str | None = None

    @model_validator(mode="after")
    def _deployment_needs_storage(self) -> StudySpec:
        if self.replicates == "deployment" and not self.storage:
            raise ValueError("replicates: deployment needs storage: a URL every worker and this machine can "
                             "reach (s3://bucket/prefix, ...), where workers publish each replicate's results")
        return self

    @field_validator("arms")
    @classmethod
    def _distinct_arms(cls, arms: tuple[Arm, ...], info) -> tuple[Arm, ...]:
        names = [a.name for a in arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be distinct, got {names}")
        shared = info.data.get("overrides", ())
        # Folded in here, once, so everything downstream reads an arm's overrides alone.
        return tuple(a.model_copy(update={"overrides": (*shared, *a.overrides)}) for a in arms) if shared else arms

    @field_validator("contrasts")
    @classmethod
    def _contrasts_name_arms(cls, contrasts: tuple[Contrast, ...], info) -> tuple[Contrast, ...]:
        arms = {a.name for a in info.data.get("arms", ())}
        for c in contrasts:
            for which in ("a", "b"):
                arm, _ = c.parts(which)
                if arm not in arms:
                    raise ValueError(f"contrast {c.name}: {which}={getattr(c, which)!r} names no arm; "
                                     f"allowed arms: {sorted(arms)} (then .tdc or .baseline)")
            if c.a == c.b:
                raise ValueError(f"contrast {c.name}: a and b are the same model")
        if len({c.name for c in contrasts}) != len(contrasts):
            raise ValueError("contrast names must be distinct")
        return contrasts

    @model_validator(mode="after")
    def _selection_names_arms_or_contrasts(self) -> StudySpec:
        if self.selection is None:
            return self
        arms, contrasts = {a.name for a in self.arms}, {c.name for c in self.contrasts}
        for name in self.selection.candidates:
            if (name in arms) == (name in contrasts):
                raise ValueError(f"selection: candidate {name!r} must name exactly one arm or contrast; arms: "
                                 f"{sorted(arms)}, contrasts: {sorted(contrasts)}")
        named = [("metric", self.selection.metric), ("tiebreak", self.selection.tiebreak),
                 *(("require", m) for m in self.selection.require)]
        for key, metric in named:
            if metric is not None and (metric not in METRICS or metric in COSTS):
                raise ValueError(f"selection: {key} {metric!r} is not an outcome metric; allowed: "
                                 f"{sorted(set(METRICS) - COSTS)}")
        return self

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {list(seeds)}")
        return seeds


def load_yaml_model(path: str | Path, model: type[_M], *, what: str) -> _M:
    """A YAML file validated as ``model``; any failure is one :class:`ConfigError` naming
    ``what``, the file and the first field at fault."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc}") from None
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"{what} {path}: {'.'.join(map(str, err['loc'])) or 'top level'}: {err['msg']}") from None


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study file; every arm × seed config is built now, so a bad override
    fails before any training.

    Raises:
        ConfigError: naming the file and the field.
    """
    spec = load_yaml_model(path, StudySpec, what="study file")
    alone = set()
    for arm in spec.arms:
        # Seeds change only train.seed: what the arm evaluates is read from its first config.
        cfg, *_ = (replicate_config(arm, seed=seed) for seed in spec.seeds)
        if not cfg.eval.enabled:
            raise ConfigError(f"study file {path}: arm {arm.name}: eval.enabled=false leaves the study nothing to "
                              f"summarise; allowed: eval.enabled=true (baseline.enabled=false scores TDC alone)")
        if not cfg.baseline.enabled:
            alone.add(arm.name)
    for name in spec.selection.candidates if spec.selection else ():
        if name in alone:
            raise ConfigError(f"study file {path}: selection: candidate {name} is an arm with baseline.enabled=false "
                              f"(TDC alone), which has no TDC − baseline; allowed: a contrast of {name}.tdc against "
                              f"a single model")
    for c in spec.contrasts:
        for which in ("a", "b"):
            arm, model = c.parts(which)
            if model == "baseline" and arm in alone:
                raise ConfigError(f"study file {path}: contrast {c.name}: {which}={getattr(c, which)!r}, but arm "
                                  f"{arm} has baseline.enabled=false (TDC alone); allowed: {arm}.tdc")
    return spec


def replicate_config(arm: Arm, *, seed: int) -> PipelineConfig:
    """The pipeline config of one replicate: the arm's preset and overrides, ``train.seed = seed``."""
    return load_config(preset=arm.preset, overrides=[*arm.overrides, f"train.seed={seed}"])


# Where a run ran does not change what it trains or scores; TDC's numbers do not depend on the
# single model trained beside it, so an arm that scores TDC alone ignores the baseline's settings.
_WHERE_IT_RAN = ("orchestration",)


def replicate_differences(arm: Arm, *, seed: int, made_with: PipelineConfig) -> list[str]:
    """How ``made_with`` (the config a run folder was made with) differs from the replicate
    ``arm`` × ``seed``, one ``"key: run value, arm value"`` per setting; empty when that run is
    this replicate. Where it ran (``orchestration``) does not count, nor, for an arm that scores
    TDC alone, the ``baseline`` section."""
    want = replicate_config(arm, seed=seed)
    ignored = _WHERE_IT_RAN + (() if want.baseline.enabled else ("baseline",))
    have, need = flatten(made_with), flatten(want)
    return [f"{key}: {have.get(key, '(absent)')}, {need.get(key, '(absent)')}"
            for key in sorted(have.keys() | need.keys())
            if key.split(".")[0] not in ignored and have.get(key) != need.get(key)]


def take_replicates(spec: StudySpec, records: Sequence[Mapping], *, source: str,
                    rename: tuple[str, str] | None = None) -> tuple[list[dict], list[str]]:
    """The records of another study's ``replicates.json`` that belong to ``spec``: every record,
    or with ``rename=(theirs, ours)`` those of arm ``theirs``, taken as arm ``ours``. Each gets
    ``added_from`` (``source``). Returns ``(taken, notes)``; seeds the study does not replicate
    are left, each named in ``notes``.

    Raises:
        ConfigError: a record is not a replicate's (arm, seed, tdc and baseline metrics), names an
            arm the study lacks, or ``rename`` names an arm ``source`` does not hold.
    """
    arms = {a.name for a in spec.arms}
    taken, notes = [], []
    for r in records:
        try:
            arm, seed = str(r["arm"]), int(r["seed"])
            if not isinstance(r["tdc"], Mapping) or not isinstance(r["baseline"], Mapping) or not r["tdc"]:
                raise TypeError("tdc and baseline must be metric tables, tdc not empty")
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: {dict(r) if isinstance(r, Mapping) else r!r:.120} is not a study replicate "
                              f"({exc}); allowed: records of a replicates.json written by tdc study") from None
        if rename is not None:
            if arm != rename[0]:
                continue
            arm = rename[1]
        if arm not in arms:
            raise ConfigError(f"{source}: arm {arm} is not an arm of study {spec.name}; allowed: "
                              f"{', '.join(sorted(arms))} (or name one with {source}:THEIRS=OURS)")
        if seed not in spec.seeds:
            notes.append(f"{source}: {arm} seed {seed} left out (study {spec.name} replicates seeds "
                         f"{', '.join(map(str, spec.seeds))})")
            continue
        taken.append({**r, "arm": arm, "seed": seed,
                      "added_from": source + (f" arm {rename[0]}" if rename and rename[0] != arm else "")})
    if rename is not None and not taken and not notes:
        raise ConfigError(f"{source} holds no replicate of arm {rename[0]}")
    return taken, notes


def merge_replicates(spec: StudySpec, *, existing: Sequence[Mapping],
                     added: Sequence[Mapping]) -> tuple[list[dict], list[str]]:
    """``existing`` replicates with ``added`` ones, an added one replacing any of the same arm and
    seed, in the study's arm and seed order (records of arms or seeds the study no longer has
    are dropped, as a summary drops them). Returns ``(replicates, replaced)``, the latter as
    ``"<arm> seed <s>"``."""
    by_key = {(r["arm"], int(r["seed"])): dict(r) for r in existing}
    replaced = []
    for r in added:
        key = (r["arm"], int(r["seed"]))
        if key in by_key and by_key[key] != r:
            replaced.append(f"{key[0]} seed {key[1]}")
        by_key[key] = dict(r)
    return [by_key[(a.name, s)] for a in spec.arms for s in spec.seeds if (a.name, s) in by_key], replaced


def study_key(spec: StudySpec) -> str:
    """Short hash of what the study runs (arms and seeds): keys its MLflow run, so a resumed
    study logs into the same one."""
    body = spec.model_dump_json(include={"name", "arms", "seeds"})
    return hashlib.sha256(body.encode()).hexdigest()[:10]


class ReplicateEstimate(BaseModel):
    """Planned training compute of one replicate, before it runs (FLOPs; see :func:`estimate`)."""

    model_config = ConfigDict(frozen=True)

    arm: str
    seed: int
    stage1_key: str
    stage1_flops: float          # probe + shared model (once per stage-1 folder)
    stage2_flops: float          # group fine-tunes at their budgets (pruning search not included)
    baseline_extra_flops: float  # the baseline's steps beyond the shared run it continues (all, under cosine)
    eval_sampling_flops: float   # sampling the evaluation's images, TDC (and the baseline; upper bound)
    stage1_imported: bool = False  # train.init_from: stage 1 is IDDPM's, charged but not run


def estimate(arm: Arm, *, seed: int) -> ReplicateEstimate:
    """What one replicate will cost, from its config alone (nothing runs; FLOPs counted on the
    meta device). Stage 2 assumes every group meets its budget (full width with
    ``prune.enabled=false``), whose fractions do not depend on the profile (docs/METHOD.md
    step 3); the baseline is charged TDC's total but continues stage 1 under a constant learning
    rate, so only its steps beyond stage 1 are new compute (under ``train.lr_schedule=cosine``
    it is a run of its own: all its steps). With ``finetune.until_t`` every group is still
    charged its fine-tune (which groups start below it is not known before the profile): an
    upper bound."""
    cfg = replicate_config(arm, seed=seed)
    base = float(count_spec_flops(spec_for(cfg)))
    factor = 3.0  # forward + backward ≈ 3 × forward, as the cost report counts
    stage1 = cfg.train.steps * cfg.train.batch_size * base * factor
    fractions = (budget_fractions(num_groups=cfg.grouping.num_groups, k=cfg.budget.k) if cfg.prune.enabled
                 else [1.0] * cfg.grouping.num_groups)  # unpruned experts keep the full width
    ft_batch = cfg.finetune.batch_size or cfg.train.batch_size
    stage2 = math.fsum(fractions) * cfg.finetune.steps * ft_batch * base * factor
    per_step = cfg.train.batch_size * base * factor
    baseline_steps = cfg.baseline.steps or math.ceil((stage1 + stage2) / per_step)
    continued = cfg.train.steps if cfg.train.length_free else 0
    baseline_extra = max(0, baseline_steps - continued) * per_step if cfg.baseline.enabled else 0.0
    steps = cfg.sample.steps or cfg.diffusion.num_timesteps
    models = (1 + int(cfg.baseline.enabled)) * int(cfg.eval.enabled)  # TDC, and the baseline beside it
    sampling = models * cfg.eval.num_samples * len(cfg.eval.seeds) * steps * base
    return ReplicateEstimate(arm=arm.name, seed=seed, stage1_key=stage1_key(cfg), stage1_flops=stage1,
                             stage2_flops=stage2, baseline_extra_flops=baseline_extra, eval_sampling_flops=sampling,
                             stage1_imported=cfg.train.init_from is not None)


def replicate_metrics(c: Comparison) -> dict[str, dict[str, float]]:
    """``{"tdc": {metric: value}, "baseline": {...}}`` of one replicate's comparison; the
    baseline's is empty when TDC was evaluated alone."""
    out: dict[str, dict[str, float]] = {"baseline": {}}
    for name, row in (("tdc", c.tdc), ("baseline", c.baseline)):
        if row is None:
            continue
        m: dict[str, float] = {"fid_mean": row.eval.fid_mean,
                               "sampling_flops_per_image": row.cost.sampling_flops_per_image}
        if row.cost.training_flops is not None:
            m["training_flops"] = row.cost.training_flops
        for h in c.heldout:
            if h.name == name:
                m |= {"heldout_eps_mse": h.eps_mse, "heldout_x0_mse": h.x0_mse,
                      "heldout_eps_mse_min_snr": h.eps_mse_min_snr}
        for lk in c.likelihood:
            if lk.name == name:
                m["bits_per_dim"] = lk.bpd
        for q in c.sample_quality:
            if q.name == name:
                m |= {"precision": q.precision, "recall": q.recall}
                if q.memorized_share is not None:  # None: the run kept no training images to compare with
                    m["memorized_share"] = q.memorized_share
        out[name] = m
    return out


class Interval(BaseModel):
    model_config = ConfigDict(frozen=True)

    mean: float
    low: float | None        # 95 % t interval over seeds; None with fewer than two seeds
    high: float | None
    n: int
    values: list[float]      # per seed, in seed order

    def signed(self, spec: str = "+.4f") -> str:
        """``mean [low, high]`` with signs (``mean`` alone without an interval), for differences."""
        ci = f" [{self.low:{spec}}, {self.high:{spec}}]" if self.low is not None else ""
        return f"{self.mean:{spec}}{ci}"


def interval(values: Sequence[float]) -> Interval:
    """Mean and 95 % Student-t interval of ``values`` (independent replicates)."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return Interval(mean=mean, low=None, high=None, n=len(v), values=v.tolist())
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return Interval(mean=mean, low=mean - half, high=mean + half, n=len(v), values=v.tolist())


class MetricSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    metric: str
    tdc: Interval
    baseline: Interval | None    # None: the arm evaluated TDC alone (baseline.enabled=false)
    difference: Interval | None  # TDC − baseline, paired by seed; None alone
    verdict: str             # from the difference's interval; "—" without one


class ArmSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    arm: str
    seeds: list[int]
    metrics: list[MetricSummary]


class Equivalence(BaseModel):
    """What TDC's quality would cost the single model, per arm: the training FLOPs at which the
    single model's curve reaches TDC's value, as a share of TDC's own training FLOPs (below 1:
    TDC is worth less than its compute; above: more)."""

    model_config = ConfigDict(frozen=True)

    arm: str
    metric: str
    per_seed: list[float | None]   # None: the single model's curve does not cross TDC's value there
    ratio: Interval | None         # over the seeds with a ratio; None when no seed has one
    # Each seed in words: its ratio, or why it has none (TDC beyond the curve's last point, or
    # worse than its first). Empty in study.json files written before it existed.
    per_seed_text: list[str] = []


class ContrastMetric(BaseModel):
    model_config = ConfigDict(frozen=True)

    metric: str
    a: Interval
    b: Interval
    difference: Interval     # a − b, paired by seed
    verdict: str             # "a better", "b better", "no clear difference", or "—"


class ContrastSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    a: str
    b: str
    seeds: list[int]         # the seeds both arms ran
    metrics: list[ContrastMetric]


class StudySummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    arms: list[ArmSummary]
    contrasts: list[ContrastSummary] = []
    seconds: float | None = None   # wall time of the invocation that wrote it
    reused: int = 0                # replicates that invocation found finished (their time is not in it)
    equivalence: list[Equivalence] = []
    selection: Selection | None = None  # the study file's selection rule applied (see select)
    # A part-run study (``tdc study --summary-only --partial``): the study file's arm × seeds and
    # contrasts with no replicates yet, e.g. "n3 seeds 0, 1, 2", "contrast n3-vs-n5 (needs n3)".
    not_run: list[str] = []


def equivalence(curves: Mapping[str, Sequence[Curve]], *, metric: str = "bits_per_dim") -> list[Equivalence]:
    """Per arm, each seed's :meth:`Curve.matching_flops` over TDC's training FLOPs, with its mean
    and 95 % interval over the seeds that have one."""
    out = []
    for arm, cs in curves.items():
        ratios = [(m / c.tdc.training_flops) if (m := c.matching_flops(metric)) is not None else None for c in cs]
        have = [r for r in ratios if r is not None]
        out.append(Equivalence(arm=arm, metric=metric, per_seed=ratios, ratio=interval(have) if have else None,
                               per_seed_text=[_equivalence_text(c, r, metric) for c, r in zip(cs, ratios)]))
    return out


def _equivalence_text(curve: Curve, ratio: float | None, metric: str) -> str:
    if ratio is not None:
        return f"{ratio:.3f}"
    first = curve.single[0] if curve.single else None
    if first is not None and getattr(curve.tdc, metric) >= getattr(first, metric):
        # The single model is already better at its first kept point: TDC's quality costs it less.
        return f"TDC worse than the curve's first point (< {first.training_flops / curve.tdc.training_flops:.3f})"
    return "TDC beyond the curve"


def _first_better(metric: str, d: Interval) -> bool | None:
    """Whether the first model of a paired difference ``d`` (first − second) is the better one;
    None when the 95 % interval includes 0."""
    if d.low <= 0 <= d.high:
        return None
    return (d.high < 0) != (metric in HIGHER_IS_BETTER)


def _verdict(metric: str, d: Interval, *, first: str = "TDC", second: str | None = None) -> str:
    """"<first> better/worse" (or "<second> better" when it is named), from the interval of
    first − second; "no clear difference" when it includes 0."""
    if d.low is None:
        return "— (one seed: no interval)"
    better = _first_better(metric, d)
    if better is None:
        return "no clear difference"
    if second is None:
        return f"{first} {'better' if better else 'worse'}"
    return f"{first if better else second} better"


def _cost_verdict(tdc: Interval, baseline: Interval) -> str:
    return f"cost: TDC / baseline = {tdc.mean / baseline.mean:.3f}" if baseline.mean else "cost"


def _paired(first: Sequence[float], second: Sequence[float]) -> tuple[Interval, Interval, Interval]:
    """Intervals of ``first``, ``second`` and their per-seed difference (same seed order)."""
    return interval(first), interval(second), interval([x - y for x, y in zip(first, second)])


def summarise_contrast(contrast: Contrast, arms: Mapping[str, Mapping[int, dict[str, dict[str, float]]]]
                       ) -> ContrastSummary:
    """``contrast.a`` − ``contrast.b`` per metric, paired over the seeds both arms ran."""
    (arm_a, model_a), (arm_b, model_b) = contrast.parts("a"), contrast.parts("b")
    seeds = sorted(set(arms.get(arm_a, {})) & set(arms.get(arm_b, {})))
    metrics = []
    for metric in METRICS:
        if not seeds or not all(metric in arms[arm_a][s][model_a] and metric in arms[arm_b][s][model_b]
                                for s in seeds):
            continue
        a, b, diff = _paired([arms[arm_a][s][model_a][metric] for s in seeds],
                             [arms[arm_b][s][model_b][metric] for s in seeds])
        verdict = "cost" if metric in COSTS else _verdict(metric, diff, first="a", second="b")
        metrics.append(ContrastMetric(metric=metric, a=a, b=b, difference=diff, verdict=verdict))
    return ContrastSummary(name=contrast.name, a=contrast.a, b=contrast.b, seeds=seeds, metrics=metrics)


def not_run_yet(spec: StudySpec, arms: Mapping[str, Mapping[int, object]]) -> tuple[list[Contrast], list[str]]:
    """What a part-run study can summarise: ``(contrasts with a seed both their arms ran, what is
    not run yet)``, the latter as text, e.g. ``"n3 seeds 0, 1, 2"``, ``"contrast n3-vs-n5 (needs
    n3)"``; ``arms`` maps each arm to its replicates by seed."""
    not_run = [f"{a.name} seeds {', '.join(map(str, seeds))}" for a in spec.arms
               if (seeds := [s for s in spec.seeds if s not in arms.get(a.name, {})])]
    contrasts = []
    for c in spec.contrasts:
        arm_a, arm_b = c.parts("a")[0], c.parts("b")[0]
        if set(arms.get(arm_a, {})) & set(arms.get(arm_b, {})):
            contrasts.append(c)
        else:  # named, not drawn as an empty table
            absent = [arm for arm in dict.fromkeys((arm_a, arm_b)) if arm not in arms]
            not_run.append(f"contrast {c.name} (needs {' and '.join(absent) or 'a seed both arms ran'})")
    return contrasts, not_run


def summarise(*, name: str, arms: Mapping[str, Mapping[int, dict[str, dict[str, float]]]],
              seconds: float | None = None, contrasts: Sequence[Contrast] = ()) -> StudySummary:
    """Aggregate ``{arm: {seed: replicate_metrics(...)}}`` (see the module docstring), and the
    ``contrasts`` between arms."""
    out = []
    for arm, by_seed in arms.items():
        seeds = sorted(by_seed)
        metrics = []
        if not any(by_seed[s]["baseline"] for s in seeds):  # TDC alone: its numbers, no difference
            metrics = [MetricSummary(metric=metric, tdc=interval([by_seed[s]["tdc"][metric] for s in seeds]),
                                     baseline=None, difference=None, verdict=ALONE)
                       for metric in METRICS if all(metric in by_seed[s]["tdc"] for s in seeds)]
            out.append(ArmSummary(arm=arm, seeds=seeds, metrics=metrics))
            continue
        for metric in METRICS:
            if not all(metric in by_seed[s]["tdc"] and metric in by_seed[s]["baseline"] for s in seeds):
                continue
            t_int, b_int, diff = _paired([by_seed[s]["tdc"][metric] for s in seeds],
                                         [by_seed[s]["baseline"][metric] for s in seeds])
            verdict = _cost_verdict(t_int, b_int) if metric in COSTS else _verdict(metric, diff)
            metrics.append(MetricSummary(metric=metric, tdc=t_int, baseline=b_int, difference=diff, verdict=verdict))
        out.append(ArmSummary(arm=arm, seeds=seeds, metrics=metrics))
    return StudySummary(name=name, arms=out, seconds=seconds,
                        contrasts=[summarise_contrast(c, arms) for c in contrasts])


def _fmt(i: Interval, scale: float = 1.0) -> str:
    if i.low is None:
        return f"{i.mean / scale:.4g}"
    return f"{i.mean / scale:.4g} [{i.low / scale:.4g}, {i.high / scale:.4g}]"


def _table_row(metric: str, first: Interval, second: Interval, difference: Interval, verdict: str) -> str:
    """One Markdown row: the metric (FLOPs in GFLOP), both models, their difference, the verdict."""
    scale = 1e9 if "flops" in metric else 1.0
    unit = " (GFLOP)" if scale != 1.0 else ""
    return (f"| {METRICS[metric]}{unit} | {_fmt(first, scale)} | {_fmt(second, scale)} | "
            f"{_fmt(difference, scale)} | {verdict} |")


def _preamble(s: StudySummary) -> list[str]:
    """What the study is missing (a part-run one) and how long its invocation took."""
    lines = []
    if s.not_run:
        lines += [f"**Part run.** Not run yet, so not below: {'; '.join(s.not_run)}. Every number below is "
                  "over the seeds its arm or contrast names; running the study file runs the rest.", ""]
    if s.seconds is not None:
        n = sum(len(a.seeds) for a in s.arms)
        reused = f" ({s.reused} of {n} replicates were already finished and reused)" if s.reused else ""
        lines += [f"Wall time of this invocation: {s.seconds / 60:.1f} min{reused}.", ""]
    return lines


def study_markdown(s: StudySummary) -> str:
    """The study as Markdown: per arm, each metric's TDC, baseline and paired difference."""
    lines = [f"# Study `{s.name}`", "", *_preamble(s)]
    for arm in s.arms:
        if any(m.difference is None for m in arm.metrics):
            lines += [f"## Arm `{arm.arm}`: {len(arm.seeds)} training seeds {arm.seeds}, TDC alone (no baseline)", "",
                      "Mean [95 % t interval over training seeds]. The arm trained no baseline "
                      "(`baseline.enabled=false`): compare it with other arms through the contrasts below.", "",
                      "| metric | TDC |", "|---|---|"]
            for m in arm.metrics:
                scale = 1e9 if "flops" in m.metric else 1.0
                lines.append(f"| {METRICS[m.metric]}{' (GFLOP)' if scale != 1.0 else ''} | {_fmt(m.tdc, scale)} |")
            lines.append("")
            continue
        lines += [f"## Arm `{arm.arm}`: {len(arm.seeds)} training seeds {arm.seeds}", "",
                  "Mean [95 % t interval over training seeds]; the difference is TDC − baseline, taken per seed.",
                  "", "| metric | TDC | baseline | TDC − baseline | verdict |", "|---|---|---|---|---|"]
        for m in arm.metrics:
            lines.append(_table_row(m.metric, m.tdc, m.baseline, m.difference, m.verdict))
        lines += ["", "Per seed (TDC − baseline):", ""]
        for m in arm.metrics:
            per_seed = ", ".join(f"{v:+.4g}" for v in m.difference.values)
            lines.append(f"- {m.metric}: {per_seed}")
        lines.append("")
    if s.contrasts:
        lines += ["## Contrasts between arms", "",
                  "Model a against model b, each an arm's TDC or baseline, the difference a − b taken per "
                  "training seed. Mean [95 % t interval over training seeds].", ""]
        for c in s.contrasts:
            lines += [f"### `{c.name}`: a = `{c.a}`, b = `{c.b}`, seeds {c.seeds}", "",
                      "| metric | a | b | a − b | verdict |", "|---|---|---|---|---|"]
            for m in c.metrics:
                lines.append(_table_row(m.metric, m.a, m.b, m.difference, m.verdict))
            lines.append("")
    if s.equivalence:
        lines += ["## What TDC's quality costs a single model", "",
                  "Training FLOPs at which the single model (one dense run, scored at every step it kept) "
                  "reaches TDC's held-out bits/dim, as a share of TDC's own training FLOPs: below 1, TDC's "
                  "compute bought less than the single model gets from it; above 1, more. Mean [95 % t "
                  "interval over training seeds].", "",
                  "| arm | ratio | per seed |", "|---|---|---|"]
        for e in s.equivalence:
            per_seed = ", ".join(e.per_seed_text or ["TDC beyond the curve" if r is None else f"{r:.3f}"
                                                     for r in e.per_seed])
            lines.append(f"| {e.arm} | {_fmt(e.ratio) if e.ratio else '—'} | {per_seed} |")
        lines.append("")
    if s.selection:
        lines += selection_markdown(s.selection, label=lambda m: METRICS[m],
                                    higher_is_better=lambda m: m in HIGHER_IS_BETTER)
    return "\n".join(lines)


def study_reference(spec: StudySpec, *, preset: str) -> PipelineConfig:
    """The study's own configuration for ``preset``: the preset with the study-level overrides,
    at the study's first seed (what :func:`settings_changed` counts from)."""
    return replicate_config(Arm(name="study", preset=preset, overrides=spec.overrides), seed=spec.seeds[0])


def settings_changed(spec: StudySpec, arm: Arm, *, reference: PipelineConfig) -> int:
    """How many settings ``arm`` changes from ``reference`` (:func:`study_reference` of its
    preset), where it runs and an unscored baseline aside: the selection rule's measure of
    simplicity."""
    return len(replicate_differences(arm, seed=spec.seeds[0], made_with=reference))


def select(spec: StudySpec, summary: StudySummary) -> Selection | None:
    """The study file's ``selection`` rule applied to ``summary`` (None without a rule): each
    candidate's mean paired difference, TDC − baseline for an arm and a − b for a contrast."""
    if spec.selection is None:
        return None
    rule = spec.selection
    # What each candidate's numbers are: an arm's TDC − baseline, or a contrast's a − b (a part-run
    # study may lack either: the candidate then has no number and the rule waits).
    measured = {a.arm: (a.seeds, {m.metric: m.difference for m in a.metrics if m.difference}) for a in summary.arms}
    measured |= {c.name: (c.seeds, {m.metric: m.difference for m in c.metrics}) for c in summary.contrasts}
    by_name = {a.name: a for a in spec.arms}
    arm_a = {c.name: by_name[c.parts("a")[0]] for c in spec.contrasts}  # a contrast's setting is its a's
    arms = {name: by_name.get(name) or arm_a[name] for name in rule.candidates}
    # Built once per preset, not once per candidate: each is a full config resolution.
    references = {p: study_reference(spec, preset=p) for p in {a.preset for a in arms.values()}}
    candidates = []
    for name in rule.candidates:
        seeds, found = measured.get(name, ([], {}))
        arm = arms[name]
        mean = {k: d.mean for k, d in found.items()}
        candidates.append(Candidate(name=name, metric=mean.get(rule.metric),
                                    tiebreak=mean.get(rule.tiebreak) if rule.tiebreak else None,
                                    required={m: mean.get(m) for m in rule.require},
                                    settings_changed=settings_changed(spec, arm, reference=references[arm.preset]),
                                    seeds=tuple(seeds)))
    return choose(rule, candidates, higher_is_better=lambda m: m in HIGHER_IS_BETTER, label=lambda m: METRICS[m],
                  seeds=spec.seeds)


@dataclass(frozen=True)
class DifferenceRow:
    """One arm's TDC − baseline, or one contrast's a − b, on one metric (drawn by ``plot_intervals``)."""

    label: str
    mean: float
    low: float | None
    high: float | None
    values: tuple[float, ...]

    @classmethod
    def of(cls, label: str, d: Interval) -> DifferenceRow:
        return cls(label=label, mean=d.mean, low=d.low, high=d.high, values=tuple(d.values))


def difference_panels(s: StudySummary) -> list[tuple[str, list[DifferenceRow]]]:
    """Per outcome metric (costs left out), each arm's TDC − baseline: mean, 95 % interval and
    the per-seed differences."""
    panels: dict[str, list[DifferenceRow]] = {}
    for arm in s.arms:
        for m in arm.metrics:
            if m.metric in COSTS or m.difference is None:
                continue
            panels.setdefault(m.metric, []).append(DifferenceRow.of(arm.arm, m.difference))
    return [(f"{METRICS[k]}: TDC − baseline", v) for k, v in panels.items()]


def contrast_panels(s: StudySummary) -> list[tuple[str, list[DifferenceRow]]]:
    """Per outcome metric (costs left out), each contrast's a − b: mean, 95 % interval and the
    per-seed differences; the row is labelled with the contrast's name."""
    panels: dict[str, list[DifferenceRow]] = {}
    for c in s.contrasts:
        for m in c.metrics:
            if m.metric in COSTS:
                continue
            panels.setdefault(m.metric, []).append(DifferenceRow.of(c.name, m.difference))
    return [(f"{METRICS[k]}: a − b", v) for k, v in panels.items()]


def summary_metrics(s: StudySummary) -> dict[str, float]:
    """The study's numbers as flat MLflow metrics: ``<arm>.<metric>.{tdc,baseline,difference}``
    means, and the difference's interval where there is one."""
    out: dict[str, float] = {}
    for arm in s.arms:
        for m in arm.metrics:
            key = f"{arm.arm}.{m.metric}"
            out[f"{key}.tdc"] = m.tdc.mean
            if m.difference is None:  # TDC alone
                continue
            out |= {f"{key}.baseline": m.baseline.mean, f"{key}.difference": m.difference.mean}
            if m.difference.low is not None:
                out |= {f"{key}.difference_ci_low": m.difference.low, f"{key}.difference_ci_high": m.difference.high}
    for c in s.contrasts:
        for m in c.metrics:
            key = f"contrast.{c.name}.{m.metric}"
            out[f"{key}.difference"] = m.difference.mean
            if m.difference.low is not None:
                out |= {f"{key}.difference_ci_low": m.difference.low, f"{key}.difference_ci_high": m.difference.high}
    return out
