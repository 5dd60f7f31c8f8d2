"""The prune space of the IDDPM UNet: its prunable units, their legal widths and an exact model of its
FLOPs in them (docs/METHOD.md step 5). Pruning removes channels physically; which channels of a
unit go is :mod:`tdc_core.method.pruning.importance`, building the pruned model is
:mod:`tdc_core.method.pruning.surgery`.

**Units.** A *unit* is the inner width of one block, in :meth:`UNet.unit_widths` order:
every residual block's inner channels (``in_conv`` outputs = ``out_norm`` channels =
``emb_proj`` outputs, twice with scale-shift = ``out_conv`` inputs), then every attention
block's q/k/v channels. A block's input and output widths never change, so skips,
concatenations and residual sums stay consistent by construction, and a pruned model is
rebuilt from its :class:`~tdc_core.model.unet.UNetSpec` alone (``res_inner``/``attn_inner``).

**Keep ratios** are fractions of the *dense* model's widths, so proposals made in different
rounds of a progressive search compare directly. Channels cannot grow back: a ratio above a
unit's current width keeps the current width, so ``keep = 1`` everywhere returns the model
unchanged (identical outputs), pruned or not.

**Rounding** (:func:`widths_for`). Widths are multiples of a per-unit *quantum*:

* residual unit: the dense block's GroupNorm group count (``norm_groups``, or fewer for narrow
  blocks). :func:`tdc_core.model.unet.group_norm` derives the group count from the width alone, and a
  multiple of the dense group count keeps that count, so the pruned block normalises over the
  same number of groups as the dense one (channels go evenly from every group, see
  :mod:`tdc_core.method.pruning.surgery`).
* attention unit: the block's head count. The fused ``qkv`` is laid out ``(3, heads, d)``; the
  spec fixes the head count (it follows the block's outer width), so every head keeps the same
  number ``d' = width / heads`` of q/k pairs and of v channels.
* ``width_multiple`` (``prune.width_multiple``, default 8): the quantum becomes the least
  common multiple of the above and this, so pruned widths stay multiples of 8 (tensor-core
  friendly matmuls and convolutions on GPUs); a unit whose dense width is not a multiple of that
  keeps its own quantum. The search's FLOPs check sees the rounded widths, so budgets still hold.
* every unit keeps at least ``max(quantum, ceil(min_keep · dense / quantum) · quantum)``.

**FLOPs.** A unit's FLOPs (its convolutions, ``emb_proj``, ``qkv``/``proj`` and the attention
products, as counted by ``FlopCounterMode``) are exactly linear in its inner width, and units do
not interact. :func:`prune_space` therefore counts the dense model and the model one quantum
wider per unit (two counts on the ``meta`` device, no weights) and keeps the per-channel slope of
every unit; :meth:`PruneSpace.flops` then gives a candidate's FLOPs without building it, and is
checked against a third count at construction. :func:`count_spec_flops` counts any spec.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.flop_counter import FlopCounterMode

from tdc_core.model.unet import AttentionBlock, ResBlock, UNet, UNetSpec, group_norm

__all__ = [
    "PruneSpace",
    "Unit",
    "count_spec_flops",
    "dense_spec",
    "prune_space",
    "uniform_widths",
    "unit_blocks",
    "widths_for",
]

UnitKind = Literal["res", "attn"]


# --- the unit table ------------------------------------------------------------------------------


class Unit(BaseModel):
    """One prunable width: a residual block's inner channels or an attention block's q/k/v."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str                  # module path, e.g. "input_blocks.1.0"
    kind: UnitKind             # "res" or "attn"
    dense_width: int = Field(ge=1)  # inner width in the dense model
    quantum: int = Field(ge=1)      # widths are multiples of this (GroupNorm groups / heads)
    flops_per_channel: float   # forward FLOPs per image added by one inner channel


