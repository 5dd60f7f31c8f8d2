"""The single model's quality against its training compute, with TDC's point beside it.

One dense run (stage 1, then the baseline continuing it) is scored at several steps on the way
(EMA snapshots), on the same held-out triples and bits/dim draws as every other model of the
run (:func:`tdc_core.evaluation.compare.score_heldout_models`). TDC's ensemble sits at its own
training FLOPs: below the curve at equal compute means TDC buys quality a single model does
not; on the curve, that the extra compute alone explains it; above it, that it loses.

Plot: :func:`plot_curve` (bits/dim and ε-MSE vs training FLOPs, bits/dim vs sampling FLOPs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict

from tdc_core.evaluation.plots import render_png
from tdc_core.evaluation.units import flops_unit

__all__ = ["Curve", "CurvePoint", "plot_curve", "plot_curves"]

_TDC_COLOUR, _SINGLE_COLOUR = "tab:orange", "tab:blue"


class CurvePoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str                          # "single@<step>", "shared", "baseline" or "tdc"
    kind: Literal["single", "tdc"]
    step: int | None                   # optimizer steps of a single-model point
    training_flops: float              # total training FLOPs spent to reach it
    sampling_flops_per_image: float    # all sampling steps, one image
    bits_per_dim: float
    bits_per_dim_se: float
    eps_mse: float                     # held-out ε-MSE, uniform over t
    eps_mse_se: float
    x0_mse: float
    eps_mse_min_snr: float
    fid: float | None = None           # only where the comparison sampled it (baseline, TDC)


class Curve(BaseModel):
    """Single-model points in training order, and TDC's point; every number on one held-out set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    single: list[CurvePoint]
    tdc: CurvePoint
    num_images: int                    # held-out images behind every point
    heldout_per_image: int
    bpd_timesteps: int | None

    def matching_flops(self, metric: str = "bits_per_dim") -> float | None:
        """The training FLOPs at which the single model first reaches TDC's ``metric`` (lower is
        better), linear between its points: what TDC's quality costs a single model. None when
        the single model never gets there (TDC is better than its last point) or starts below it.
        """
        target = getattr(self.tdc, metric)
        pts = [(p.training_flops, getattr(p, metric)) for p in self.single]
        if not pts or pts[0][1] <= target:
            return None
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if y1 <= target:
                return x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
        return None

    def single_at(self, training_flops: float) -> CurvePoint | None:
        """The single-model point with the fewest training FLOPs at least ``training_flops``."""
        above = [p for p in self.single if p.training_flops >= training_flops]
        return min(above, key=lambda p: p.training_flops) if above else None


def plot_curve(curve: Curve, path: str | Path, *, title: str = "") -> Path:
    """Three panels: bits/dim vs training FLOPs, held-out ε-MSE vs training FLOPs (single model:
    a line through its snapshots; TDC: a star), and bits/dim vs sampling FLOPs per image.

    No error bars: every point is scored on the same held-out draws, so the spread between
    images (large) says nothing about the differences between points, which are paired; their
    intervals are in the comparison (``comparison.md``)."""
    fig = Figure(figsize=(15.0, 4.4), layout="constrained")
    ax_bpd, ax_eps, ax_samp = fig.subplots(1, 3)
    xs = [p.training_flops for p in curve.single] + [curve.tdc.training_flops]
    scale, unit = flops_unit(max(xs))
    for ax, metric, label in ((ax_bpd, "bits_per_dim", "held-out bits/dim"),
                              (ax_eps, "eps_mse", "held-out ε-MSE (uniform t)")):
        x = [p.training_flops / scale for p in curve.single]
        y = [getattr(p, metric) for p in curve.single]
        ax.plot(x, y, "o-", color=_SINGLE_COLOUR, label="single model (snapshots of one run)")
        for p, xi, yi in zip(curve.single, x, y):
            if p.name in ("shared", "baseline"):
                ax.annotate(p.name, (xi, yi), textcoords="offset points", xytext=(4, 6), fontsize=8)
        t = curve.tdc
        ax.plot([t.training_flops / scale], [getattr(t, metric)], "*", color=_TDC_COLOUR, markersize=15,
                markeredgecolor="black", label="TDC")
        ax.set_xlabel(f"training {unit} (total)")
        ax.set_ylabel(f"{label} (lower is better)")
        ax.legend(fontsize=8)
        _zoom(ax, [[(p.training_flops, getattr(p, metric)) for p in (*curve.single, curve.tdc)]])
    ax_bpd.set_title("Quality vs training compute", fontsize=10)
    ax_eps.set_title(f"same {curve.num_images} held-out images × {curve.heldout_per_image} timesteps for every point",
                     fontsize=10)
    s_scale, s_unit = flops_unit(max(p.sampling_flops_per_image for p in (*curve.single, curve.tdc)))
    final = curve.single[-1]
    ax_samp.plot([final.sampling_flops_per_image / s_scale], [final.bits_per_dim], "o", color=_SINGLE_COLOUR,
                 markersize=8, label=f"single model ({final.name})")
    ax_samp.plot([curve.tdc.sampling_flops_per_image / s_scale], [curve.tdc.bits_per_dim], "*", color=_TDC_COLOUR,
                 markersize=15, markeredgecolor="black", label="TDC")
    ax_samp.set_xlabel(f"sampling {s_unit} per image")
    ax_samp.set_ylabel("held-out bits/dim (lower is better)")
    ax_samp.set_title("Quality vs sampling compute", fontsize=10)
    ax_samp.margins(x=0.3, y=0.3)
    ax_samp.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return render_png(fig, path)


