"""openai/improved-diffusion's parameter names ↔ ours, for the UNet of :mod:`tdc_core.model.unet`.

Our UNet is IDDPM's function with its own module names (``in_norm`` for ``in_layers.0``, ...), so a
released IDDPM checkpoint (``cifar10_uncond_50M_500K.pt``, ``imagenet64_uncond_100M_1500K.pt``, a
plain ``state_dict``) becomes ours by renaming every key and permuting one tensor pair per
attention block:

* IDDPM's ``qkv`` 1×1 convolution emits its ``3·C`` channels as (head, q/k/v, d) — it reshapes to
  ``[N·heads, 3·d, L]`` and splits — while ours emits (q/k/v, head, d); the rows of ``qkv.weight``
  ``[3C x C x 1]`` and ``qkv.bias`` ``[3C]`` are permuted accordingly (:func:`_regroup_qkv`).

Everything else (timestep embedding, GroupNorm of 32 groups, scale-shift norm, 1/√d attention
scale, nearest upsampling, strided-conv downsampling) computes the same, so equal weights give
equal outputs (``tests/test_iddpm_import.py`` checks the round trip; IDDPM's code itself is not a
dependency). The head count is not visible in a state dict's shapes: it comes from the config
(``model.num_heads``, 4 in IDDPM's released unconditional models).

Imports only torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from tdc_core.errors import CheckpointError
from tdc_core.model.unet import AttentionBlock, Downsample, ResBlock, UNet, Upsample, _Conv

__all__ = ["from_iddpm_state_dict", "iddpm_names", "to_iddpm_state_dict"]

# Our child module name → IDDPM's, per parent module type.
_RES = {"in_norm": "in_layers.0", "in_conv": "in_layers.2", "emb_proj": "emb_layers.1",
        "out_norm": "out_layers.0", "out_conv": "out_layers.3", "skip": "skip_connection"}
_ATTN = {"norm": "norm", "qkv": "qkv", "proj": "proj_out"}
_TOP = {"out_norm": "out.0", "out_conv": "out.2"}


def iddpm_names(model: UNet) -> dict[str, str]:
    """Every key of ``model.state_dict()`` → the key IDDPM's ``UNetModel`` gives the same tensor,
    in our module order."""
    modules = dict(model.named_modules())
    names: dict[str, str] = {}
    for key in model.state_dict():
        names[key] = _iddpm_key(key, modules)
    return names


def _iddpm_key(key: str, modules: Mapping[str, nn.Module]) -> str:
    parts = key.split(".")
    if parts[0] in _TOP:
        return ".".join([_TOP[parts[0]], *parts[1:]])
    if parts[0] == "time_embed":
        return key
    owner, child, leaf = ".".join(parts[:-2]), parts[-2], parts[-1]
    module = modules.get(owner)
    if isinstance(module, ResBlock):
        return f"{owner}.{_RES[child]}.{leaf}"
    if isinstance(module, AttentionBlock):
        return f"{owner}.{_ATTN[child]}.{leaf}"
    if isinstance(module, Downsample):
        return f"{owner}.op.{leaf}"
    if isinstance(module, _Conv):  # IDDPM's stem is the bare conv
        return f"{owner}.{leaf}"
    if isinstance(module, Upsample):  # the same name: Upsample.conv
        return key
    raise KeyError(f"no IDDPM name for parameter {key}")  # a module type added without a mapping


def _attention_heads(model: UNet) -> dict[str, int]:
    """IDDPM key prefix of every attention block's ``qkv`` → its head count."""
    return {f"{name}.qkv": m.num_heads
            for name, m in model.named_modules() if isinstance(m, AttentionBlock)}


def _regroup_qkv(t: torch.Tensor, outer: int, inner_groups: int) -> torch.Tensor:
    """Rows of a qkv tensor ``[3·W (x C x 1)]`` ordered (outer, inner_groups, d) → (inner_groups,
    outer, d). IDDPM → ours: ``(heads, 3)``; ours → IDDPM: ``(3, heads)``."""
    rest = t.shape[1:]
    return t.reshape(outer, inner_groups, -1, *rest).transpose(0, 1).reshape(t.shape)


