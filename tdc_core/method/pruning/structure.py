"""Structural pruning of the IDDPM UNet: channels are removed physically (docs/METHOD.md step 5).

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
  same number of groups as the dense one. Channels are removed *evenly from every group*
  (top-k by importance within each group, order kept), so each new group is a subset of an old
  group and the normalisation statistics change as little as possible.
* attention unit: the block's head count. The fused ``qkv`` is laid out ``(3, heads, d)``; the
  spec fixes the head count (it follows the block's outer width), so every head keeps the same
  number ``d' = width / heads`` of q/k pairs and of v channels. The kept q rows are rescaled by
  ``sqrt(d'/d)`` so that ``scaled_dot_product_attention``'s ``1/sqrt(d')`` temperature equals the
  dense ``1/sqrt(d)`` on the kept dimensions (the logits are exactly those of the dense model
  restricted to the kept dimensions).
* every unit keeps at least ``max(quantum, ceil(min_keep · dense / quantum) · quantum)``.

**Importance** (which channels of a unit go; how *many* go is the proxy's decision):

* ``magnitude``: residual channel c scores ``‖out_conv.weight[:, c]‖₂ · ‖(γ_c, β_c)‖₂`` (its
  outgoing weights times its GroupNorm affine; its incoming ``in_conv`` filter is normalised
  away by GroupNorm, so its norm says nothing about the channel's contribution). Attention q/k
  pair j of head h scores ``‖W_q[h,j]‖·‖W_k[h,j]‖`` (its logit contribution), v channel j scores
  ``‖W_v[h,j]‖·‖W_proj[:, h,j]‖``.
* ``taylor``: first-order Taylor estimate of the loss change when a channel is removed,
  ``Σ |w · ∂L/∂w|`` over every weight and bias tied to the channel (the DepGraph "group" of the
  channel), with L the ε-loss on the caller's batches (the group's own timesteps).

**FLOPs.** A unit's FLOPs (its convolutions, ``emb_proj``, ``qkv``/``proj`` and the attention
products, as counted by ``FlopCounterMode``) are exactly linear in its inner width, and units do
not interact. :func:`prune_space` therefore counts the dense model and the model one quantum
wider per unit (two counts on the ``meta`` device, no weights) and keeps the per-channel slope of
every unit; :meth:`PruneSpace.flops` then gives a candidate's FLOPs without building it, and is
checked against a third count at construction. :func:`count_spec_flops` counts any spec.

Why not Torch-Pruning (DepGraph)? Its dependency graph finds the residual block's coupled
layers correctly, including the ``[i, i + inner]`` scale/shift halves of ``emb_proj``, but (1)
it keeps ``GroupNorm.num_groups`` while removing channels, which leaves an invalid module unless
the width stays divisible and, when it does, can disagree with the group count the spec rebuilds
(so a reloaded checkpoint would not be the pruned model); (2) through the fused ``qkv`` reshape
``(n, 3, heads, d, L)`` and ``scaled_dot_product_attention`` it maps two removed ``proj`` inputs to
dozens of scattered ``qkv`` rows across q, k, v and heads, i.e. it cannot prune our attention
heads; (3) it edits a live module in place, whereas we need a new model that *is*
``UNet(spec)``. Inner widths are simple enough to slice directly; the tests compare our coupling
of the residual block with DepGraph's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.flop_counter import FlopCounterMode

from tdc_core.model.unet import AttentionBlock, ResBlock, UNet, UNetSpec, group_norm

__all__ = [
    "ChannelScores",
    "Importance",
    "PruneSpace",
    "Unit",
    "channel_importance",
    "count_spec_flops",
    "dense_spec",
    "prune_space",
    "prune_to_widths",
    "prune_unet",
    "unit_blocks",
    "widths_for",
]

Importance = Literal["magnitude", "taylor"]
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


def prune_space(spec: UNetSpec, *, min_keep: float) -> PruneSpace:
    """Units of the (possibly pruned) UNet of ``spec`` with quanta and FLOPs slopes.

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
    units: list[tuple[str, UnitKind, int, int]] = []
    for name, b in res_blocks:
        w = b.in_conv.out_channels
        units.append((name, "res", w, group_norm(w, groups).num_groups))
    for name, b in attn_blocks:
        units.append((name, "attn", b.proj.in_channels, b.num_heads))
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
            f"counted {counted}); tdc_core.method.pruning.structure needs updating for the changed UNet"
        )
    return space


