"""Projection of proposed keep ratios onto a round's FLOPs target (docs/METHOD.md step 5).

Every proposal is *projected* onto the round's target (:func:`project_to_budget`). A proposal
whose rounded widths already cost ``target · [1 − tol, 1]`` is kept as is. Otherwise a global
multiplier on its keep ratios, clipped per unit to ``[min width, current width]`` (channels
cannot grow back), is found by bisection (largest with FLOPs ≤ target); whole quanta are then
added back greedily where rounding took most, and if coarse quanta still leave the FLOPs below
the band, one add (or add-and-remove) move lands inside it. FLOPs therefore end in
``target · [1 − tol, 1 + tol]`` (above the target only when no width combination reachable by
that move is below it) and never above ``target · (1 + tol)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tdc_core.method.pruning.proxies.records import Proposal, ProxyState
from tdc_core.method.pruning.space import PruneSpace

__all__ = [
    "project_many",
    "project_to_budget",
]


def _round_widths(keep: np.ndarray, *, space: PruneSpace, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """``[M x U]`` keep → int64 widths: nearest multiple of each quantum, clipped to [lower, upper]."""
    d, q = space.dense_widths, space.quanta
    w = q * np.floor(keep * d / q + 0.5).astype(np.int64)
    return np.clip(w, lower, upper)


def project_many(
    proposals: np.ndarray, *, space: PruneSpace, lower_widths: Sequence[int], upper_widths: Sequence[int],
    target_flops: float, tolerance: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Project proposals onto the FLOPs target (see the module docstring).

    Args:
        proposals: float ``[M x U]`` keep ratios (fractions of the dense widths).
        lower_widths, upper_widths: ``[U]`` allowed width range per unit (multiples of quanta).
        target_flops: FLOPs per image to reach; tolerance: relative.

    Returns:
        (widths int64 ``[M x U]``, FLOPs float64 ``[M]``). A row whose FLOPs still exceed
        ``target · (1 + tolerance)`` sits at ``lower_widths`` (the target is out of reach).
    """
    p = np.atleast_2d(np.asarray(proposals, dtype=np.float64))
    d = space.dense_widths.astype(np.float64)
    lo_w, up_w = np.asarray(lower_widths, dtype=np.int64), np.asarray(upper_widths, dtype=np.int64)
    if p.shape[1] != len(d) or lo_w.shape != up_w.shape or len(lo_w) != len(d) or (lo_w > up_w).any():
        raise ValueError("proposals, lower_widths and upper_widths must all have one entry per unit, lower ≤ upper")
    if not np.isfinite(p).all():
        raise ValueError("proposals must be finite")
    lo_k, up_k = lo_w / d, up_w / d
    p = np.clip(p, lo_k, up_k)
    hi_t, lo_t = target_flops * (1 + tolerance), target_flops * (1 - tolerance)
    widths = _round_widths(p, space=space, lower=lo_w, upper=up_w)
    flops = space.flops(widths)
    # Rows already in [target·(1 − tol), target] stay as proposed; above the target is allowed
    # only where whole quanta leave no closer choice (see _fill).
    todo = ~((flops >= lo_t) & (flops <= target_flops))
    if not todo.any():
        return widths, flops
    # Bisection on a global multiplier s: FLOPs(clip(s·p)) is non-decreasing in s.
    pt = np.maximum(p[todo], 1e-12)
    s_lo = np.zeros(len(pt))
    s_hi = np.max(up_k / pt, axis=1) * (1 + 1e-9)
    for _ in range(48):
        mid = (s_lo + s_hi) / 2
        f = space.flops(_round_widths(mid[:, None] * pt, space=space, lower=lo_w, upper=up_w))
        ok = f <= target_flops
        s_lo = np.where(ok, mid, s_lo)
        s_hi = np.where(ok, s_hi, mid)
    w_t = _round_widths(s_lo[:, None] * pt, space=space, lower=lo_w, upper=up_w)
    want = s_lo[:, None] * pt * d  # the unrounded widths the multiplier asks for
    for row in range(len(w_t)):
        w_t[row] = _fill(w_t[row], want=want[row], space=space, lower=lo_w, upper=up_w, target=target_flops,
                         hi=hi_t, lo=lo_t)
    widths[todo] = w_t
    return widths, space.flops(widths)


