"""Figures of the difficulty profile, the timestep grouping and the comparison, for people to look at.

Each function renders one PNG with matplotlib's object API (:class:`~matplotlib.figure.Figure`
on a :class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`): no pyplot, no global backend
or rcParams change, so it is safe from any thread. Files are written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from tdc_core.atomic import atomic_write_bytes
from tdc_core.evaluation.results import Comparison
from tdc_core.evaluation.units import flops_unit
from tdc_core.method.grouping import Grouping
from tdc_core.method.profiling import DifficultyProfile

__all__ = ["IntervalRow", "interval_figure", "plot_comparison", "plot_grouping", "plot_intervals", "plot_profile",
           "render_png"]

_LOSS_COLOUR = "tab:blue"
_SNR_COLOUR = "tab:red"
_GROUP_SHADES = ("#fbf1d9", "#e9e9e9")  # alternating group backgrounds (pale yellow, grey)
_AFFINITY_CMAP = "RdBu_r"               # diverging: red = aligned, blue = conflicting gradients
_FIGSIZE_IN = (13.0, 5.0)
_DPI = 110


class _HasFraction(Protocol):
    fraction: float  # FLOPs budget / F of the base model


def _centres(profile: DifficultyProfile) -> np.ndarray:
    """``[B]`` float bucket centres in timesteps, ``(e_b + e_{b+1} - 1) / 2``."""
    edges = np.asarray(profile.bucket_edges, dtype=np.float64)
    return (edges[:-1] + edges[1:] - 1) / 2


def _draw_loss(ax: Axes, profile: DifficultyProfile) -> None:
    """Mean ε-MSE per bucket with a ±1 std band (clipped at 0), against the timestep."""
    a = profile.arrays()
    x = _centres(profile)
    ax.fill_between(x, np.maximum(a.loss_mean - a.loss_std, 0.0), a.loss_mean + a.loss_std,
                    color=_LOSS_COLOUR, alpha=0.18, linewidth=0, label="± 1 std over samples")
    ax.plot(x, a.loss_mean, "o-", color=_LOSS_COLOUR, markersize=3, linewidth=1.6,
            label="mean held-out ε-MSE")
    ax.set_xlim(0, profile.num_timesteps)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("timestep t (0 = clean, T = pure noise)")
    ax.set_ylabel("ε-MSE per sample (dimensionless)", color=_LOSS_COLOUR)
    ax.tick_params(axis="y", colors=_LOSS_COLOUR)
    ax.grid(alpha=0.3)


def _draw_affinity(fig: Figure, ax: Axes, profile: DifficultyProfile) -> None:
    """Heat-map of the bucket affinity with timesteps on both axes (t = 0 at the top left)."""
    edges = np.asarray(profile.bucket_edges)
    mesh = ax.pcolormesh(edges, edges, profile.arrays().affinity, cmap=_AFFINITY_CMAP,
                         vmin=-1.0, vmax=1.0, shading="flat")
    ax.set_xlim(0, profile.num_timesteps)
    ax.set_ylim(profile.num_timesteps, 0)
    ax.set_aspect("equal")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("timestep t")
    ax.set_title(
        f"Task affinity: cosine of ε-loss gradients\n"
        f"({profile.param_subset} parameters, {profile.num_params:,} values)",
        fontsize=11,
    )
    cbar = fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("cosine similarity (1 = same direction)")


def render_png(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` with Agg and write it to ``path`` atomically."""
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly; no pyplot involved
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_profile(profile: DifficultyProfile, path: str | Path) -> Path:
    """Write a PNG of the difficulty profile; returns ``path``.

    Left: mean held-out ε-MSE ± std per bucket against the timestep, with SNR in dB on a twin
    axis. Right: the B x B affinity heat-map (timesteps on both axes, colour bar in [-1, 1]).
    """
    fig = Figure(figsize=_FIGSIZE_IN, layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.35, 1.0])
    _draw_loss(left, profile)
    snr_ax = left.twinx()
    snr_ax.plot(_centres(profile), profile.snr_db, "--", color=_SNR_COLOUR, linewidth=1.4,
                label="SNR at bucket centre")
    snr_ax.set_ylabel("SNR = 10·log10(ᾱ/(1−ᾱ)) (dB)", color=_SNR_COLOUR)
    snr_ax.tick_params(axis="y", colors=_SNR_COLOUR)
    handles, labels = [], []
    for ax in (left, snr_ax):
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    left.legend(handles, labels, loc="upper right", fontsize=9)
    left.set_title(
        f"Denoising difficulty over {profile.num_buckets} timestep buckets "
        f"(probe at step {profile.model_step})", fontsize=11,
    )
    _draw_affinity(fig, right, profile)
    return render_png(fig, path)