def to_iddpm_state_dict(model: UNet) -> dict[str, torch.Tensor]:
    """``model``'s weights under IDDPM's names and channel order (what IDDPM's ``UNetModel`` of the
    same settings would load): the inverse of :func:`from_iddpm_state_dict`."""
    heads = _attention_heads(model)
    ours_sd = model.state_dict()
    out = {}
    for ours, theirs in iddpm_names(model).items():
        t = ours_sd[ours].detach().clone()
        owner = theirs.rsplit(".", 1)[0]
        out[theirs] = _regroup_qkv(t, 3, heads[owner]) if owner in heads else t
    return out


def from_iddpm_state_dict(state: Mapping[str, torch.Tensor], *, model: UNet,
                          source: str = "IDDPM checkpoint") -> dict[str, torch.Tensor]:
    """An IDDPM ``state_dict`` → ``model``'s ``state_dict`` (float32, our names and qkv order).

    Every key and shape must be accounted for in both directions.

    Raises:
        CheckpointError: one line naming the first mismatch in model order (a key the model needs
            and the checkpoint lacks, a key the checkpoint has and the model lacks, or a shape) and
            the config field that sets that part of the architecture.
    """
    names = iddpm_names(model)
    if any(k.startswith("label_emb.") for k in state):
        raise CheckpointError(f"{source} is a class-conditional model (it has label_emb); TDC trains "
                              f"unconditional models: use an unconditional checkpoint such as "
                              f"cifar10_uncond_50M_500K.pt or imagenet64_uncond_100M_1500K.pt")
    ours_sd = model.state_dict()
    heads = _attention_heads(model)
    problems: list[str] = []
    converted: dict[str, torch.Tensor] = {}
    for ours, theirs in names.items():
        want = ours_sd[ours].shape
        if theirs not in state:
            problems.append(f"the model needs {theirs} {list(want)}, which the checkpoint lacks; "
                            f"{_field_for(theirs, kind='missing')}")
            continue
        t = state[theirs]
        if not isinstance(t, torch.Tensor) or t.shape != want:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            problems.append(f"{theirs} is {got} in the checkpoint and {list(want)} in the model; "
                            f"{_field_for(theirs, kind='shape', got=t, want=want)}")
            continue
        owner = theirs.rsplit(".", 1)[0]
        t = t.detach().to(torch.float32)
        converted[ours] = _regroup_qkv(t, heads[owner], 3).contiguous() if owner in heads else t
    expected = set(names.values())
    problems += [f"the checkpoint has {k}, which the model lacks; {_field_for(k, kind='extra')}"
                 for k in state if k not in expected]
    if problems:
        more = f" ({len(problems) - 1} more mismatch(es))" if len(problems) > 1 else ""
        raise CheckpointError(f"{source} does not fit the configured model: {problems[0]}{more}")
    return converted


def _field_for(key: str, *, kind: str, got: object = None, want: torch.Size | None = None) -> str:
    """The config field that sets the part of the architecture ``key`` belongs to."""
    if key.startswith("out.2.") and kind == "shape" and isinstance(got, torch.Tensor) and want is not None:
        if got.shape[0] == 2 * want[0]:
            return "set diffusion.loss=hybrid (a learned-variance model has 2 x data.channels outputs)"
        if 2 * got.shape[0] == want[0]:
            return "set diffusion.loss=eps_mse (the checkpoint predicts no variance)"
        return "set data.channels to the checkpoint's image channels"
    if key.startswith("input_blocks.0.0.") and kind == "shape" and isinstance(got, torch.Tensor) \
            and want is not None and got.ndim == 4 and got.shape[1] != want[1]:
        return "set data.channels to the checkpoint's image channels"
    if key.startswith("time_embed."):
        return "set model.base_channels (and model.time_embed_mult) to the checkpoint's"
    if ".emb_layers." in key and kind == "shape":
        return "check model.use_scale_shift_norm (it doubles emb_layers) and model.base_channels"
    if any(f".{part}." in key for part in ("qkv", "proj_out")) or (key.endswith((".norm.weight", ".norm.bias"))):
        return "set model.attention_resolutions to the checkpoint's (and model.base_channels, model.channel_mult)"
    return ("set model.channel_mult, model.num_res_blocks and model.base_channels to the checkpoint's "
            "(or use the preset it was trained with)")
