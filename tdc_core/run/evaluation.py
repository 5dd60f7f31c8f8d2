"""Evaluation from a config and a run folder: what ``tdc fid``, ``tdc compare`` and the
pipeline's evaluate stage call (:mod:`tdc_core.evaluation.compare` does the measuring)."""

from __future__ import annotations

from pathlib import Path

import torch

from tdc_core.config import PipelineConfig
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.diffusion.samplers import Denoiser, sampling_timesteps
from tdc_core.errors import CheckpointError, ConfigError
from tdc_core.evaluation.compare import compare
from tdc_core.evaluation.features import DigitsExtractor, FeatureExtractor, build_extractor, resolve_cache_dir
from tdc_core.evaluation.fid import ReferenceStats, choose_reference, reference_statistics
from tdc_core.evaluation.results import Comparison, Contender, ContenderCost, EvalResult, EvalSetup, RealScore
from tdc_core.evaluation.scoring import evaluate_model, score_real
from tdc_core.evaluation.units import fmt_flops
from tdc_core.method.costs import measure_group_flops, sampling_cost
from tdc_core.model.flops import count_forward_flops
from tdc_core.reporter import Reporter
from tdc_core.run.layout import RunLayout
from tdc_core.run.stages import assemble_router, cost_stage
from tdc_core.training.data import dataset_fingerprint
from tdc_core.training.trainer import load_model, prepare_data

__all__ = ["compare_run", "evaluate_config", "reference_for_config"]