def plot_grouping(
    profile: DifficultyProfile,
    grouping: Grouping,
    path: str | Path,
    *,
    budgets: Sequence[_HasFraction] | None = None,
) -> Path:
    """Write a PNG of the timestep groups over the profile; returns ``path``.

    Left: the loss curve with each group's interval shaded (alternating colours), boundaries as
    vertical lines and each group labelled with its difficulty rank (N = hardest) and, given
    ``budgets`` (one per group in timestep order, objects with ``.fraction``), its FLOPs
    fraction of the base model. Right: the affinity heat-map with each group's block outlined.

    Raises:
        ValueError: grouping and profile disagree on T, or ``budgets`` has the wrong length.
    """
    if grouping.num_timesteps != profile.num_timesteps:
        raise ValueError(
            f"grouping covers T={grouping.num_timesteps} timesteps but the profile T="
            f"{profile.num_timesteps}"
        )
    n = grouping.num_groups
    if budgets is not None and len(budgets) != n:
        raise ValueError(f"budgets has {len(budgets)} entries; the grouping has {n} groups")
    fig = Figure(figsize=_FIGSIZE_IN, layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.35, 1.0])
    _draw_loss(left, profile)
    label_ax = left.get_xaxis_transform()  # x in timesteps, y in axes fraction
    for g in range(n):
        lo, hi = grouping.interval(g)
        left.axvspan(lo, hi, color=_GROUP_SHADES[g % 2], zorder=0)
        if g:
            left.axvline(lo, color="0.25", linewidth=1.2, zorder=1)
        parts = [f"group {g}", f"rank {grouping.rank[g]}/{n}"]
        if budgets is not None:
            parts.append(f"{budgets[g].fraction:.2f} F")
        # A narrow group gets one rotated line so that neighbouring labels do not collide.
        narrow = (hi - lo) < 0.12 * profile.num_timesteps
        left.text((lo + hi) / 2, 0.97, (" · " if narrow else "\n").join(parts), transform=label_ax,
                  ha="center", va="top", fontsize=8 if narrow else 9, rotation=90 if narrow else 0,
                  bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "alpha": 0.8,
                        "edgecolor": "0.6"})
    left.set_ylim(top=left.get_ylim()[1] * 1.3)  # head-room for the labels
    left.legend(loc="center right", fontsize=9)
    what = "difficulty rank (N = hardest)" + (", FLOPs budget / F" if budgets is not None else "")
    left.set_title(
        f"{n} timestep groups ({grouping.cost_kind} cost, ranked by {grouping.difficulty_measure})\n"
        f"labels: {what}", fontsize=11,
    )

    _draw_affinity(fig, right, profile)
    for g in range(n):
        lo, hi = grouping.interval(g)
        right.add_patch(Rectangle((lo, lo), hi - lo, hi - lo, fill=False, edgecolor="black",
                                  linewidth=2.0))
    for b in grouping.boundaries[1:-1]:
        right.axvline(b, color="black", linewidth=0.6, linestyle=":")
        right.axhline(b, color="black", linewidth=0.6, linestyle=":")
    return render_png(fig, path)