def _zoom(ax: Axes, runs: Sequence[Sequence[tuple[float, float]]]) -> None:
    """Limit the y axis to each run's points in the second half of its own compute (where its
    TDC sits): the early snapshots are far worse and would flatten the part that matters; say so
    when any point is left above. Per run, so that arms of very different lengths (a stage 1 of
    1,200 vs 4,800 steps) all keep their ends in view."""
    ys = [y for run in runs for x, y in run if x >= max(x for x, _ in run) / 2]
    lo, hi = min(ys), max(ys)
    pad = 0.15 * (hi - lo or abs(hi) or 1.0)
    ax.set_ylim(lo - pad, hi + pad)
    if any(y > hi + pad for run in runs for _, y in run):
        ax.text(0.02, 0.98, "zoomed: earlier snapshots above", transform=ax.transAxes, fontsize=8, va="top",
                color="0.35")


_ARM_COLOURS = ("tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:red")


def plot_curves(curves: Mapping[str, Sequence[Curve]], path: str | Path, *, title: str = "") -> Path:
    """Every replicate of every arm (a study): bits/dim vs training FLOPs and vs sampling FLOPs.
    One colour per arm; thin lines = each training seed's single model along its run, stars = its
    TDC, so TDC's points sit against the single model's curves at every seed."""
    fig = Figure(figsize=(12.0, 4.6), layout="constrained")
    ax_train, ax_samp = fig.subplots(1, 2)
    every = [c for cs in curves.values() for c in cs]
    scale, unit = flops_unit(max(p.training_flops for c in every for p in (*c.single, c.tdc)))
    s_scale, s_unit = flops_unit(max(p.sampling_flops_per_image for c in every for p in (*c.single, c.tdc)))
    for i, (arm, cs) in enumerate(curves.items()):
        colour = _ARM_COLOURS[i % len(_ARM_COLOURS)]
        for j, c in enumerate(cs):
            ax_train.plot([p.training_flops / scale for p in c.single], [p.bits_per_dim for p in c.single], "o-",
                          color=colour, alpha=0.45, markersize=3, linewidth=1,
                          label=f"{arm}: single model, each seed" if j == 0 else None)
            ax_train.plot([c.tdc.training_flops / scale], [c.tdc.bits_per_dim], "*", color=colour, markersize=13,
                          markeredgecolor="black", label=f"{arm}: TDC, each seed" if j == 0 else None)
            last = c.single[-1]
            ax_samp.plot([last.sampling_flops_per_image / s_scale], [last.bits_per_dim], "o", color=colour,
                         alpha=0.6, label=f"{arm}: single model (end)" if j == 0 else None)
            ax_samp.plot([c.tdc.sampling_flops_per_image / s_scale], [c.tdc.bits_per_dim], "*", color=colour,
                         markersize=13, markeredgecolor="black", label=f"{arm}: TDC" if j == 0 else None)
    _zoom(ax_train, [[(p.training_flops, p.bits_per_dim) for p in (*c.single, c.tdc)] for c in every])
    ax_train.set_xlabel(f"training {unit} (total)")
    ax_train.set_ylabel("held-out bits/dim (lower is better)")
    ax_train.set_title("Quality vs training compute", fontsize=10)
    ax_samp.set_xlabel(f"sampling {s_unit} per image")
    ax_samp.set_ylabel("held-out bits/dim")
    ax_samp.set_title("Quality vs sampling compute", fontsize=10)
    ax_samp.margins(x=0.3)
    for ax in (ax_train, ax_samp):
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return render_png(fig, path)
