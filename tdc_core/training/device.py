"""Device and precision choice: CUDA when available and asked for, never assumed."""

from __future__ import annotations

import torch

from tdc_core.errors import ConfigError

__all__ = ["autocast_dtype", "peak_memory_gib", "reset_peak_memory", "resolve_device"]


def resolve_device(preference: str = "auto") -> torch.device:
    """``auto`` → cuda if available else cpu; ``cuda`` without a GPU is a clear error."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device(preference)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32).

    ``auto`` means bf16 on CUDA and fp32 on CPU (bf16 autocast on CPU is slower there).
    """
    if precision == "fp32":
        return None
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on a CUDA device (no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak memory allocated by tensors on ``device`` since the last reset, in GiB (None off CUDA)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