# --- the comparison ----------------------------------------------------------------------------


_TDC_COLOUR, _BASE_COLOUR = "tab:orange", "tab:blue"


def plot_comparison(c: Comparison, path: str | Path) -> Path:
    """One PNG, four panels side by side: FID (bars = mean ± std, dots = every seed, band = the
    real-vs-real floor at the models' n), held-out ε-MSE per group relative to the baseline (same
    triples for every model), sampling GFLOPs per image (with measured ms per image), training FLOPs."""
    fig = Figure(figsize=(17.0, 4.4), layout="constrained")
    ax_fid, ax_groups, ax_samp, ax_train = fig.subplots(1, 4)
    rows = (c.tdc,) if c.baseline is None else (c.tdc, c.baseline)
    names = [r.eval.name for r in rows]
    colours = [_TDC_COLOUR, _BASE_COLOUR][:len(rows)]
    x = np.arange(len(rows))
    ax_fid.bar(x, [r.eval.fid_mean for r in rows], yerr=[r.eval.fid_std for r in rows], capsize=6,
               color=colours, alpha=0.55, label="mean ± std over seeds")
    for i, r in enumerate(rows):
        ax_fid.plot(np.full(len(r.eval.per_seed), i), [p.fid for p in r.eval.per_seed], "o", color="black",
                    markersize=4, label="each seed" if i == 0 else None)
    if c.real_floor is not None:
        f = c.real_floor
        ax_fid.axhspan(f.mean - f.sd, f.mean + f.sd, color="0.5", alpha=0.25,
                       label=f"real vs real, n = {f.n} (mean ± sd)")
    ax_fid.set_xticks(x, names)
    ax_fid.set_ylabel("FID (lower is better)")
    ax_fid.set_title(f"FID, {c.setup.num_samples} samples × {len(c.setup.seeds)} seeds", fontsize=10)
    ax_fid.legend(fontsize=8)

    _plot_group_errors(ax_groups, c)

    sampling = [r.cost.sampling_flops_per_image for r in rows]
    scale, unit = flops_unit(max(sampling))
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
        scale, unit = flops_unit(max(training))  # type: ignore[type-var]
        ax_train.bar(x, [v / scale for v in training], color=colours, alpha=0.8)  # type: ignore[operator]
        ax_train.set_ylabel(f"training {unit} (total)")
    else:
        ax_train.text(0.5, 0.5, "training cost unknown", ha="center", va="center", transform=ax_train.transAxes)
    ax_train.set_xticks(x, names)
    ax_train.set_title("Training cost", fontsize=10)
    fig.suptitle(f"{'TDC vs baseline' if c.baseline is not None else 'TDC alone (no baseline)'} — "
                 f"{c.comparability}", fontsize=11)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _plot_group_errors(ax: Axes, c: Comparison) -> None:
    """Held-out ε-MSE of each model on each group's timesteps, as a ratio to the baseline's (to
    the shared model's when TDC is evaluated alone)."""
    scores = {h.name: h for h in c.heldout}
    ref = "baseline" if "baseline" in scores else "shared"
    base = scores.get(ref)
    if base is None:
        ax.text(0.5, 0.5, "no held-out evaluation", ha="center", va="center", transform=ax.transAxes)
        return
    groups = np.arange(len(base.group_eps_mse))
    others = [n for n in scores if n != ref]
    width = 0.8 / max(len(others), 1)
    colours = {"tdc": _TDC_COLOUR, "shared": "tab:green"}
    lo, hi = 1.0, 1.0
    for i, name in enumerate(others):
        ratio = np.asarray(scores[name].group_eps_mse) / np.asarray(base.group_eps_mse)
        lo, hi = min(lo, float(np.nanmin(ratio))), max(hi, float(np.nanmax(ratio)))
        ax.bar(groups + (i - (len(others) - 1) / 2) * width, ratio, width, color=colours.get(name, "0.5"),
               alpha=0.8, label=name)
    ax.axhline(1.0, color=_BASE_COLOUR if ref == "baseline" else "tab:green", linewidth=1.5, label=ref)
    pad = 0.15 * (hi - lo) + 0.01  # zoomed on the ratios: differences of a few % must be visible
    ax.set_ylim(lo - pad, hi + pad)
    edges = base.boundaries
    ax.set_xticks(groups, [f"[{lo},{hi})" for lo, hi in zip(edges[:-1], edges[1:])], fontsize=8)
    ax.set_xlabel("timestep group")
    ax.set_ylabel(f"held-out ε-MSE / {ref}'s (below 1: better)")
    ax.set_title(f"Held-out ε-MSE by group ({base.num_images} images × {base.per_image} t)", fontsize=10)
    ax.legend(fontsize=8)


