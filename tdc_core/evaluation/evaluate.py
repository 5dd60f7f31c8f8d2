"""Evaluation: generate samples, score them (FID/KID over several seeds), compare TDC vs baseline.

* :func:`generate` — N samples from any denoiser (a UNet or the routed ensemble), batched and
  seeded: the same (seed, num, batch size, sampler) starts from the same noise on any device.
* :func:`evaluate_model` — FID and KID per seed against cached reference statistics, mean ±
  std over seeds, measured sampling time, and a PNG grid of samples.
* :func:`compare` — the TDC ensemble and the single-model baseline evaluated identically (same
  :class:`EvalSetup`: sample count, seeds, sampler, steps, eta; hence also the same initial
  noise per seed), with sampling FLOPs and training cost, written as Markdown + JSON + one plot.
  Every seed's score is in the JSON and in the table: nothing is picked.
* :func:`evaluate_config` / :func:`compare_run` — the same from a config and a run folder, what
  ``tdc fid`` and ``tdc compare`` call.

Every score carries the feature extractor's identity, its mode and the comparability label;
with the offline digits CNN that label says the numbers are not comparable with Inception FID.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tdc_core.atomic import atomic_write_bytes
from tdc_core.config import PipelineConfig
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.diffusion.samplers import Denoiser, generate, sampling_timesteps
from tdc_core.errors import CheckpointError, ConfigError
from tdc_core.evaluation.features import (
    FeatureExtractor,
    build_extractor,
    resolve_cache_dir,
)
from tdc_core.evaluation.fid import (
    ReferenceInfo,
    ReferenceStats,
    reference_statistics,
    score_features,
)
from tdc_core.evaluation.grids import save_grid
from tdc_core.method.costs import measure_group_flops, sampling_cost
from tdc_core.model.flops import count_forward_flops
from tdc_core.records import save_record
from tdc_core.reporter import NullReporter, Reporter
from tdc_core.run.layout import RunLayout
from tdc_core.run.stages import assemble_router, cost_stage
from tdc_core.training.data import dataset_fingerprint
from tdc_core.training.trainer import load_model, prepare_data

__all__ = [
    "Comparison",
    "ComparisonRow",
    "Contender",
    "ContenderCost",
    "EvalResult",
    "EvalSetup",
    "RealScore",
    "SeedScore",
    "compare",
    "compare_run",
    "comparison_markdown",
    "default_baseline_checkpoint",
    "evaluate_config",
    "evaluate_model",
    "generate",
    "plot_comparison",
    "reference_for_config",
    "score_real",
]

GRID_IMAGES = 64  # samples shown in each model's PNG grid


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvalSetup(_Record):
    """What must be identical for every model in one comparison."""

    num_samples: int = Field(ge=2)           # generated images per seed
    seeds: tuple[int, ...] = Field(min_length=1)  # sample seeds; the spread over them is reported
    batch_size: int = Field(ge=1)            # generation and feature batch
    sampler: Literal["ddpm", "ddim"]
    steps: int | None = Field(ge=1)          # respaced sampling steps (None = all T)
    eta: float = Field(ge=0.0)               # DDIM noise scale

    @classmethod
    def from_config(cls, config: PipelineConfig, *, num_samples: int | None = None,
                    seeds: Sequence[int] | None = None, sampler: str | None = None,
                    steps: int | None = None) -> EvalSetup:
        """``eval.*`` sample count, seeds, batch size and ``sample.*`` sampler, steps and eta,
        each replaceable by an explicit argument."""
        chosen_steps = config.sample.steps if steps is None else steps
        if chosen_steps is not None and chosen_steps > config.diffusion.num_timesteps:
            raise ConfigError(f"sampling steps={chosen_steps} exceed diffusion.num_timesteps="
                              f"{config.diffusion.num_timesteps}")
        try:
            return cls(num_samples=config.eval.num_samples if num_samples is None else num_samples,
                       seeds=tuple(config.eval.seeds if seeds is None else seeds), batch_size=config.eval.batch_size,
                       sampler=sampler or config.sample.sampler, steps=chosen_steps, eta=config.sample.eta)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ConfigError(f"invalid evaluation setup: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


class SeedScore(_Record):
    seed: int
    fid: float
    kid: float
    sampling_seconds: float                  # wall time to generate this seed's images


class EvalResult(_Record):
    """One model's scores over all seeds (every seed listed: no cherry-picking)."""

    name: str
    fid_mean: float
    fid_std: float                           # sample std over seeds (ddof = 1); 0 for one seed
    kid_mean: float
    kid_std: float
    per_seed: list[SeedScore]
    num_samples: int                         # per seed
    sampler: str
    sampling_steps: int                      # denoiser calls per image
    eta: float
    seconds_per_image: float                 # mean measured sampling time per image
    device: str
    feature_extractor: str                   # extractor identity
    fid_mode: str                            # clean-fid mode (or "digits-native")
    comparability: str                       # e.g. "digits-cnn features (not comparable with Inception FID)"
    reference: ReferenceInfo
    grid_png: str | None


