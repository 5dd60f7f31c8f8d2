"""The comparison: TDC and the single-model baseline (and, on held-out data, any other model)
measured identically, every number with its sample size and uncertainty. Without a baseline
(``baseline=None``) TDC is scored alone: the same numbers for it, no TDC − baseline ones.

For the two contenders (same :class:`EvalSetup`: sample count, seeds, sampler, steps, hence the
same initial noise per seed):

- FID per seed (KID at ≥ 2,000 images) against the reference, and the paired bootstrap CI of the
  FID difference over all seeds' samples pooled (row i of both models from the same noise);
- the real-vs-real floor: FID of two disjoint subsets of the reference at the models' n;
- precision and recall (k-NN manifolds, k = 3) in the same features, and memorization (the share
  of samples whose nearest training image is much closer than the second nearest) with a PNG of
  samples beside their nearest training images;

and for every model, the contenders and ``others`` (the shared model):

- the held-out evaluator (:mod:`tdc_core.evaluation.heldout`): ε-MSE, x0-MSE and Min-SNR ε-MSE on
  the same stratified (image, t, ε) triples, per bucket and per group;
- bits/dim from the variational bound (:mod:`tdc_core.evaluation.likelihood`), split by group;
- paired differences (TDC − each other model) over the same held-out images, with 95 % CIs.

Writes ``comparison.md``, ``comparison.json``, ``comparison.png``, each model's sample grid,
eval JSON and nearest-neighbour PNG into ``out_dir``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tdc_core.atomic import atomic_write_bytes
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.evaluation.features import FeatureExtractor
from tdc_core.evaluation.fid import ReferenceStats
from tdc_core.evaluation.heldout import (
    HeldoutScore,
    PairedDifference,
    difference_over_images,
    heldout_triples,
    paired_difference,
    score_heldout,
)
from tdc_core.evaluation.likelihood import bits_per_dim
from tdc_core.evaluation.markdown import comparison_markdown
from tdc_core.evaluation.plots import plot_comparison
from tdc_core.evaluation.results import (
    Comparison,
    ComparisonRow,
    Contender,
    EvalSetup,
    LikelihoodScore,
    SampleQuality,
)
from tdc_core.evaluation.sample_metrics import (
    memorization,
    paired_bootstrap_fid,
    precision_recall,
    real_floor,
    save_nearest_neighbours_png,
)
from tdc_core.evaluation.scoring import Sampled, sample_and_score, score_real
from tdc_core.records import save_record
from tdc_core.reporter import NullReporter, Reporter
from tdc_core.training.data import to_model_range

__all__ = ["compare", "score_heldout_models"]

BOOTSTRAP_REPLICATES = 200
FLOOR_REPEATS = 5
PR_K = 3
HELDOUT_METRICS = ("eps_mse", "x0_mse", "eps_mse_min_snr")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(
    *,
    tdc: Contender,
    baseline: Contender | None,
    diffusion: Diffusion,
    setup: EvalSetup,
    image_shape: tuple[int, int, int],
    extractor: FeatureExtractor,
    reference: ReferenceStats,
    out_dir: Path,
    device: torch.device | str = "cpu",
    heldout_images: torch.Tensor | None = None,
    training_images: torch.Tensor | None = None,
    boundaries: Sequence[int] | None = None,
    others: Sequence[Contender] = (),
    notes: Sequence[str] = (),
    reporter: Reporter | None = None,
) -> Comparison:
    """Evaluate the contenders with the same ``setup`` and write the comparison.

    Args:
        baseline: the single model, sampled and scored exactly as TDC; None scores TDC alone (no
            FID difference, no bootstrap, no TDC − baseline held-out differences).
        heldout_images: uint8 ``[M x C x H x W]``, never trained on: the real held-out FID row, the
            held-out evaluator and bits/dim (all skipped when None).
        training_images: uint8, what the models were trained on: memorization (skipped when None).
        boundaries: the run's group edges ``[0, ..., T]`` for per-group numbers (default ``[0, T]``).
        others: models scored on held-out data only (no sampling), e.g. the shared model.
    """
    contenders = [tdc] if baseline is None else [tdc, baseline]
    names = [c.name for c in (*contenders, *others)]
    if len(set(names)) != len(names):
        raise ValueError(f"the models need different names (their files share out_dir), got {names}")
    reporter = reporter or NullReporter()
    out_dir = Path(out_dir)
    boundaries = list(boundaries) if boundaries is not None else [0, diffusion.num_steps]
    sampled = {c.name: sample_and_score(c.model, diffusion, name=c.name, setup=setup, image_shape=image_shape,
                                        extractor=extractor, reference=reference, device=device, out_dir=out_dir,
                                        reporter=reporter) for c in contenders}
    rows = {c.name: ComparisonRow(eval=sampled[c.name].result, cost=c.cost) for c in contenders}
    t, b = rows[tdc.name], (rows[baseline.name] if baseline is not None else None)
    # With the held-out split as the reference, a "real held-out" row would score the reference
    # against itself (FID ≈ 0): the real-vs-real floor below is the real images' row then.
    held_out_reference = reference.info.split == "heldout"
    real = (score_real(heldout_images, extractor=extractor, reference=reference, batch_size=setup.batch_size)
            if heldout_images is not None and not held_out_reference else None)
    fid_ci = None
    if baseline is not None:
        pooled = setup.num_samples * len(setup.seeds)
        reporter.message(f"paired bootstrap of the FID difference ({BOOTSTRAP_REPLICATES} replicates, n = {pooled})")
        fid_ci = paired_bootstrap_fid(sampled[tdc.name].features, sampled[baseline.name].features, reference.stats,
                                      n_boot=BOOTSTRAP_REPLICATES, seed=0)
    floor_n = min(setup.num_samples, reference.features.shape[0] // 2)
    floor = real_floor(reference.features, n=floor_n, repeats=FLOOR_REPEATS, seed=0) if floor_n >= 2 else None
    quality = [_sample_quality(name, s, reference=reference, training_images=training_images, out_dir=out_dir)
               for name, s in sampled.items()]
    heldout, likelihood = [], []
    if heldout_images is not None:
        models = [(c.name, c.model) for c in (tdc, *others, *contenders[1:])]
        heldout, likelihood = score_heldout_models(models, diffusion=diffusion, images=heldout_images, setup=setup,
                                                   boundaries=boundaries, device=device, reporter=reporter)
    others_for_diff = [c.name for c in (*contenders[1:], *others)]
    alone = ["TDC is evaluated alone (baseline.enabled=false): no single model was trained beside it."
             ] if b is None else []
    # TDC against the single model; all None when TDC is evaluated alone.
    versus = dict.fromkeys(("fid_difference", "sampling_flops_ratio", "training_flops_ratio")) if b is None else dict(
        fid_difference=t.eval.fid_mean - b.eval.fid_mean,
        sampling_flops_ratio=_ratio(t.cost.sampling_flops_per_image, b.cost.sampling_flops_per_image),
        training_flops_ratio=_ratio(t.cost.training_flops, b.cost.training_flops))
    comparison = Comparison(
        setup=setup, **extractor.describe(), tdc=t, baseline=b, real_heldout=real, **versus,
        notes=_notes([*alone, *notes, *(["The FID reference is the held-out split, so no real held-out row is scored "
                                 "(it would be the reference against itself); the real-vs-real floor stands in "
                                 "for it."] if held_out_reference else [])],
                     extractor=extractor, real=real, setup=setup, floor_n=floor_n),
        heldout=heldout,
        heldout_differences=[paired_difference(_by_name(heldout, tdc.name), _by_name(heldout, other), metric=m)
                             for other in others_for_diff for m in HELDOUT_METRICS] if heldout else [],
        likelihood=likelihood,
        likelihood_differences=[_bpd_difference(_by_name(likelihood, tdc.name), _by_name(likelihood, other))
                                for other in others_for_diff] if likelihood else [],
        sample_quality=quality, fid_difference_ci=fid_ci, real_floor=floor,
        markdown_path=str(out_dir / "comparison.md"), json_path=str(out_dir / "comparison.json"),
        plot_path=str(out_dir / "comparison.png"),
    )
    atomic_write_bytes(comparison.markdown_path, comparison_markdown(comparison).encode())
    save_record(comparison.json_path, comparison)
    plot_comparison(comparison, comparison.plot_path)
    return comparison


def score_heldout_models(
    models: Sequence[tuple[str, object]], *, diffusion: Diffusion, images: torch.Tensor, setup: EvalSetup,
    boundaries: Sequence[int], device: torch.device | str = "cpu", reporter: Reporter | None = None,
) -> tuple[list[HeldoutScore], list[LikelihoodScore]]:
    """Every ``(name, denoiser)`` on the same held-out triples and the same bits/dim draws."""
    reporter = reporter or NullReporter()
    triples = heldout_triples(num_images=images.shape[0], num_timesteps=diffusion.num_steps,
                              per_image=min(setup.heldout_per_image, diffusion.num_steps), seed=setup.heldout_seed)
    x0 = to_model_range(images).to(device)
    heldout, likelihood = [], []
    for i, (name, model) in enumerate(models):
        reporter.progress(step=i, total=len(models))
        heldout.append(score_heldout(model, diffusion, name=name, images=images, triples=triples,
                                     boundaries=boundaries, batch_size=setup.batch_size, device=device))
        # A fresh generator per model: every model sees the same (image, t, ε) draws.
        bpd = bits_per_dim(model, diffusion, x0, generator=torch.Generator().manual_seed(setup.heldout_seed),
                           timesteps_per_image=setup.bpd_timesteps, batch_size=setup.batch_size)
        likelihood.append(LikelihoodScore(
            name=name, bpd=bpd.bpd, bpd_se=bpd.bpd_se, prior_bpd=bpd.prior_bpd, boundaries=list(boundaries),
            group_bpd=bpd.by_groups(boundaries), timesteps_per_image=bpd.timesteps_per_image,
            num_images=bpd.num_images, per_image_bpd=bpd.per_image_bpd.tolist(),
        ))
        reporter.message(f"{name}: held-out ε-MSE {heldout[-1].eps_mse:.4f} ± {heldout[-1].eps_mse_se:.4f}, "
                         f"{bpd.bpd:.3f} ± {bpd.bpd_se:.3f} bits/dim")
    reporter.progress(step=len(models), total=len(models))
    return heldout, likelihood


def _by_name(scores: Sequence, name: str):  # noqa: ANN202 - HeldoutScore or LikelihoodScore
    return next(s for s in scores if s.name == name)


def _bpd_difference(a: LikelihoodScore, b: LikelihoodScore) -> PairedDifference:
    """TDC − other bits/dim over the same held-out images (the same draws: a paired difference)."""
    return difference_over_images(a.per_image_bpd, b.per_image_bpd, metric="bpd", a=a.name, b=b.name)


def _sample_quality(name: str, s: Sampled, *, reference: ReferenceStats, training_images: torch.Tensor | None,
                    out_dir: Path) -> SampleQuality:
    pr = precision_recall(real_features=reference.features, fake_features=s.features, k=PR_K)
    share, ratio, png = None, 1 / 3, None
    if training_images is not None:
        gen, train = to_model_range(s.first_images), to_model_range(training_images)
        mem = memorization(samples=gen, training=train)
        share, ratio = mem.share_flagged, mem.ratio
        png = str(save_nearest_neighbours_png(gen, train, mem.nearest, out_dir / f"{name}-nearest.png"))
    return SampleQuality(name=name, precision=pr.precision, recall=pr.recall, k=pr.k, num_samples=pr.n_fake,
                         num_real=pr.n_real, memorized_share=share, memorization_ratio=ratio, nearest_png=png)


def _notes(notes: Sequence[str], *, extractor: FeatureExtractor, real, setup: EvalSetup,  # noqa: ANN001
           floor_n: int) -> list[str]:
    out = list(notes)
    if extractor.kind == "digits":
        out.append(f"Scores use {extractor.label}.")
    if real is not None and real.num_images != setup.num_samples:
        out.append(f"The real held-out row scores {real.num_images} images, the models {setup.num_samples} per "
                   f"seed; FID depends on the number of images (biased upwards for small sets), so compare the "
                   f"models with the real-vs-real floor at their n instead.")
    if floor_n < setup.num_samples:
        out.append(f"The real-vs-real floor is measured at n = {floor_n}, the most the reference allows "
                   f"(two disjoint subsets), not at the models' {setup.num_samples}.")
    if setup.num_samples < 2000:
        out.append(f"KID is not reported: {setup.num_samples} images per seed is below the 2,000 at which it "
                   f"ranks models reliably.")
    return out
