"""Sampling a model and scoring its samples: FID per seed (KID at ≥ 2,000 images), timing, grids.

:func:`sample_and_score` generates ``setup.num_samples`` images per seed from any denoiser (a UNet
or the routed ensemble) with the seeded batched loop of :func:`tdc_core.diffusion.samplers.generate`
(the same seed starts every model from the same noise), scores each seed against cached reference
statistics, and keeps the features and first images for the metrics of
:mod:`tdc_core.evaluation.sample_metrics`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.diffusion.samplers import Denoiser, generate
from tdc_core.evaluation.features import FeatureExtractor
from tdc_core.evaluation.fid import ReferenceStats, score_features
from tdc_core.evaluation.grids import save_grid
from tdc_core.evaluation.results import EvalResult, EvalSetup, RealScore, SeedScore
from tdc_core.evaluation.sample_metrics import kid_allowed
from tdc_core.records import save_record
from tdc_core.reporter import NullReporter, Reporter

__all__ = ["GRID_IMAGES", "Sampled", "evaluate_model", "sample_and_score", "score_real"]


GRID_IMAGES = 64  # samples shown in each model's PNG grid


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Sampled:
    """An :func:`evaluate_model` result with what later metrics need: the features of every
    seed's samples (in seed order, so row i of two models comes from the same initial noise)
    and the first seed's images."""

    result: EvalResult
    features: np.ndarray                     # [seeds · num_samples x D]
    first_images: torch.Tensor               # uint8 [num_samples x C x H x W]


def evaluate_model(model: Denoiser, diffusion: Diffusion, *, name: str, setup: EvalSetup,
                   image_shape: tuple[int, int, int], extractor: FeatureExtractor, reference: ReferenceStats,
                   device: torch.device | str = "cpu", out_dir: Path | None = None,
                   reporter: Reporter | None = None) -> EvalResult:
    """FID (and KID at ≥ 2,000 images) of a model for every seed: :func:`sample_and_score`'s scores."""
    return sample_and_score(model, diffusion, name=name, setup=setup, image_shape=image_shape, extractor=extractor,
                            reference=reference, device=device, out_dir=out_dir, reporter=reporter).result


def sample_and_score(
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
) -> Sampled:
    """FID of ``model`` for every seed of ``setup`` against ``reference``; KID too when a seed
    has at least ``KID_MIN_SAMPLES`` images (below that it flips rankings between draws).

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
    per_seed, grid, features, first = [], None, [], None
    reporter.progress(step=0, total=len(setup.seeds))
    for seed in setup.seeds:
        _sync(device)
        t0 = time.perf_counter()
        images = generate(model, respaced, num=setup.num_samples, seed=seed, batch_size=setup.batch_size,
                          image_shape=image_shape, sampler=setup.sampler, eta=setup.eta, device=device)
        _sync(device)
        seconds = time.perf_counter() - t0
        if first is None:
            first = images
            if out_dir is not None:
                grid = save_grid(Path(out_dir) / f"{name}-samples.png", images[:GRID_IMAGES])
        feats = extractor.features(images, batch_size=setup.batch_size)
        features.append(feats)
        fid, kid = score_features(feats, reference, kid_seed=seed)
        kid = kid if kid_allowed(setup.num_samples) else None
        per_seed.append(SeedScore(seed=seed, fid=fid, kid=kid, sampling_seconds=seconds))
        reporter.message(f"{name} seed {seed}: FID {fid:.3f}" + (f", KID {kid:.5f}" if kid is not None else "")
                         + f" ({seconds:.1f} s sampling)")
        reporter.progress(step=len(per_seed), total=len(setup.seeds))
    fids, kids = [s.fid for s in per_seed], [s.kid for s in per_seed if s.kid is not None]
    result = EvalResult(
        name=name, fid_mean=float(np.mean(fids)), fid_std=_std(fids), kid_mean=float(np.mean(kids)) if kids else None,
        kid_std=_std(kids) if kids else None, per_seed=per_seed, num_samples=setup.num_samples, sampler=setup.sampler,
        sampling_steps=respaced.num_steps, eta=setup.eta,
        seconds_per_image=float(np.mean([s.sampling_seconds for s in per_seed])) / setup.num_samples,
        device=str(device), **extractor.describe(), reference=reference.info,
        grid_png=str(grid) if grid is not None else None,
    )
    if out_dir is not None:
        save_record(Path(out_dir) / f"{name}-eval.json", result)
    return Sampled(result=result, features=np.concatenate(features), first_images=first)


def score_real(images: torch.Tensor, *, extractor: FeatureExtractor, reference: ReferenceStats,
               batch_size: int = 250) -> RealScore:
    """FID/KID of real uint8 images ``[N x C x H x W]`` (e.g. the held-out split) vs ``reference``."""
    fid, kid = score_features(extractor.features(images, batch_size=batch_size), reference)
    n = int(images.shape[0])
    return RealScore(fid=fid, kid=kid if kid_allowed(n) else None, num_images=n, **extractor.describe())

