"""Applying unit widths to a UNet: a new, smaller model that keeps each unit's most important
channels (docs/METHOD.md step 5; units, widths and their rounding:
:mod:`tdc_core.method.pruning.space`; channel scores: :mod:`tdc_core.method.pruning.importance`).

**Channel selection.**

* residual unit: channels are removed *evenly from every GroupNorm group* (top-k by importance
  within each group, order kept), so each new group is a subset of an old group and the
  normalisation statistics change as little as possible.
* attention unit: every head keeps its ``d' = width / heads`` best q/k pairs and v channels. The
  kept q rows are rescaled by ``sqrt(d'/d)`` so that ``scaled_dot_product_attention``'s
  ``1/sqrt(d')`` temperature equals the dense ``1/sqrt(d)`` on the kept dimensions (the logits are
  exactly those of the dense model restricted to the kept dimensions).

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
from dataclasses import replace

import torch

from tdc_core.method.pruning.importance import ChannelScores, Importance, channel_importance
from tdc_core.method.pruning.space import dense_spec, unit_blocks, widths_for
from tdc_core.model.unet import UNet, group_norm

__all__ = [
    "prune_to_widths",
    "prune_unet",
]


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
