"""FLOPs in readable units (one multiply-add = 2 FLOPs)."""

from __future__ import annotations

__all__ = ["flops_unit", "fmt_flops"]

_FLOP_UNITS = ((1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1.0, "FLOP"))


def flops_unit(x: float) -> tuple[float, str]:
    """The largest unit in which ``x`` FLOPs is at least 1: ``(scale, name)``."""
    return next(((s, u) for s, u in _FLOP_UNITS if abs(x) >= s), _FLOP_UNITS[-1])


def fmt_flops(x: float | None) -> str:
    if x is None:
        return "–"
    scale, unit = flops_unit(x)
    return f"{x / scale:.3g} {unit}"