class RealScore(_Record):
    """Real held-out images scored like a model: the floor a perfect model would reach at this
    sample count (FID is biased upwards for small N)."""

    name: str = "real held-out"
    fid: float
    kid: float
    num_images: int
    feature_extractor: str
    fid_mode: str
    comparability: str


class ContenderCost(_Record):
    """Costs in FLOPs (one multiply-add = 2), per image where stated."""

    forward_flops: list[float]               # per image, one entry per model (experts, or the single model)
    sampling_flops_per_image: float          # Σ over the sampler's steps of the serving model's FLOPs
    training_flops: float | None             # total training FLOPs (None = unknown)
    training_detail: str                     # how training_flops was counted


class ComparisonRow(_Record):
    eval: EvalResult
    cost: ContenderCost


class Comparison(_Record):
    setup: EvalSetup
    feature_extractor: str
    fid_mode: str
    comparability: str
    tdc: ComparisonRow
    baseline: ComparisonRow
    real_heldout: RealScore | None
    fid_difference: float                    # TDC − baseline mean FID (negative: TDC better)
    sampling_flops_ratio: float              # TDC / baseline, per image
    training_flops_ratio: float | None       # TDC / baseline
    notes: list[str]
    markdown_path: str                       # the written files
    json_path: str
    plot_path: str


@dataclass(frozen=True)
class Contender:
    """A model to compare: a denoiser ``(x, t) -> out`` plus its costs."""

    name: str
    model: Denoiser
    cost: ContenderCost


# --- generation and scoring -------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def evaluate_model(
    model: Denoiser,
    diffusion: Diffusion,
    *,
    name: str,
    setup: EvalSetup,
    image_shape: tuple[int, int, int],
    extractor: FeatureExtractor,
    reference: ReferenceStats,
    device: torch.device | str = "cpu",
    out_dir: Path | None = None,
    reporter: Reporter | None = None,
) -> EvalResult:
    """FID and KID of ``model`` for every seed of ``setup``, against ``reference``.

    Args:
        diffusion: the model's full diffusion; it is respaced to ``setup.steps`` here, so every
            model evaluated with one setup takes the same steps.
        out_dir: where ``<name>-samples.png`` (the first seed's first 64 samples) and
            ``<name>-eval.json`` go; None writes nothing.

    Raises:
        ValueError: the reference was computed with another extractor or mode.
    """
    if reference.info.feature_extractor != extractor.identity or reference.info.fid_mode != extractor.mode:
        raise ValueError(f"reference statistics were computed with {reference.info.feature_extractor} "
                         f"({reference.info.fid_mode}), not with {extractor.identity} ({extractor.mode})")
    reporter = reporter or NullReporter()
    device = torch.device(device)
    respaced = diffusion.respaced(setup.steps)
    per_seed, grid = [], None
    reporter.progress(step=0, total=len(setup.seeds))
    for seed in setup.seeds:
        _sync(device)
        t0 = time.perf_counter()
        images = generate(model, respaced, num=setup.num_samples, seed=seed, batch_size=setup.batch_size,
                          image_shape=image_shape, sampler=setup.sampler, eta=setup.eta, device=device)
        _sync(device)
        seconds = time.perf_counter() - t0
        if grid is None and out_dir is not None:
            grid = save_grid(Path(out_dir) / f"{name}-samples.png", images[:GRID_IMAGES])
        fid, kid = score_features(extractor.features(images, batch_size=setup.batch_size), reference, kid_seed=seed)
        per_seed.append(SeedScore(seed=seed, fid=fid, kid=kid, sampling_seconds=seconds))
        reporter.message(f"{name} seed {seed}: FID {fid:.3f}, KID {kid:.5f} ({seconds:.1f} s sampling)")
        reporter.progress(step=len(per_seed), total=len(setup.seeds))
    fids, kids = [s.fid for s in per_seed], [s.kid for s in per_seed]
    result = EvalResult(
        name=name, fid_mean=float(np.mean(fids)), fid_std=_std(fids), kid_mean=float(np.mean(kids)),
        kid_std=_std(kids), per_seed=per_seed, num_samples=setup.num_samples, sampler=setup.sampler,
        sampling_steps=respaced.num_steps, eta=setup.eta,
        seconds_per_image=float(np.mean([s.sampling_seconds for s in per_seed])) / setup.num_samples,
        device=str(device), **extractor.describe(), reference=reference.info,
        grid_png=str(grid) if grid is not None else None,
    )
    if out_dir is not None:
        save_record(Path(out_dir) / f"{name}-eval.json", result)
    return result