def _with_widths(spec: UNetSpec, units: list[tuple[str, UnitKind, int, int]], widths: np.ndarray) -> UNetSpec:
    res = [int(w) for u, w in zip(units, widths) if u[1] == "res"]
    att = [int(w) for u, w in zip(units, widths) if u[1] == "attn"]
    return replace(spec, res_inner=res, attn_inner=att)


# --- importance --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelScores:
    """Importance of every inner channel of a model (higher = keep).

    ``res[i]``: float ``[w_i]`` for residual unit i; ``attn_qk[j]`` / ``attn_v[j]``: float
    ``[heads x d]`` for attention unit j (q/k pairs and v channels of each head).
    """

    kind: Importance
    res: list[torch.Tensor]
    attn_qk: list[torch.Tensor]
    attn_v: list[torch.Tensor]


def _res_channel_sum(b: ResBlock, value: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Σ of ``value(param)`` over all weights and biases tied to each inner channel, ``[w]``."""
    w = b.in_conv.out_channels
    total = value(b.in_conv.weight).flatten(1).sum(1) + value(b.out_conv.weight).transpose(0, 1).flatten(1).sum(1)
    total = total + value(b.in_conv.bias) + value(b.out_norm.weight) + value(b.out_norm.bias)
    e = value(b.emb_proj.weight).sum(1) + value(b.emb_proj.bias)
    # With scale-shift, emb_proj rows c and w + c (scale and shift) belong to channel c.
    return total + (e[:w] + e[w:] if b.use_scale_shift_norm else e)


def _qkv_rows(b: AttentionBlock, t: torch.Tensor) -> torch.Tensor:
    """A ``qkv`` weight or bias tensor ``[3·inner, ...]`` → ``[3, heads, d, rest]``."""
    return t.reshape(3, b.num_heads, -1, int(np.prod(t.shape[1:], dtype=np.int64)) if t.ndim > 1 else 1)


def _attn_channel_sum(
    b: AttentionBlock, value: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q/k pair sums, v channel sums), each ``[heads x d]``."""
    wv = _qkv_rows(b, value(b.qkv.weight)).sum(-1) + _qkv_rows(b, value(b.qkv.bias)).sum(-1)  # [3, H, d]
    proj = value(b.proj.weight).reshape(b.proj.out_channels, b.num_heads, -1).sum(0)  # [H, d]
    return wv[0] + wv[1], wv[2] + proj


def _magnitude(model: UNet) -> ChannelScores:
    res_blocks, attn_blocks = unit_blocks(model)
    res = []
    for _, b in res_blocks:
        out = b.out_conv.weight.detach().float().transpose(0, 1).flatten(1).norm(dim=1)
        affine = torch.stack([b.out_norm.weight.detach().float(), b.out_norm.bias.detach().float()]).norm(dim=0)
        res.append(out * affine)
    qk, v = [], []
    for _, b in attn_blocks:
        w = _qkv_rows(b, b.qkv.weight.detach().float()).norm(dim=-1)  # [3, H, d]
        proj = b.proj.weight.detach().float().reshape(b.proj.out_channels, b.num_heads, -1).norm(dim=0)
        qk.append(w[0] * w[1])
        v.append(w[2] * proj)
    return ChannelScores(kind="magnitude", res=res, attn_qk=qk, attn_v=v)


def channel_importance(
    model: UNet, *, importance: Importance,
    losses: Callable[[UNet], Iterable[torch.Tensor]] | None = None,
) -> ChannelScores:
    """Score every inner channel of ``model`` (see the module docstring for the formulas).

    Args:
        importance: ``magnitude`` (weights only) or ``taylor``.
        losses: for ``taylor``: called with the model, yields scalar losses (e.g. the mean ε-loss
            of one batch of the group's timesteps each); their gradients are accumulated. The
            model runs in eval mode; its ``requires_grad`` flags, ``.grad`` and mode are
            restored afterwards.

    Raises:
        ValueError: unknown ``importance``, or ``taylor`` without ``losses`` or with no batch.
    """
    if importance == "magnitude":
        return _magnitude(model)
    if importance != "taylor":
        raise ValueError(f"importance={importance!r}; allowed: magnitude, taylor")
    if losses is None:
        raise ValueError("taylor importance needs `losses` (batches of the group's timesteps)")
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    was_training = model.training
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        model.eval()
        count = 0
        with torch.enable_grad():
            for loss in losses(model):
                loss.backward()
                count += 1
        if count == 0:
            raise ValueError("taylor importance got no batches from `losses`")
        grads = {p: (p.grad if p.grad is not None else torch.zeros_like(p)).float() / count for p in params}

        def value(p: torch.Tensor) -> torch.Tensor:
            return (p.detach().float() * grads[p]).abs()

        res_blocks, attn_blocks = unit_blocks(model)
        res = [_res_channel_sum(b, value) for _, b in res_blocks]
        qk, v = zip(*[_attn_channel_sum(b, value) for _, b in attn_blocks]) if attn_blocks else ((), ())
        return ChannelScores(kind="taylor", res=res, attn_qk=list(qk), attn_v=list(v))
    finally:
        for p, (flag, grad) in zip(params, saved):
            p.grad = grad
            p.requires_grad_(flag)
        model.train(was_training)


# --- channel selection and surgery ---------------------------------------------------------------


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ascending; ties keep the lower index (deterministic)."""
    order = torch.sort(-scores.detach().float().cpu(), stable=True).indices
    return torch.sort(order[:k]).values


def _balanced_top(scores: torch.Tensor, k: int, groups: int) -> torch.Tensor:
    """Top-k kept evenly across ``groups`` contiguous channel groups (GroupNorm's groups), so each
    new group is a subset of one old group; global top-k when the counts do not divide."""
    n = scores.numel()
    if groups <= 1 or n % groups or k % groups:
        return _top(scores, k)
    size, per = n // groups, k // groups
    return torch.cat([_top(scores[g * size:(g + 1) * size], per) + g * size for g in range(groups)])


def prune_to_widths(
    model: UNet, *, res_widths: Sequence[int], attn_widths: Sequence[int], scores: ChannelScores,
) -> UNet:
    """A new, smaller UNet: every unit keeps its ``width`` most important channels.

    Weights are copied (never shared) from the kept channels; everything outside the units is
    copied unchanged, so widths equal to the current ones give bit-identical outputs. The new
    model is ``UNet(spec)`` for its own spec (the widths are recorded there), on the same device
    and dtype, in the same train/eval mode.

    Args:
        res_widths: ``[R]`` new inner width of each residual block (≤ current, > 0).
        attn_widths: ``[A]`` new inner width of each attention block (≤ current, a multiple of
            its head count).
        scores: importance of ``model``'s channels (:func:`channel_importance`).

    Raises:
        ValueError: wrong number of widths, a width above the current one or ≤ 0, or an
            attention width not divisible by the block's heads.
    """
    res_blocks, attn_blocks = unit_blocks(model)
    res_widths, attn_widths = [int(w) for w in res_widths], [int(w) for w in attn_widths]
    if len(res_widths) != len(res_blocks) or len(attn_widths) != len(attn_blocks):
        raise ValueError(
            f"got {len(res_widths)} residual and {len(attn_widths)} attention widths; the model has "
            f"{len(res_blocks)} and {len(attn_blocks)} units"
        )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for (name, b), w, s in zip(res_blocks, res_widths, scores.res):
        cur = b.in_conv.out_channels
        if not 0 < w <= cur:
            raise ValueError(f"residual unit {name}: width {w} must be in [1, {cur}]")
        if w == cur:
            continue
        idx = _balanced_top(s, w, b.out_norm.num_groups).to(b.in_conv.weight.device)
        p = f"{name}."
        for key in ("in_conv.weight", "in_conv.bias", "out_norm.weight", "out_norm.bias"):
            state[p + key] = state[p + key][idx].clone()
        emb_idx = torch.cat([idx, idx + cur]) if b.use_scale_shift_norm else idx
        for key in ("emb_proj.weight", "emb_proj.bias"):
            state[p + key] = state[p + key][emb_idx].clone()
        state[p + "out_conv.weight"] = state[p + "out_conv.weight"][:, idx].clone()
    for (name, b), w, qk_s, v_s in zip(attn_blocks, attn_widths, scores.attn_qk, scores.attn_v):
        cur, heads = b.proj.in_channels, b.num_heads
        if not 0 < w <= cur or w % heads:
            raise ValueError(f"attention unit {name}: width {w} must be a multiple of {heads} heads in [1, {cur}]")
        if w == cur:
            continue
        d, d_new = cur // heads, w // heads
        qk_idx = torch.stack([_top(qk_s[h], d_new) for h in range(heads)])  # [H, d']
        v_idx = torch.stack([_top(v_s[h], d_new) for h in range(heads)])
        p = f"{name}."
        # Keep softmax(q·k / sqrt(d)) on the kept dimensions although SDPA now divides by sqrt(d').
        q_scale = math.sqrt(d_new / d)
        for key in ("qkv.weight", "qkv.bias"):
            t = state[p + key]
            rows = t.reshape(3, heads, d, *t.shape[1:])
            pick = [torch.stack([rows[part, h][idx[h]] for h in range(heads)]) for part, idx in
                    ((0, qk_idx), (1, qk_idx), (2, v_idx))]
            pick[0] = pick[0] * q_scale
            state[p + key] = torch.stack(pick).reshape(3 * w, *t.shape[1:]).clone()
        proj = state[p + "proj.weight"]  # [C, H·d, 1]
        cols = proj.reshape(proj.shape[0], heads, d, *proj.shape[2:])
        state[p + "proj.weight"] = torch.stack([cols[:, h][:, v_idx[h]] for h in range(heads)], dim=1).reshape(
            proj.shape[0], w, *proj.shape[2:]).clone()
    spec = replace(model.spec, model=model.spec.model.model_copy(), res_inner=res_widths, attn_inner=attn_widths)
    with torch.device("meta"):
        pruned = UNet(spec)
    pruned.load_state_dict(state, strict=True, assign=True)
    return pruned.train(model.training)


def prune_unet(
    model: UNet, *, res_keep: Sequence[float], attn_keep: Sequence[float], importance: Importance = "magnitude",
    losses: Callable[[UNet], Iterable[torch.Tensor]] | None = None, min_keep: float = 1e-9,
) -> UNet:
    """Prune ``model`` to keep ratios (fractions of the dense widths) in one call.

    Widths are rounded by :func:`widths_for` and capped at the current widths, so ``1.0``
    everywhere returns an identical model. ``losses`` is needed for ``taylor`` importance (see
    :func:`channel_importance`).
    """
    dense = dense_spec(model.spec)
    with torch.device("meta"):
        ref = UNet(dense)
    res_dense, attn_dense = ref.unit_widths()
    res_q = [group_norm(w, dense.model.norm_groups).num_groups for w in res_dense]
    attn_q = [b.num_heads for _, b in unit_blocks(ref)[1]]
    if len(res_keep) != len(res_dense) or len(attn_keep) != len(attn_dense):
        raise ValueError(
            f"got {len(res_keep)} residual and {len(attn_keep)} attention keep ratios; the model has "
            f"{len(res_dense)} and {len(attn_dense)} units"
        )
    res_cur, attn_cur = model.unit_widths()
    res_w = widths_for(keep=res_keep, dense=res_dense, quanta=res_q, min_keep=min_keep) if res_dense else []
    attn_w = widths_for(keep=attn_keep, dense=attn_dense, quanta=attn_q, min_keep=min_keep) if attn_dense else []
    scores = channel_importance(model, importance=importance, losses=losses)
    return prune_to_widths(model, res_widths=[min(a, b) for a, b in zip(res_w, res_cur)],
                           attn_widths=[min(a, b) for a, b in zip(attn_w, attn_cur)], scores=scores)
