"""IDDPM's UNet (Nichol & Dhariwal 2021), built from its config alone. Imports only torch.

``UNet(x, t)``: ``x`` float ``[N x C x H x W]``, ``t`` int64 ``[N]`` (original timestep
indices, which the network sees multiplied by ``UNetSpec.time_scale``) → ``[N x C' x H x W]``
with C' = C (ε) or 2C (ε and the variance interpolation v, when Σ is learned).

Every residual block has an *inner* width (the channels between its two convolutions) and
every attention block an inner width (its q/k/v channels); both equal the block's width in a
dense model and are what structural pruning shrinks. They are listed in module order by
:meth:`UNet.unit_widths` and can be set through :class:`UNetSpec`, so a pruned model is rebuilt
from its spec alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tdc_core.config import ModelConfig

__all__ = ["AttentionBlock", "ResBlock", "UNet", "UNetSpec", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, *, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[N x dim]`` of timesteps ``t: [N]`` (as in IDDPM / Transformer)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count ≤ max_groups that divides ``channels``.

    Pruning makes widths arbitrary; this keeps GroupNorm valid at any width.
    """
    groups = max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise a module's parameters: residual branches start as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN → SiLU → conv(in→inner) → (+ time scale-shift) → GN → SiLU → dropout → conv(inner→out),
    plus a skip (identity or 1×1 conv). ``updown`` ∈ {None, "up", "down"} resamples inside."""

    def __init__(
        self, *, in_channels: int, inner_channels: int, out_channels: int, emb_channels: int,
        dropout: float, use_scale_shift_norm: bool, norm_groups: int, updown: str | None = None,
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.updown = updown
        self.in_norm = group_norm(in_channels, norm_groups)
        self.in_conv = nn.Conv2d(in_channels, inner_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, inner_channels * (2 if use_scale_shift_norm else 1))
        self.out_norm = group_norm(inner_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = _zero(nn.Conv2d(inner_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.updown == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.updown == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.in_norm(x))
        h = self.in_conv(self._resample(h))
        x = self._resample(x)
        e = self.emb_proj(F.silu(emb)).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over spatial positions via ``scaled_dot_product_attention``."""

    def __init__(self, *, channels: int, inner_channels: int, num_heads: int, norm_groups: int) -> None:
        super().__init__()
        if inner_channels % num_heads:
            raise ValueError(f"attention width {inner_channels} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv1d(channels, 3 * inner_channels, 1)
        self.proj = _zero(nn.Conv1d(inner_channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(n, c, h * w))  # [N, 3·inner, L]
        q, k, v = qkv.reshape(n, 3, self.num_heads, -1, h * w).permute(1, 0, 2, 4, 3).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # [N, heads, L, d]
        a = a.permute(0, 1, 3, 2).reshape(n, -1, h * w)
        return x + self.proj(a).reshape(n, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Sequential(nn.ModuleList):
    """A list of layers that all receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb)
        return x


@dataclass
class UNetSpec:
    """Everything needed to build a UNet: the model config plus data shape and, for a pruned
    model, the inner width of every residual and attention block (in module order)."""

    model: ModelConfig
    image_size: int
    in_channels: int
    learn_sigma: bool = False
    res_inner: list[int] | None = None
    attn_inner: list[int] | None = None
    # The network is conditioned on t·time_scale: 1000/T reproduces IDDPM's rescale_timesteps
    # (diffusion.rescale_timesteps); 1 feeds the raw index.
    time_scale: float = 1.0

    def to_dict(self) -> dict:
        d = {
            "model": self.model.model_dump(mode="json"), "image_size": self.image_size,
            "in_channels": self.in_channels, "learn_sigma": self.learn_sigma,
            "res_inner": self.res_inner, "attn_inner": self.attn_inner,
        }
        if self.time_scale != 1.0:  # absent at 1: specs written before the field compare equal
            d["time_scale"] = self.time_scale
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNetSpec:
        return cls(
            model=ModelConfig.model_validate(d["model"]), image_size=int(d["image_size"]),
            in_channels=int(d["in_channels"]), learn_sigma=bool(d["learn_sigma"]),
            res_inner=d.get("res_inner"), attn_inner=d.get("attn_inner"),
            time_scale=float(d.get("time_scale", 1.0)),
        )


class UNet(nn.Module):
    # One constructor in IDDPM's block order (so IDDPM's weights map one to one); splitting it
    # would scatter that order over helpers.
    def __init__(self, spec: UNetSpec) -> None:  # noqa: C901
        super().__init__()
        cfg = spec.model
        self.spec = spec
        self.in_channels = spec.in_channels
        self.out_channels = spec.in_channels * (2 if spec.learn_sigma else 1)
        ch = cfg.base_channels
        emb_ch = ch * cfg.time_embed_mult
        res_inner = iter(spec.res_inner) if spec.res_inner is not None else None
        attn_inner = iter(spec.attn_inner) if spec.attn_inner is not None else None

        def res(cin: int, cout: int, updown: str | None = None) -> ResBlock:
            inner = next(res_inner) if res_inner is not None else cout
            return ResBlock(
                in_channels=cin, inner_channels=inner, out_channels=cout, emb_channels=emb_ch,
                dropout=cfg.dropout, use_scale_shift_norm=cfg.use_scale_shift_norm,
                norm_groups=cfg.norm_groups, updown=updown,
            )

        def attn(c: int) -> AttentionBlock:
            heads = c // cfg.num_head_channels if cfg.num_head_channels else cfg.num_heads
            inner = next(attn_inner) if attn_inner is not None else c
            return AttentionBlock(channels=c, inner_channels=inner, num_heads=max(1, heads),
                                  norm_groups=cfg.norm_groups)

        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.input_blocks = nn.ModuleList([_Sequential([_Conv(spec.in_channels, ch)])])
        skip_channels = [ch]
        cur, res_px = ch, spec.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(cur, mult * ch)]
                cur = mult * ch
                if res_px in cfg.attention_resolutions:
                    layers.append(attn(cur))
                self.input_blocks.append(_Sequential(layers))
                skip_channels.append(cur)
            if level != len(cfg.channel_mult) - 1:
                down = res(cur, cur, "down") if cfg.resblock_updown else Downsample(cur)
                self.input_blocks.append(_Sequential([down]))
                skip_channels.append(cur)
                res_px //= 2
        self.middle_block = _Sequential([res(cur, cur), attn(cur), res(cur, cur)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(cur + skip_channels.pop(), mult * ch)]
                cur = mult * ch
                if res_px in cfg.attention_resolutions:
                    layers.append(attn(cur))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(cur, cur, "up") if cfg.resblock_updown else Upsample(cur))
                    res_px *= 2
                self.output_blocks.append(_Sequential(layers))
        self.out_norm = group_norm(cur, cfg.norm_groups)
        self.out_conv = _zero(nn.Conv2d(cur, self.out_channels, 3, padding=1))
        for it, name in ((res_inner, "res_inner"), (attn_inner, "attn_inner")):
            if it is not None and next(it, None) is not None:
                raise ValueError(f"UNetSpec.{name} lists more widths than the UNet has blocks")

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_in = t if self.spec.time_scale == 1.0 else t.float() * self.spec.time_scale
        emb = self.time_embed(timestep_embedding(t_in, self.spec.model.base_channels))
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h)))

    def unit_widths(self) -> tuple[list[int], list[int]]:
        """Inner widths of every residual block and every attention block, in module order."""
        res = [m.in_conv.out_channels for m in self.modules() if isinstance(m, ResBlock)]
        att = [m.proj.in_channels for m in self.modules() if isinstance(m, AttentionBlock)]
        return res, att

    @classmethod
    def from_config(cls, *, model: ModelConfig, image_size: int, in_channels: int,
                    learn_sigma: bool = False, time_scale: float = 1.0) -> UNet:
        return cls(UNetSpec(model=model, image_size=image_size, in_channels=in_channels,
                            learn_sigma=learn_sigma, time_scale=time_scale))


class _Conv(nn.Module):
    """The stem convolution; takes (and ignores) the embedding like every other layer."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)