def score_real(images: torch.Tensor, *, extractor: FeatureExtractor, reference: ReferenceStats,
               batch_size: int = 250) -> RealScore:
    """FID/KID of real uint8 images ``[N x C x H x W]`` (e.g. the held-out split) vs ``reference``."""
    fid, kid = score_features(extractor.features(images, batch_size=batch_size), reference)
    return RealScore(fid=fid, kid=kid, num_images=int(images.shape[0]), **extractor.describe())


# --- the comparison ---------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(
    *,
    tdc: Contender,
    baseline: Contender,
    diffusion: Diffusion,
    setup: EvalSetup,
    image_shape: tuple[int, int, int],
    extractor: FeatureExtractor,
    reference: ReferenceStats,
    out_dir: Path,
    device: torch.device | str = "cpu",
    heldout_images: torch.Tensor | None = None,
    notes: Sequence[str] = (),
    reporter: Reporter | None = None,
) -> Comparison:
    """Evaluate both contenders with the same ``setup`` and write the comparison.

    Writes ``comparison.md``, ``comparison.json``, ``comparison.png`` and each model's sample
    grid and eval JSON into ``out_dir``. ``heldout_images`` (uint8), when given, adds the real
    held-out row as a floor.
    """
    if tdc.name == baseline.name:
        raise ValueError(f"the contenders need different names (their files share out_dir), got {tdc.name!r} twice")
    out_dir = Path(out_dir)
    rows = {}
    for c in (tdc, baseline):
        ev = evaluate_model(c.model, diffusion, name=c.name, setup=setup, image_shape=image_shape,
                            extractor=extractor, reference=reference, device=device, out_dir=out_dir,
                            reporter=reporter)
        rows[c.name] = ComparisonRow(eval=ev, cost=c.cost)
    real = (score_real(heldout_images, extractor=extractor, reference=reference, batch_size=setup.batch_size)
            if heldout_images is not None else None)
    t, b = rows[tdc.name], rows[baseline.name]
    notes = list(notes)
    if extractor.kind == "digits":
        notes.append(f"Scores use {extractor.label}.")
    if real is not None and real.num_images != setup.num_samples:
        notes.append(f"The real held-out row scores {real.num_images} images, the models {setup.num_samples} per "
                     f"seed; FID depends on the number of images (biased upwards for small sets), so that row "
                     f"is an indication of the floor, not an exact one.")
    comparison = Comparison(
        setup=setup, **extractor.describe(), tdc=t, baseline=b, real_heldout=real,
        fid_difference=t.eval.fid_mean - b.eval.fid_mean,
        sampling_flops_ratio=t.cost.sampling_flops_per_image / b.cost.sampling_flops_per_image,
        training_flops_ratio=_ratio(t.cost.training_flops, b.cost.training_flops), notes=notes,
        markdown_path=str(out_dir / "comparison.md"), json_path=str(out_dir / "comparison.json"),
        plot_path=str(out_dir / "comparison.png"),
    )
    atomic_write_bytes(comparison.markdown_path, comparison_markdown(comparison).encode())
    save_record(comparison.json_path, comparison)
    plot_comparison(comparison, comparison.plot_path)
    return comparison