class PruneSpace(BaseModel):
    """The units of a UNet and an exact linear model of its FLOPs in their widths.

    ``flops(w) = fixed_flops + Σ_i units[i].flops_per_channel · w_i`` (FLOPs per image, as
    :func:`tdc_core.model.flops.count_forward_flops` counts them). Unit order: residual units, then
    attention units, each in module order.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    units: list[Unit]
    fixed_flops: float         # FLOPs that no unit's width changes (stem, skips, resampling...)
    min_keep: float = Field(gt=0.0, le=1.0)

    @property
    def num_res(self) -> int:
        return sum(u.kind == "res" for u in self.units)

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

    @property
    def dense_widths(self) -> np.ndarray:
        """int64 ``[U]``."""
        return np.array([u.dense_width for u in self.units], dtype=np.int64)

    @property
    def quanta(self) -> np.ndarray:
        """int64 ``[U]``."""
        return np.array([u.quantum for u in self.units], dtype=np.int64)

    @property
    def slopes(self) -> np.ndarray:
        """float64 ``[U]``: FLOPs per channel of each unit."""
        return np.array([u.flops_per_channel for u in self.units], dtype=np.float64)

    @property
    def min_widths(self) -> np.ndarray:
        """int64 ``[U]``: the narrowest width each unit may take (``min_keep``, whole quanta)."""
        return np.asarray(widths_for(keep=np.zeros(len(self.units)), dense=self.dense_widths,
                                     quanta=self.quanta, min_keep=self.min_keep), dtype=np.int64)

    @property
    def dense_flops(self) -> float:
        return self.flops(self.dense_widths)

    def flops(self, widths: Sequence[int] | np.ndarray) -> float:
        """Forward FLOPs per image of the model with these unit widths (``[U]`` or ``[M x U]``
        → float or float64 ``[M]``)."""
        w = np.asarray(widths, dtype=np.float64)
        out = self.fixed_flops + w @ self.slopes
        return float(out) if np.ndim(out) == 0 else out

    def widths(self, keep: Sequence[float] | np.ndarray) -> list[int]:
        """Unit widths for keep ratios (fractions of the dense widths), see :func:`widths_for`."""
        return widths_for(keep=keep, dense=self.dense_widths, quanta=self.quanta, min_keep=self.min_keep)

    def keep_of(self, widths: Sequence[int] | np.ndarray) -> list[float]:
        """Keep ratios (width / dense width) of unit widths."""
        return (np.asarray(widths, dtype=np.float64) / self.dense_widths).tolist()

    def split(self, widths: Sequence[int]) -> tuple[list[int], list[int]]:
        """``[U]`` widths → (residual widths, attention widths) in spec order."""
        w = [int(x) for x in widths]
        return w[: self.num_res], w[self.num_res:]


def widths_for(
    *, keep: Sequence[float] | np.ndarray, dense: Sequence[int] | np.ndarray,
    quanta: Sequence[int] | np.ndarray, min_keep: float,
) -> list[int]:
    """Round keep ratios to legal unit widths.

    ``w_i = q_i · round(keep_i · dense_i / q_i)`` (halves round up), clipped to
    ``[max(q_i, q_i · ceil(min_keep · dense_i / q_i)), dense_i]``: whole GroupNorm groups' worth
    of channels for residual units and whole heads' worth for attention units (see the module
    docstring), never below ``min_keep`` nor above the dense width.

    Args:
        keep: ``[U]`` keep ratios (fractions of ``dense``; values outside [0, 1] are clipped).
        dense: ``[U]`` dense widths, each a multiple of its quantum.
        quanta: ``[U]`` quanta.
        min_keep: smallest keep ratio of any unit, in (0, 1].

    Raises:
        ValueError: mismatched lengths, a non-finite ratio, or a dense width that is not a
            multiple of its quantum.
    """
    k = np.asarray(keep, dtype=np.float64)
    d = np.asarray(dense, dtype=np.int64)
    q = np.asarray(quanta, dtype=np.int64)
    if not (k.shape == d.shape == q.shape) or k.ndim != 1:
        raise ValueError(f"keep {k.shape}, dense {d.shape} and quanta {q.shape} must be equal-length vectors")
    if not np.isfinite(k).all():
        raise ValueError("keep ratios must be finite")
    if (q < 1).any() or (d % q).any():
        raise ValueError(
            f"every dense width must be a positive multiple of its quantum; got {d.tolist()} / {q.tolist()}"
        )
    # 1e-9: a ratio that is an exact multiple in exact arithmetic must not round up a quantum.
    lo = q * np.maximum(1, np.ceil(min_keep * d / q - 1e-9)).astype(np.int64)
    w = q * np.floor(k * d / q + 0.5).astype(np.int64)
    return np.clip(w, np.minimum(lo, d), d).astype(int).tolist()


def uniform_widths(space: PruneSpace, *, budget_flops: float, tolerance: float = 0.0) -> list[int]:
    """The widest model with one keep ratio for every unit whose FLOPs are at most
    ``budget_flops · (1 + tolerance)``: ``[U]`` widths (each unit's minimum if even that is over).

    The one-stage ablation's architecture for a budget: no trained model is needed to choose it.
    Rounding to quanta is monotone in the ratio, so a bisection on the ratio finds it.
    """
    limit = budget_flops * (1 + tolerance)
    if space.dense_flops <= limit:
        return space.dense_widths.tolist()
    lo, hi = 0.0, 1.0  # flops(widths(lo)) <= limit < flops(widths(hi)), or lo gives the minimum
    for _ in range(40):
        mid = (lo + hi) / 2
        if space.flops(space.widths([mid] * len(space.units))) <= limit:
            lo = mid
        else:
            hi = mid
    return space.widths([lo] * len(space.units))


# --- units of a model ---------------------------------------------------------------------------


def unit_blocks(model: UNet) -> tuple[list[tuple[str, ResBlock]], list[tuple[str, AttentionBlock]]]:
    """(name, block) of every residual and attention block, in :meth:`UNet.unit_widths` order."""
    res = [(n, m) for n, m in model.named_modules() if isinstance(m, ResBlock)]
    att = [(n, m) for n, m in model.named_modules() if isinstance(m, AttentionBlock)]
    return res, att


def dense_spec(spec: UNetSpec) -> UNetSpec:
    """The unpruned spec that ``spec`` was (or may be) pruned from."""
    return replace(spec, res_inner=None, attn_inner=None)


def count_spec_flops(spec: UNetSpec) -> int:
    """FLOPs per image of one forward pass of ``UNet(spec)``, counted by ``FlopCounterMode`` on the
    ``meta`` device: no weights are allocated, so any size is cheap."""
    return _count_by_module(spec)[0]


def _count_by_module(spec: UNetSpec) -> tuple[int, dict[str, int]]:
    """(total FLOPs per image, FLOPs per module path including its children) of ``UNet(spec)``."""
    with torch.device("meta"):
        model = UNet(spec)
    x = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x, t)
    root = type(model).__name__
    per_module = {
        (k[len(root) + 1:] if k.startswith(root + ".") else k): int(sum(v.values()))
        for k, v in counter.get_flop_counts().items()
    }
    return int(counter.get_total_flops()), per_module


def prune_space(spec: UNetSpec, *, min_keep: float, width_multiple: int = 1) -> PruneSpace:
    """Units of the (possibly pruned) UNet of ``spec`` with quanta and FLOPs slopes.

    ``width_multiple``: widths are also multiples of this where the dense width allows (see the
    module docstring, "Rounding").

    Counts FLOPs on the ``meta`` device three times: the dense model, the model one quantum wider
    in every unit (for each unit's slope from its own module's FLOPs) and, as a check, a mixed
    model (some units narrower).

    Raises:
        RuntimeError: the counted FLOPs are not linear in the unit widths (a UNet change broke
            the assumption the search relies on).
    """
    dense = dense_spec(spec)
    with torch.device("meta"):
        model = UNet(dense)
    res_blocks, attn_blocks = unit_blocks(model)
    groups = dense.model.norm_groups
    if isinstance(width_multiple, bool) or not isinstance(width_multiple, int) or width_multiple < 1:
        raise ValueError(f"width_multiple={width_multiple!r} must be an int >= 1")

    def quantum(width: int, own: int) -> int:
        q = math.lcm(own, width_multiple)
        return q if width % q == 0 else own

    units: list[tuple[str, UnitKind, int, int]] = []
    for name, b in res_blocks:
        w = b.in_conv.out_channels
        units.append((name, "res", w, quantum(w, group_norm(w, groups).num_groups)))
    for name, b in attn_blocks:
        units.append((name, "attn", b.proj.in_channels, quantum(b.proj.in_channels, b.num_heads)))
    widths = np.array([u[2] for u in units], dtype=np.int64)
    quanta = np.array([u[3] for u in units], dtype=np.int64)

    total_a, per_a = _count_by_module(_with_widths(dense, units, widths))
    total_b, per_b = _count_by_module(_with_widths(dense, units, widths + quanta))
    slopes = np.array([(per_b.get(n, 0) - per_a.get(n, 0)) / q for (n, *_), q in zip(units, quanta)])
    fixed = total_a - float(widths @ slopes)
    space = PruneSpace(
        units=[Unit(name=n, kind=k, dense_width=int(w), quantum=int(q), flops_per_channel=float(s))
               for (n, k, w, q), s in zip(units, slopes)],
        fixed_flops=fixed, min_keep=min_keep,
    )
    # A third, uneven point: every other unit at its minimum width.
    check = widths.copy()
    check[::2] = space.min_widths[::2]
    counted = _count_by_module(_with_widths(dense, units, check))[0]
    wider = space.flops(widths + quanta)
    if abs(space.flops(check) - counted) > 1e-6 * counted or abs(wider - total_b) > 1e-6 * total_b:
        raise RuntimeError(
            f"UNet FLOPs are not linear in the unit widths (predicted {space.flops(check):.0f}, "
            f"counted {counted}); tdc_core.method.pruning.space needs updating for the changed UNet"
        )
    return space


def _with_widths(spec: UNetSpec, units: list[tuple[str, UnitKind, int, int]], widths: np.ndarray) -> UNetSpec:
    res = [int(w) for u, w in zip(units, widths) if u[1] == "res"]
    att = [int(w) for u, w in zip(units, widths) if u[1] == "attn"]
    return replace(spec, res_inner=res, attn_inner=att)
