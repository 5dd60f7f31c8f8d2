"""Channel importance: which channels of a unit go when it is pruned (docs/METHOD.md step 5; how
*many* go is the proxy's decision, :mod:`tdc_core.method.pruning.proxies`; units:
:mod:`tdc_core.method.pruning.space`).

* ``magnitude``: residual channel c scores ``‖out_conv.weight[:, c]‖₂ · ‖(γ_c, β_c)‖₂`` (its
  outgoing weights times its GroupNorm affine; its incoming ``in_conv`` filter is normalised
  away by GroupNorm, so its norm says nothing about the channel's contribution). Attention q/k
  pair j of head h scores ``‖W_q[h,j]‖·‖W_k[h,j]‖`` (its logit contribution), v channel j scores
  ``‖W_v[h,j]‖·‖W_proj[:, h,j]‖``.
* ``taylor``: first-order Taylor estimate of the loss change when a channel is removed,
  ``Σ |w · ∂L/∂w|`` over every weight and bias tied to the channel (the DepGraph "group" of the
  channel), with L the ε-loss on the caller's batches (the group's own timesteps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from tdc_core.method.pruning.space import unit_blocks
from tdc_core.model.unet import AttentionBlock, ResBlock, UNet

__all__ = [
    "ChannelScores",
    "Importance",
    "channel_importance",
]

Importance = Literal["magnitude", "taylor"]


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
