"""The expert-routing denoiser (docs/METHOD.md step 7): each timestep goes to its group's model.

``ExpertRouter(x, t)`` has the same interface as one UNet — ``x`` float ``[N x C x H x W]``,
``t`` int64 ``[N]`` original timestep indices → ``[N x C' x H x W]`` — so the samplers and
every other caller of a denoiser use it unchanged. Group g serves ``b_g <= t < b_{g+1}`` for
boundaries ``0 = b_0 < b_1 < ... < b_N = T``, the same convention as
:meth:`tdc_core.method.grouping.Grouping.group_of`.

Host syncs. Which expert runs depends on the values in ``t``, so the host must read them: every
call does exactly one device→host transfer, of ``N + 2`` small ints (min t, max t and the number
of samples per group), computed on ``t``'s device without any further sync. When the whole batch
falls in one group (what the samplers produce: one timestep per step) that expert is called
directly on the unchanged batch; otherwise the batch is sorted by group once, each group's
contiguous slice (sizes known from the same transfer) goes to its expert, and the outputs are
put back in the caller's order with one gather. On a CPU tensor the "transfer" is free.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from tdc_core.errors import CheckpointError
from tdc_core.training.trainer import load_model

__all__ = ["ExpertRouter", "check_boundaries", "load_router"]


def check_boundaries(boundaries: Sequence[int]) -> list[int]:
    """Validate group boundaries ``0 = b_0 < b_1 < ... < b_N = T`` (N >= 1) and return them as ints.

    Raises:
        ValueError: fewer than two entries, a non-integer, a first entry other than 0, or entries
            that do not rise strictly.
    """
    values = list(boundaries)
    if len(values) < 2:
        raise ValueError(f"boundaries={values} need at least two entries, 0 = b_0 < ... < b_N = T")
    try:
        if any(isinstance(b, bool) for b in values):
            raise TypeError
        values = [operator.index(b) for b in values]  # ints, numpy ints; not floats
    except TypeError:
        raise ValueError(f"boundaries={values} must be integers (timesteps)") from None
    if values[0] != 0:
        raise ValueError(f"boundaries={values} must start at 0")
    if any(a >= b for a, b in zip(values, values[1:])):
        raise ValueError(f"boundaries={values} must rise strictly, 0 = b_0 < b_1 < ... < b_N = T")
    return values


class ExpertRouter(nn.Module):
    """Sends each sample to the expert of its timestep's group.

    Args:
        experts: N denoisers ``(x, t) -> out``, one per group in timestep order; their outputs
            must agree in shape (apart from the batch) and dtype.
        boundaries: N+1 timesteps ``0 = b_0 < ... < b_N = T``; expert g serves ``[b_g, b_{g+1})``.

    Raises:
        ValueError: bad boundaries, or their count is not ``len(experts) + 1``.
    """

    def __init__(self, *, experts: Sequence[nn.Module], boundaries: Sequence[int]) -> None:
        super().__init__()
        bounds = check_boundaries(boundaries)
        experts = list(experts)
        if len(experts) != len(bounds) - 1:
            raise ValueError(
                f"{len(experts)} experts need {len(experts) + 1} boundaries (one interval per "
                f"expert), got {len(bounds)}: {bounds}"
            )
        self.experts = nn.ModuleList(experts)
        self._boundaries = bounds
        # Inner boundaries b_1..b_{N-1} as a buffer, so .to(device) moves them with the experts
        # and bucketize runs where t lives; not persistent: state_dict holds expert weights only.
        self.register_buffer("_inner", torch.tensor(bounds[1:-1], dtype=torch.long), persistent=False)

    @property
    def boundaries(self) -> list[int]:
        """``[N+1]`` timesteps ``0 = b_0 < ... < b_N = T`` (a copy)."""
        return list(self._boundaries)

    @property
    def num_timesteps(self) -> int:
        """T, one past the last timestep served."""
        return self._boundaries[-1]

    @property
    def num_groups(self) -> int:
        """N."""
        return len(self.experts)

    def expert_index(self, t: int) -> int:
        """Index g of the expert serving timestep ``t`` (``b_g <= t < b_{g+1}``).

        Raises:
            ValueError: ``t`` outside ``[0, T)``.
        """
        t = int(t)
        if not 0 <= t < self.num_timesteps:
            raise ValueError(f"timestep {t} outside [0, {self.num_timesteps})")
        return bisect.bisect_right(self._boundaries, t) - 1

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Route ``x: [N x C x H x W]`` at timesteps ``t: int [N]`` → ``[N x C' x H x W]``.

        Raises:
            ValueError: ``t`` is not a 1-D integer tensor with one entry per sample, or some
                entry lies outside ``[0, T)``.
        """
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape [N] = [{x.shape[0]}] to match x, got {list(t.shape)}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"t must hold integer timesteps, got dtype {t.dtype}")
        if t.shape[0] == 0:
            return self.experts[0](x, t)
        num_groups = len(self.experts)
        groups = torch.bucketize(t.long(), self._inner.to(t.device), right=True)  # [N] in 0..G-1
        counts = (groups[:, None] == torch.arange(num_groups, device=t.device)).sum(0)
        t_min, t_max = torch.aminmax(t)
        # The one host sync of the call (see the module docstring).
        stats = torch.cat([t_min.long().reshape(1), t_max.long().reshape(1), counts]).tolist()
        lo, hi, sizes = stats[0], stats[1], stats[2:]
        if lo < 0 or hi >= self.num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps}), got range [{lo}, {hi}]")
        if max(sizes) == t.shape[0]:  # one group serves the whole batch
            return self.experts[sizes.index(t.shape[0])](x, t)
        order = torch.argsort(groups, stable=True)  # samples grouped, original order kept within
        xs, ts = x[order], t[order]
        outs, start = [], 0
        for g, n in enumerate(sizes):
            if n:
                outs.append(self.experts[g](xs[start:start + n], ts[start:start + n]))
                start += n
        return torch.cat(outs)[torch.argsort(order)]

    def extra_repr(self) -> str:
        return f"boundaries={self._boundaries}"


