"""Data-parallel training under ``torchrun``: who am I, and the few collectives training needs.

``torchrun --nproc_per_node=G -m flows.cli train ...`` starts G processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment. Each trains the same model on its own
share of every global batch (DDP all-reduces the gradients), so the global batch, and with it
every hyper-parameter, is the same as with one process. Without those variables everything
here is a no-op and training runs exactly as before: one code path for 1 and G processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tdc_core.errors import ConfigError

__all__ = ["DistInfo", "all_gather_objects", "check_gpus_for_processes", "init_distributed", "mean_across_ranks"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints and reports metrics; the others stay silent."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} must be an integer (set by torchrun)") from None


def check_gpus_for_processes(processes_per_node: int, *, visible: int | None = None) -> None:
    """Refuse, with the reason and the fix, a CUDA DDP job with more processes on a node than
    visible GPUs: each process needs a GPU of its own (NCCL cannot run two ranks on one GPU),
    and process ``LOCAL_RANK`` uses GPU ``LOCAL_RANK``, which would not exist.

    ``visible`` defaults to ``torch.cuda.device_count()`` (which honours ``CUDA_VISIBLE_DEVICES``).
    Call it before starting ``torchrun``; :func:`init_distributed` calls it in every process.
    """
    gpus = torch.cuda.device_count() if visible is None else visible
    if processes_per_node > gpus:
        raise ConfigError(
            f"a CUDA DDP job with {processes_per_node} processes per node needs {processes_per_node} GPUs, but "
            f"{gpus} {'is' if gpus == 1 else 'are'} visible; start at most {gpus} process(es) per node "
            f"(train.processes / torchrun --nproc_per_node), or run the job on CPU (train.device=cpu, gloo)")


def init_distributed(*, device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    Backend NCCL on CUDA, gloo on CPU. Each CUDA process uses GPU ``LOCAL_RANK``; a job with
    more processes per node (``LOCAL_WORLD_SIZE``) than visible GPUs is refused in every
    process, before any of them touches a GPU or waits for the others (see
    :func:`check_gpus_for_processes`). Calling it again once joined returns the same answer.
    """
    info = DistInfo(rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1),
                    local_rank=_env_int("LOCAL_RANK", 0))
    if not info.enabled:
        return info
    if device_type == "cuda":
        # torchrun sets LOCAL_WORLD_SIZE; other launchers may not: then this rank's own index
        # is the one GPU it must find.
        check_gpus_for_processes(max(_env_int("LOCAL_WORLD_SIZE", 0), info.local_rank + 1))
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


def mean_across_ranks(values: dict[str, float], *, info: DistInfo, device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (one all-reduce; identity with one process)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= info.world_size
    return dict(zip(keys, t.tolist(), strict=True))


def all_gather_objects(obj: Any, *, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` with one process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
