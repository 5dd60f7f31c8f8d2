"""The single model's quality against its training compute, with TDC's point beside it.

One dense run (stage 1, then the baseline continuing it) is scored at several steps on the way
(EMA snapshots), on the same held-out triples and bits/dim draws as every other model of the
run (:func:`tdc_core.evaluation.compare.score_heldout_models`). TDC's ensemble sits at its own
training FLOPs: below the curve at equal compute means TDC buys quality a single model does
not; on the curve, that the extra compute alone explains it; above it, that it loses.

Plot: :func:`plot_curve` (bits/dim and ε-MSE vs training FLOPs, bits/dim vs sampling FLOPs).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict

from tdc_core.atomic import atomic_write_bytes
from tdc_core.evaluation.units import flops_unit

__all__ = ["Curve", "CurvePoint", "plot_curve"]

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

    def single_at(self, training_flops: float) -> CurvePoint | None:
        """The single-model point with the fewest training FLOPs at least ``training_flops``."""
        above = [p for p in self.single if p.training_flops >= training_flops]
        return min(above, key=lambda p: p.training_flops) if above else None


def plot_curve(curve: Curve, path: str | Path, *, title: str = "") -> Path:
    """Three panels: bits/dim vs training FLOPs, held-out ε-MSE vs training FLOPs (single model:
    line through its snapshots, bars ±1.96 SE over held-out images; TDC: a star), and bits/dim vs
    sampling FLOPs per image."""
    fig = Figure(figsize=(15.0, 4.4), layout="constrained")
    ax_bpd, ax_eps, ax_samp = fig.subplots(1, 3)
    xs = [p.training_flops for p in curve.single] + [curve.tdc.training_flops]
    scale, unit = flops_unit(max(xs))
    for ax, (metric, se, label) in ((ax_bpd, ("bits_per_dim", "bits_per_dim_se", "held-out bits/dim")),
                                    (ax_eps, ("eps_mse", "eps_mse_se", "held-out ε-MSE (uniform t)"))):
        x = np.array([p.training_flops for p in curve.single]) / scale
        y = np.array([getattr(p, metric) for p in curve.single])
        e = 1.96 * np.array([getattr(p, se) for p in curve.single])
        ax.errorbar(x, y, yerr=e, fmt="o-", color=_SINGLE_COLOUR, capsize=3, label="single model (snapshots)")
        for p, xi, yi in zip(curve.single, x, y):
            if p.name in ("shared", "baseline"):
                ax.annotate(p.name, (xi, yi), textcoords="offset points", xytext=(4, 6), fontsize=8)
        t = curve.tdc
        ax.errorbar([t.training_flops / scale], [getattr(t, metric)], yerr=[1.96 * getattr(t, se)], fmt="*",
                    color=_TDC_COLOUR, markersize=14, capsize=3, label="TDC")
        ax.set_xlabel(f"training {unit} (total)")
        ax.set_ylabel(f"{label} (lower is better)")
        ax.legend(fontsize=8)
    ax_bpd.set_title("Quality vs training compute", fontsize=10)
    ax_eps.set_title(f"{curve.num_images} held-out images × {curve.heldout_per_image} timesteps", fontsize=10)
    s_scale, s_unit = flops_unit(max(p.sampling_flops_per_image for p in (*curve.single, curve.tdc)))
    final = curve.single[-1]
    for p, colour, marker in ((final, _SINGLE_COLOUR, "o"), (curve.tdc, _TDC_COLOUR, "*")):
        ax_samp.errorbar([p.sampling_flops_per_image / s_scale], [p.bits_per_dim], yerr=[1.96 * p.bits_per_dim_se],
                         fmt=marker, color=colour, markersize=12 if marker == "*" else 7, capsize=3,
                         label="TDC" if p is curve.tdc else f"single model ({p.name})")
    ax_samp.set_xlabel(f"sampling {s_unit} per image")
    ax_samp.set_ylabel("held-out bits/dim")
    ax_samp.set_title("Quality vs sampling compute", fontsize=10)
    ax_samp.margins(x=0.3)
    ax_samp.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