def _fill(w: np.ndarray, *, want: np.ndarray, space: PruneSpace, lower: np.ndarray, upper: np.ndarray,
          target: float, hi: float, lo: float) -> np.ndarray:
    """Land in the tolerance band, preferring FLOPs ≤ target.

    1. Add whole quanta back where rounding took most (``want − w``), staying ≤ target.
    2. Still below the band (coarse quanta): the single move (add a quantum to one unit, or add
       to one and remove from another) that ends closest below the target inside the band; if
       none exists, the one that ends closest above it, up to ``hi``.
    """
    w = w.copy()
    q, a = space.quanta, space.slopes
    f = space.flops(w)
    step = a * q
    deficit = (want - w) / q
    eps = 1e-9 * target
    while True:
        room = (w + q <= upper) & (f + step <= target + eps)
        if not room.any():
            break
        i = int(np.argmax(np.where(room, deficit, -np.inf)))
        w[i] += q[i]
        f += step[i]
        deficit[i] -= 1
    if f >= lo - eps:
        return w
    can_add, can_remove = w + q <= upper, w - q >= lower
    # new FLOPs after "add i" (diagonal) or "add i, remove j" (off-diagonal)
    moved = f + step[:, None] - np.where(np.eye(len(w), dtype=bool), 0.0, step[None, :])
    legal = can_add[:, None] & (np.eye(len(w), dtype=bool) | can_remove[None, :])
    for band_lo, band_hi, pick in ((lo - eps, target + eps, np.argmax), (target, hi + eps, np.argmin)):
        ok = legal & (moved >= band_lo) & (moved <= band_hi)
        if ok.any():
            flat = int(pick(np.where(ok, moved, -np.inf if pick is np.argmax else np.inf)))
            i, j = divmod(flat, len(w))
            w[i] += q[i]
            if i != j:
                w[j] -= q[j]
            break
    return w


def project_to_budget(proposal: Sequence[float], *, state: ProxyState, proxy: str,
                      fallback_reason: str | None = None) -> Proposal:
    """One proposal projected onto ``state``'s target (see :func:`project_many`)."""
    raw = np.asarray(proposal, dtype=np.float64)
    w, f = project_many(raw[None], space=state.space, lower_widths=state.lower_widths,
                        upper_widths=state.current_widths, target_flops=state.target_flops,
                        tolerance=state.tolerance)
    return _proposal(raw, w[0], float(f[0]), state=state, proxy=proxy, fallback_reason=fallback_reason)


def _proposal(raw: np.ndarray, widths: np.ndarray, flops: float, *, state: ProxyState, proxy: str,
              fallback_reason: str | None) -> Proposal:
    return Proposal(
        proposal=[float(x) for x in raw], keep=state.space.keep_of(widths), widths=[int(x) for x in widths],
        flops=flops, within_tolerance=abs(flops - state.target_flops) <= state.tolerance * state.target_flops + 1e-6,
        proxy=proxy, fallback_reason=fallback_reason,
    )


def _project(rows: np.ndarray, state: ProxyState) -> tuple[np.ndarray, np.ndarray]:
    return project_many(rows, space=state.space, lower_widths=state.lower_widths,
                        upper_widths=state.current_widths, target_flops=state.target_flops,
                        tolerance=state.tolerance)


def _project_rows(rows: np.ndarray, *, state: ProxyState, proxy: str, n: int,
                  fallback_reason: str | None = None, order: np.ndarray | None = None,
                  projected: tuple[np.ndarray, np.ndarray] | None = None) -> list[Proposal]:
    """Project ``rows`` (unless ``projected`` already holds their widths and FLOPs) and keep the
    first ``n`` with distinct widths (in ``order`` if given)."""
    w, f = projected if projected is not None else _project(rows, state)
    out: list[Proposal] = []
    seen: set[tuple[int, ...]] = set()
    for i in (order if order is not None else range(len(rows))):
        key = tuple(int(x) for x in w[i])
        if key in seen:
            continue
        seen.add(key)
        out.append(_proposal(rows[i], w[i], float(f[i]), state=state, proxy=proxy, fallback_reason=fallback_reason))
        if len(out) == n:
            break
    return out