def load_router(
    *,
    checkpoints: Sequence[str | Path],
    boundaries: Sequence[int],
    device: torch.device | str = "cpu",
    use_ema: bool = True,
) -> ExpertRouter:
    """Build the router from one checkpoint per group (in timestep order) and the boundaries.

    Each checkpoint is rebuilt alone with :func:`tdc_core.training.trainer.load_model` (its stored spec,
    so pruned widths come back). The experts' stored ``t_range`` is not checked against the
    groups: a dense shared model may serve any group.

    Raises:
        ValueError: bad boundaries or ``len(boundaries) != len(checkpoints) + 1``.
        CheckpointError: a checkpoint cannot be rebuilt; the experts disagree on input channels,
            output channels, image size or diffusion config; or ``boundaries[-1]`` is not the
            checkpoints' number of diffusion timesteps T.
    """
    bounds = check_boundaries(boundaries)
    paths = [Path(p) for p in checkpoints]
    if len(paths) != len(bounds) - 1:
        raise ValueError(
            f"{len(paths)} checkpoints need {len(paths) + 1} boundaries (one interval per "
            f"checkpoint), got {len(bounds)}: {bounds}"
        )
    loaded = [load_model(p, use_ema=use_ema, device=device) for p in paths]

    def io_shape(m) -> dict[str, int]:
        out = m.spec.in_channels * (2 if m.spec.learn_sigma else 1)
        return {"in_channels": m.spec.in_channels, "out_channels": out, "image_size": m.spec.image_size}

    ref_path, ref = paths[0], loaded[0]
    for path, m in zip(paths[1:], loaded[1:]):
        if io_shape(m) != io_shape(ref):
            raise CheckpointError(
                f"checkpoint {path} has {io_shape(m)} but {ref_path} has {io_shape(ref)}; "
                f"all experts must share input/output channels and image size"
            )
        if m.config.diffusion != ref.config.diffusion:
            raise CheckpointError(
                f"checkpoint {path} was trained with diffusion {m.config.diffusion.model_dump()} "
                f"but {ref_path} with {ref.config.diffusion.model_dump()}; all experts must share it"
            )
    num_timesteps = ref.config.diffusion.num_timesteps
    if bounds[-1] != num_timesteps:
        raise CheckpointError(
            f"boundaries end at {bounds[-1]} but the checkpoints' diffusion has T={num_timesteps} "
            f"timesteps; the last boundary must equal T"
        )
    router = ExpertRouter(experts=[m.model for m in loaded], boundaries=bounds)
    return router.to(device).eval()
