"""FLOPs of one forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode``."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_forward_flops"]


@torch.no_grad()
def count_forward_flops(model: nn.Module, *, in_channels: int, image_size: int, batch_size: int = 1) -> int:
    """FLOPs (multiply-add = 2) of ``model(x, t)`` per image, for ``x: [B x C x H x W]``.

    Counted on the model's own device with a fixed timestep; FLOPs do not depend on t.
    """
    device = next(model.parameters()).device
    x = torch.zeros(batch_size, in_channels, image_size, image_size, device=device)
    t = torch.zeros(batch_size, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x, t)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // batch_size