_FLOP_UNITS = ((1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1.0, "FLOP"))


def _flops_unit(x: float) -> tuple[float, str]:
    """The largest unit in which ``x`` FLOPs is at least 1: ``(scale, name)``."""
    return next(((s, u) for s, u in _FLOP_UNITS if abs(x) >= s), _FLOP_UNITS[-1])


def _fmt_flops(x: float | None) -> str:
    if x is None:
        return "–"
    scale, unit = _flops_unit(x)
    return f"{x / scale:.3g} {unit}"


def _fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def comparison_markdown(c: Comparison) -> str:
    """The comparison as a Markdown table with a header that states how it was measured."""
    s = c.setup
    lines = [
        "## TDC vs single-model baseline",
        "",
        f"- features: `{c.feature_extractor}`, mode `{c.fid_mode}` — **{c.comparability}**",
        f"- {s.num_samples} samples per seed, seeds {list(s.seeds)}, sampler {s.sampler}, "
        f"{c.tdc.eval.sampling_steps} steps, eta {s.eta:g}; both models get the same seeds (and initial noise)",
        f"- reference: {c.tdc.eval.reference.num_images} training images "
        f"(dataset {c.tdc.eval.reference.dataset_fingerprint}, {c.tdc.eval.reference.resolution} px)",
        "",
        "| model | FID ↓ mean ± std | FID per seed | KID ↓ mean ± std | sampling FLOPs / image "
        "| sampling ms / image | training FLOPs |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in (c.tdc, c.baseline):
        e = row.eval
        seeds = ", ".join(f"{p.fid:.3f}" for p in e.per_seed)
        lines.append(
            f"| {e.name} | {e.fid_mean:.3f} ± {e.fid_std:.3f} | {seeds} | {e.kid_mean:.5f} ± {e.kid_std:.5f} "
            f"| {_fmt_flops(row.cost.sampling_flops_per_image)} | {1e3 * e.seconds_per_image:.2f} "
            f"| {_fmt_flops(row.cost.training_flops)} |"
        )
    if c.real_heldout is not None:
        r = c.real_heldout
        lines.append(f"| {r.name} ({r.num_images} images) | {r.fid:.3f} | – | {r.kid:.5f} | – | – | – |")
    lines += [
        "",
        f"TDC − baseline FID: {c.fid_difference:+.3f} (negative: TDC better) · sampling FLOPs TDC/baseline: "
        f"{_fmt_ratio(c.sampling_flops_ratio)} · training FLOPs TDC/baseline: {_fmt_ratio(c.training_flops_ratio)}",
        "",
        f"- TDC training: {c.tdc.cost.training_detail}",
        f"- baseline training: {c.baseline.cost.training_detail}",
    ]
    lines += [f"- {n}" for n in c.notes]
    return "\n".join(lines) + "\n"


_TDC_COLOUR, _BASE_COLOUR = "tab:orange", "tab:blue"


def plot_comparison(c: Comparison, path: str | Path) -> Path:
    """One PNG, three panels side by side: FID (bars = mean ± std, dots = every seed, dashed =
    real held-out), sampling GFLOPs per image (with measured ms per image), training FLOPs."""
    fig = Figure(figsize=(13.0, 4.4), layout="constrained")
    ax_fid, ax_samp, ax_train = fig.subplots(1, 3)
    rows = (c.tdc, c.baseline)
    names = [r.eval.name for r in rows]
    colours = [_TDC_COLOUR, _BASE_COLOUR]
    x = np.arange(len(rows))
    ax_fid.bar(x, [r.eval.fid_mean for r in rows], yerr=[r.eval.fid_std for r in rows], capsize=6,
               color=colours, alpha=0.55, label="mean ± std over seeds")
    for i, r in enumerate(rows):
        ax_fid.plot(np.full(len(r.eval.per_seed), i), [p.fid for p in r.eval.per_seed], "o", color="black",
                    markersize=4, label="each seed" if i == 0 else None)
    if c.real_heldout is not None:
        ax_fid.axhline(c.real_heldout.fid, color="0.3", linestyle="--", linewidth=1.2,
                       label=f"real held-out ({c.real_heldout.num_images} images)")
    ax_fid.set_xticks(x, names)
    ax_fid.set_ylabel("FID (lower is better)")
    ax_fid.set_title(f"FID, {c.setup.num_samples} samples × {len(c.setup.seeds)} seeds", fontsize=10)
    ax_fid.legend(fontsize=8)

    sampling = [r.cost.sampling_flops_per_image for r in rows]
    scale, unit = _flops_unit(max(sampling))
    bars = ax_samp.bar(x, [v / scale for v in sampling], color=colours, alpha=0.8)
    for bar, r in zip(bars, rows):
        ax_samp.annotate(f"{1e3 * r.eval.seconds_per_image:.2f} ms/image", (bar.get_x() + bar.get_width() / 2,
                         bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax_samp.set_xticks(x, names)
    ax_samp.set_ylabel(f"{unit} per image (all sampling steps)")
    ax_samp.set_title(f"Sampling cost ({c.setup.sampler}, {c.tdc.eval.sampling_steps} steps)", fontsize=10)
    ax_samp.margins(y=0.15)

    training = [r.cost.training_flops for r in rows]
    if all(v is not None for v in training):
        scale, unit = _flops_unit(max(training))  # type: ignore[type-var]
        ax_train.bar(x, [v / scale for v in training], color=colours, alpha=0.8)  # type: ignore[operator]
        ax_train.set_ylabel(f"training {unit} (total)")
    else:
        ax_train.text(0.5, 0.5, "training cost unknown", ha="center", va="center", transform=ax_train.transAxes)
    ax_train.set_xticks(x, names)
    ax_train.set_title("Training cost", fontsize=10)
    fig.suptitle(f"TDC vs baseline — {c.comparability}", fontsize=11)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# --- from a config and a run folder (the CLI's entry points) ---------------------------------


def reference_for_config(
    config: PipelineConfig, extractor: FeatureExtractor, *, batch_size: int | None = None,
) -> tuple[ReferenceStats, torch.Tensor]:
    """Reference statistics of ``config``'s training split (cached under ``eval.cache_dir``)
    and the held-out split's uint8 images ``[M x C x H x W]``."""
    train_images, heldout = prepare_data(config)
    reference = reference_statistics(
        images=train_images, fingerprint=dataset_fingerprint(config.data, train_images), extractor=extractor,
        cache_dir=resolve_cache_dir(config.eval.cache_dir), batch_size=batch_size or config.eval.batch_size,
    )
    return reference, heldout


def _image_shape(config: PipelineConfig) -> tuple[int, int, int]:
    return (config.data.channels, config.data.image_size, config.data.image_size)


def evaluate_config(
    config: PipelineConfig,
    *,
    model: Denoiser,
    name: str,
    out_dir: Path,
    setup: EvalSetup | None = None,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
) -> tuple[EvalResult, RealScore]:
    """``tdc fid``: evaluate one model as ``config`` says (extractor, reference, setup); also
    scores the real held-out split as the floor."""
    extractor = build_extractor(config.eval, config.data, device=device)
    reference, heldout = reference_for_config(config, extractor)
    setup = setup or EvalSetup.from_config(config)
    result = evaluate_model(model, Diffusion.from_config(config.diffusion), name=name, setup=setup,
                            image_shape=_image_shape(config), extractor=extractor, reference=reference,
                            device=device, out_dir=out_dir, reporter=reporter)
    return result, score_real(heldout, extractor=extractor, reference=reference, batch_size=setup.batch_size)


def default_baseline_checkpoint(layout: RunLayout) -> Path:
    """``<run>/baseline/checkpoints/last.pt``: where the pipeline's baseline task trains it."""
    return layout.baseline_checkpoint


def compare_run(
    config: PipelineConfig,
    layout: RunLayout,
    *,
    baseline_checkpoint: Path | None = None,
    out_dir: Path | None = None,
    setup: EvalSetup | None = None,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
) -> Comparison:
    """``tdc compare``: the run's routed ensemble vs the baseline checkpoint (default
    :func:`default_baseline_checkpoint`), evaluated identically; costs from the run's cost
    stage and from FlopCounterMode. Output goes to ``out_dir`` (default ``<run>/eval``).

    Raises:
        CheckpointError: group checkpoints or the baseline checkpoint are missing.
        ConfigError: the baseline was trained on other data, another image size or another
            diffusion than the run.
    """
    baseline_checkpoint = Path(baseline_checkpoint or default_baseline_checkpoint(layout))
    if not baseline_checkpoint.is_file():
        raise CheckpointError(
            f"baseline checkpoint {baseline_checkpoint} does not exist; train the single-model baseline first "
            f"(tdc run does, into {default_baseline_checkpoint(layout)}; by hand: tdc train --out-dir "
            f"{layout.root / 'baseline'} with the run's config and train.steps ≥ training.baseline_steps in "
            f"{layout.costs_json})"
        )
    device = torch.device(device)
    # First, so that missing Inception weights fail before any model is loaded or costed.
    extractor = build_extractor(config.eval, config.data, device=device)
    router = assemble_router(layout, device=device)
    base = load_model(baseline_checkpoint, device=device)
    for field in ("data", "diffusion"):
        if getattr(base.config, field) != getattr(config, field):
            raise ConfigError(
                f"baseline {baseline_checkpoint} was trained with a different {field} config than the run "
                f"{layout.root}: {getattr(base.config, field).model_dump()} vs {getattr(config, field).model_dump()}"
            )
    report = cost_stage(config, layout)
    setup = setup or EvalSetup.from_config(config)
    diffusion = Diffusion.from_config(config.diffusion)
    visited = sampling_timesteps(diffusion.respaced(setup.steps))
    expert_flops = [float(f) for f in measure_group_flops(models=list(router.experts), in_channels=config.data.channels,
                                                           image_size=config.data.image_size)]
    tdc_sampling = sampling_cost(visited_timesteps=visited, boundaries=router.boundaries, group_flops=expert_flops,
                                 base_flops=report.training.base_flops)
    base_flops = float(count_forward_flops(base.model, in_channels=config.data.channels,
                                           image_size=config.data.image_size))
    factor = report.training.backward_factor
    # docs/METHOD.md's baseline cost: steps × F × batch × (forward + backward factor).
    base_training = base.step * base_flops * base.config.train.batch_size * factor
    tr = report.training
    notes = []
    if base_training < tr.tdc_flops:
        notes.append(f"The baseline was trained with {base_training / tr.tdc_flops:.0%} of TDC's training FLOPs; "
                     f"docs/METHOD.md asks for at least 100 % ({tr.baseline_steps} steps at batch "
                     f"{tr.baseline_batch_size}).")
    if not report.budgets_met:
        notes.append("Some experts exceed their FLOPs budgets, so TDC's sampling cost is above plan.")
    tdc = Contender(name="tdc", model=router, cost=ContenderCost(
        forward_flops=expert_flops, sampling_flops_per_image=tdc_sampling.total_flops, training_flops=tr.tdc_flops,
        training_detail=(f"shared {tr.shared_steps} steps × batch {tr.batch_size} + fine-tunes {tr.finetune_steps} "
                         f"steps × batch {tr.finetune_batch_size} + pruning {_fmt_flops(tr.pruning_flops)}, "
                         f"backward factor {factor:g}"),
    ))
    baseline = Contender(name="baseline", model=base.model, cost=ContenderCost(
        forward_flops=[base_flops], sampling_flops_per_image=base_flops * len(visited), training_flops=base_training,
        training_detail=f"{base.step} steps × batch {base.config.train.batch_size} × F, backward factor {factor:g}",
    ))
    reference, heldout = reference_for_config(config, extractor, batch_size=setup.batch_size)
    return compare(tdc=tdc, baseline=baseline, diffusion=diffusion, setup=setup, image_shape=_image_shape(config),
                   extractor=extractor, reference=reference, out_dir=out_dir or layout.eval_dir, device=device,
                   heldout_images=heldout, notes=notes, reporter=reporter)
