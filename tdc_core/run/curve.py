"""The run's single-model curve: its dense run scored at every kept step, TDC beside it
(:mod:`tdc_core.evaluation.curves`).

The dense run is stage 1 (snapshots at 25/50/75 % of ``train.steps``, then the shared model)
continued by the baseline (snapshots at 25/50/75 % of the way beyond, then the baseline), so
one run gives the single model's quality from a quarter of stage 1 up to TDC's total training
compute. Under ``train.lr_schedule=cosine`` the baseline is a run of its own (its cosine spans
its own length), so the curve is that run alone (snapshots at 25/50/75 % of it, then the
baseline); the shared model, annealed over a shorter run, is not a point of it. Its
intermediate points are then taken mid-schedule, before the decay a run of that length would
have had, so they understate what a single model of that cost reaches.

Snapshots are scored on the comparison's held-out triples and bits/dim draws (same seed, same
images); the shared model, the baseline and TDC take their numbers from the
comparison itself. Training FLOPs follow docs/METHOD.md: steps × F × batch × backward factor.
"""

from __future__ import annotations

import torch

from tdc_core.config import PipelineConfig
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.evaluation.compare import score_heldout_models
from tdc_core.evaluation.curves import Curve, CurvePoint
from tdc_core.evaluation.heldout import HeldoutScore
from tdc_core.evaluation.results import Comparison, LikelihoodScore
from tdc_core.records import load_record
from tdc_core.reporter import Reporter
from tdc_core.run.layout import RunLayout
from tdc_core.run.stages import CostReport
from tdc_core.training.trainer import list_snapshots, load_model, prepare_data

__all__ = ["single_model_curve"]


def _point(name: str, *, kind: str, step: int | None, training_flops: float, sampling_flops: float,
           h: HeldoutScore, lk: LikelihoodScore, fid: float | None = None) -> CurvePoint:
    return CurvePoint(name=name, kind=kind, step=step, training_flops=training_flops,
                      sampling_flops_per_image=sampling_flops, bits_per_dim=lk.bpd, bits_per_dim_se=lk.bpd_se,
                      eps_mse=h.eps_mse, eps_mse_se=h.eps_mse_se, x0_mse=h.x0_mse,
                      eps_mse_min_snr=h.eps_mse_min_snr, fid=fid)


def single_model_curve(config: PipelineConfig, layout: RunLayout, comparison: Comparison, *,
                       device: torch.device | str = "cpu", reporter: Reporter | None = None) -> Curve:
    """Score the dense run's snapshots and place every point (see the module docstring).

    Raises:
        ValueError: the comparison has no held-out scores (it ran without held-out images), or
            no baseline (the curve's last point is the baseline).
    """
    if not comparison.heldout or not comparison.likelihood:
        raise ValueError("the comparison has no held-out scores: the curve needs them")
    if comparison.baseline is None:
        raise ValueError("the comparison scored TDC alone: the curve needs the baseline, its last point")
    cost = load_record(layout.costs_json, CostReport, what="cost report").training
    per_step = cost.base_flops * cost.batch_size * cost.backward_factor
    # The shared model's own step, not the steps TDC is charged for: the one-stage ablation is
    # charged stage 1 only up to the probe, but its dense run (which the baseline continues) is
    # the full shared run, and placing that model at the probe's FLOPs would misplace the curve.
    shared_step, base_step = config.train.steps, round(comparison.baseline.cost.training_flops / per_step)
    one_run = config.train.length_free  # stage 1 continued by the baseline
    snapshots = [(s, p) for s, p in list_snapshots(RunLayout(layout.stage1_root).snapshots_dir)
                 if one_run and s < shared_step]
    snapshots += [(s, p) for s, p in list_snapshots(RunLayout(layout.baseline_dir).snapshots_dir)
                  if (shared_step if one_run else 0) < s < base_step]
    _, heldout = prepare_data(config)
    models = [(f"single@{s}", load_model(p, device=device).model) for s, p in snapshots]
    diffusion = Diffusion.from_config(config.diffusion)
    boundaries = comparison.heldout[0].boundaries
    scored_h, scored_lk = score_heldout_models(models, diffusion=diffusion, images=heldout, setup=comparison.setup,
                                               boundaries=boundaries, device=device, reporter=reporter)
    h = {s.name: s for s in (*comparison.heldout, *scored_h)}
    lk = {s.name: s for s in (*comparison.likelihood, *scored_lk)}
    dense_sampling = comparison.baseline.cost.sampling_flops_per_image
    ends = [(shared_step, "shared"), (base_step, "baseline")] if one_run else [(base_step, "baseline")]
    steps = [(s, f"single@{s}") for s, _ in snapshots] + ends
    single = [_point(name, kind="single", step=s, training_flops=s * per_step, sampling_flops=dense_sampling,
                     h=h[name], lk=lk[name], fid=comparison.baseline.eval.fid_mean if name == "baseline" else None)
              for s, name in sorted(steps) if name in h and name in lk]
    tdc = _point("tdc", kind="tdc", step=None, training_flops=comparison.tdc.cost.training_flops or cost.tdc_flops,
                 sampling_flops=comparison.tdc.cost.sampling_flops_per_image, h=h["tdc"], lk=lk["tdc"],
                 fid=comparison.tdc.eval.fid_mean)
    first = comparison.heldout[0]
    return Curve(single=single, tdc=tdc, num_images=first.num_images, heldout_per_image=first.per_image,
                 bpd_timesteps=comparison.setup.bpd_timesteps)