def reference_for_config(
    config: PipelineConfig, extractor: FeatureExtractor, *, batch_size: int | None = None,
) -> tuple[ReferenceStats, torch.Tensor, torch.Tensor]:
    """Reference statistics of ``config``'s FID reference (cached under ``eval.cache_dir``), the
    held-out split's and the training split's uint8 images ``[M x C x H x W]``.

    The reference is the split ``eval.reference`` names (:func:`~tdc_core.evaluation.fid.choose_reference`;
    ``auto``: the held-out split when it holds at least ``eval.num_samples`` images, else the
    training split); ``reference.info`` states which (``split``) and how many images.

    Raises:
        ConfigError: eval.reference=heldout with too few held-out images; a digits CNN that was
            not kept off this reference (built from another config).
    """
    train_images, heldout = prepare_data(config)
    split = choose_reference(config.eval.reference, num_heldout=heldout.shape[0], num_train=train_images.shape[0],
                             num_samples=config.eval.num_samples)
    if isinstance(extractor, DigitsExtractor):
        extractor.check_reference(config.data, split)
    images = heldout if split == "heldout" else train_images
    reference = reference_statistics(
        images=images, fingerprint=dataset_fingerprint(config.data, images), extractor=extractor,
        cache_dir=resolve_cache_dir(config.eval.cache_dir), batch_size=batch_size or config.eval.batch_size,
        split=split,
    )
    return reference, heldout, train_images


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
    scores real images that are not the reference, for scale: the held-out split, or the
    training split when the held-out split is the reference."""
    extractor = build_extractor(config.eval, config.data, device=device)
    reference, heldout, train_images = reference_for_config(config, extractor)
    setup = setup or EvalSetup.from_config(config)
    result = evaluate_model(model, Diffusion.from_config(config.diffusion), name=name, setup=setup,
                            image_shape=_image_shape(config), extractor=extractor, reference=reference,
                            device=device, out_dir=out_dir, reporter=reporter)
    if reference.info.split == "heldout":
        real = score_real(train_images, extractor=extractor, reference=reference, batch_size=setup.batch_size)
        return result, real.model_copy(update={"name": "real training split"})
    return result, score_real(heldout, extractor=extractor, reference=reference, batch_size=setup.batch_size)


def compare_run(
    config: PipelineConfig,
    layout: RunLayout,
    *,
    baseline_checkpoint: Path | None,
    out_dir: Path | None = None,
    setup: EvalSetup | None = None,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
) -> Comparison:
    """``tdc compare``: the run's routed ensemble vs the single model in ``baseline_checkpoint``
    (the pipeline trains it into ``layout.baseline_checkpoint``), evaluated identically; costs
    from the run's cost stage and from FlopCounterMode. Output goes to ``out_dir`` (default
    ``<run>/eval``). With ``baseline_checkpoint=None`` the ensemble is scored alone (what a run
    with ``baseline.enabled=false`` evaluates).

    Raises:
        CheckpointError: group checkpoints or the baseline checkpoint are missing.
        ConfigError: the baseline was trained on other data, another image size or another
            diffusion than the run.
    """
    if baseline_checkpoint is not None and not Path(baseline_checkpoint).is_file():
        raise CheckpointError(
            f"baseline checkpoint {baseline_checkpoint} does not exist; train the single-model baseline first "
            f"(tdc run does, into {layout.baseline_checkpoint}; by hand: tdc train --out-dir "
            f"{layout.root / 'baseline'} with the run's config and train.steps ≥ training.baseline_steps in "
            f"{layout.costs_json})"
        )
    device = torch.device(device)
    # First, so that missing Inception weights fail before any model is loaded or costed.
    extractor = build_extractor(config.eval, config.data, device=device)
    router = assemble_router(layout, device=device)
    base = load_model(Path(baseline_checkpoint), device=device) if baseline_checkpoint is not None else None
    for field in ("data", "diffusion") if base is not None else ():
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
    factor = report.training.backward_factor
    tr = report.training
    notes = []
    baseline = None
    if base is not None:
        base_flops = float(count_forward_flops(base.model, in_channels=config.data.channels,
                                               image_size=config.data.image_size))
        # docs/METHOD.md's baseline cost: steps × F × batch × (forward + backward factor).
        base_training = base.step * base_flops * base.config.train.batch_size * factor
        baseline = Contender(name="baseline", model=base.model, cost=ContenderCost(
            forward_flops=[base_flops], sampling_flops_per_image=base_flops * len(visited),
            training_flops=base_training,
            training_detail=f"{base.step} steps × batch {base.config.train.batch_size} × F, backward factor {factor:g}",
        ))
        if base_training < tr.tdc_flops:
            notes.append(f"The baseline was trained with {base_training / tr.tdc_flops:.0%} of TDC's training "
                         f"FLOPs; docs/METHOD.md asks for at least 100 % ({tr.baseline_steps} steps at batch "
                         f"{tr.baseline_batch_size}).")
    if not report.budgets_met:
        notes.append("Some experts exceed their FLOPs budgets, so TDC's sampling cost is above plan.")
    tdc = Contender(name="tdc", model=router, cost=ContenderCost(
        forward_flops=expert_flops, sampling_flops_per_image=tdc_sampling.total_flops, training_flops=tr.tdc_flops,
        training_detail=(f"shared {tr.shared_steps} steps × batch {tr.batch_size}"
                         f"{' (imported: IDDPM published training)' if report.stage1_imported else ''}"
                         f" + fine-tunes {tr.finetune_steps} "
                         f"steps × batch {tr.finetune_batch_size} + pruning {fmt_flops(tr.pruning_flops)}, "
                         f"backward factor {factor:g}"),
    ))
    reference, heldout, train_images = reference_for_config(config, extractor, batch_size=setup.batch_size)
    # The shared model is scored on the held-out data beside them: what stage 2 changed.
    others = ([Contender(name="shared", model=load_model(layout.shared_checkpoint, device=device).model,
                         cost=ContenderCost(forward_flops=[report.training.base_flops], sampling_flops_per_image=0.0,
                                            training_flops=None, training_detail="stage 1 only"))]
              if layout.shared_checkpoint.is_file() else [])
    return compare(tdc=tdc, baseline=baseline, diffusion=diffusion, setup=setup, image_shape=_image_shape(config),
                   extractor=extractor, reference=reference, out_dir=out_dir or layout.eval_dir, device=device,
                   heldout_images=heldout, training_images=train_images, boundaries=router.boundaries,
                   others=others, notes=notes, reporter=reporter)