class IntervalRow(Protocol):
    label: str                 # e.g. "arm a"
    mean: float
    low: float | None          # 95 % interval; None: no interval (one seed)
    high: float | None
    values: Sequence[float]    # the per-seed values behind it


def plot_intervals(panels: Sequence[tuple[str, Sequence[IntervalRow]]], path: str | Path, *, title: str = "",
                   zero_label: str = "no difference") -> Path:
    """Write :func:`interval_figure` to ``path`` (PNG, atomically); returns ``path``."""
    return render_png(interval_figure(panels, title=title, zero_label=zero_label), path)


# interval_figure's layout, in inches: a panel's plotting width, one row's height, one character of
# a row label (8-pt tick labels), and the height of the title, the x ticks and the legend row.
_PANEL_WIDTH_IN = 4.6
_ROW_HEIGHT_IN = 0.45
_LABEL_CHAR_IN = 0.075
_TITLE_IN, _TICKS_IN, _LEGEND_ROWS = 0.9, 1.0, 1.4


def interval_figure(panels: Sequence[tuple[str, Sequence[IntervalRow]]], *, title: str = "",
                    zero_label: str = "no difference") -> Figure:
    """Forest plot, one panel per metric: each row's mean with its 95 % interval (bar) and every
    value behind it (dots), against a zero line."""
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    # Panels with the same rows name them once, left of each figure row: repeated long names
    # (contrast names) would take most of every panel's width and crowd its x tick labels.
    same_rows = len({tuple(it.label for it in items) for _, items in panels}) == 1
    label_inches = _LABEL_CHAR_IN * max(len(it.label) for _, items in panels for it in items)
    panel_rows = max(len(r) for _, r in panels) + _LEGEND_ROWS  # the legend sits above the top row
    fig = Figure(figsize=(_PANEL_WIDTH_IN * cols + (label_inches if same_rows else 0.0),
                          _TITLE_IN + (_ROW_HEIGHT_IN * panel_rows + _TICKS_IN) * rows),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for i, (ax, (name, items)) in enumerate(zip(axes, panels)):
        y = np.arange(len(items))[::-1]
        for yi, it in zip(y, items):
            ax.plot(list(it.values), np.full(len(it.values), yi), "o", color="0.45", markersize=4)
            if it.low is not None:
                ax.plot([it.low, it.high], [yi, yi], "-", color="black", linewidth=2)
            ax.plot([it.mean], [yi], "D", color="tab:orange", markersize=7)
        ax.axvline(0.0, color="tab:red", linewidth=1, linestyle="--", label=zero_label)
        ax.set_yticks(y, [it.label for it in items] if i % cols == 0 or not same_rows else [])
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # long labels (-0.0015) overlap at 5
        ax.set_title(name, fontsize=10)
        # Fixed padding, not a margin proportional to the rows: with many rows a proportional
        # margin left a third of every panel empty. The extra row on top holds the legend.
        ax.set_ylim(-0.6, len(items) + 0.4)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
