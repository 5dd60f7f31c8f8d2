"""Sampling: the routed, pruned ensemble's measured time vs the single model's, against the
FLOPs ratio. Routing overhead shows as a time ratio above the FLOPs ratio.

    uv run python -m benchmarks.bench_sampling                          # CPU: digits model
    uv run python -m benchmarks.bench_sampling --preset imagenet64 --batch 256   # one GPU

The ensemble is built like the pipeline's: N groups (``grouping.num_groups``) over [0, T), each
expert pruned to its FLOPs budget ``(i/N + (N−i)/N·k)·F`` (``budget.k``) with the pruning
module's widths (a uniform keep ratio found by bisection); groups are ranked hardest at t≈0, as
profiling finds. Weights are random: time and FLOPs do not depend on them. Both models run the
same DDIM sampler (``sample.steps`` respaced steps) on the same batch: warm-up calls of both
first, then ``--repeats`` rounds in alternating order; medians and spread. The target (issue 7)
is |time ratio / FLOPs ratio − 1| ≤ 5 % at a batch that fills the GPU.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch

from benchmarks._common import alternating_medians, bench_config, machine, table, write_json
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.diffusion.samplers import sample, sampling_timesteps
from tdc_core.method.budgets import budget_fractions
from tdc_core.method.costs import sampling_cost
from tdc_core.method.pruning.space import dense_spec, prune_space
from tdc_core.method.routing import ExpertRouter
from tdc_core.model.flops import count_forward_flops
from tdc_core.model.unet import UNet, UNetSpec
from tdc_core.training.trainer import spec_for


def spec_at_fraction(dense: UNetSpec, fraction: float, *, min_keep: float) -> UNetSpec:
    """The dense spec with every unit at one keep ratio, the largest whose FLOPs fit ``fraction``·F."""
    space = prune_space(dense, min_keep=min_keep)
    target = fraction * space.dense_flops
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if space.flops(space.widths(np.full(len(space.units), mid))) <= target else (lo, mid)
    res, attn = space.split(space.widths(np.full(len(space.units), lo)))
    return replace(dense, res_inner=res, attn_inner=attn)


TOLERANCE = 0.05


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="digits")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the preset's sample.steps)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of both models first")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds, alternating order")
    ap.add_argument("--bf16", action="store_true", help="sample under bf16 autocast (CUDA)")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)

    cfg = bench_config(args.preset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, k, T = cfg.grouping.num_groups, cfg.budget.k, cfg.diffusion.num_timesteps
    dense = dense_spec(spec_for(cfg))
    bounds = [round(g * T / n) for g in range(n + 1)]
    fractions = budget_fractions(num_groups=n, k=k)  # index = difficulty rank, 0 = easiest
    # Hardest (largest budget) at t≈0: ranks descend with the group index's distance from t=0.
    group_fraction = [fractions[n - 1 - g] for g in range(n)]
    torch.manual_seed(0)
    experts = [UNet(spec_at_fraction(dense, f, min_keep=cfg.prune.min_keep)).to(device).eval()
               for f in group_fraction]
    single = UNet(dense).to(device).eval()
    router = ExpertRouter(experts=experts, boundaries=bounds).to(device).eval()
    if device.type == "cuda":
        for m in (single, router):
            m.to(memory_format=torch.channels_last)
    diffusion = Diffusion.from_config(cfg.diffusion).respaced(args.steps or cfg.sample.steps)
    ch, size = cfg.data.channels, cfg.data.image_size
    base = count_forward_flops(single, in_channels=ch, image_size=size)
    group_flops = [count_forward_flops(e, in_channels=ch, image_size=size) for e in experts]
    cost = sampling_cost(visited_timesteps=sampling_timesteps(diffusion), boundaries=bounds,
                         group_flops=group_flops, base_flops=base)

    def run(model: torch.nn.Module) -> None:
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            sample(model, diffusion, shape=(args.batch, ch, size, size), generator=gen, device=device)

    print(f"machine: {machine()}")
    print(f"preset {args.preset}: {n} groups {bounds}, budgets {[round(f, 2) for f in group_fraction]}·F, "
          f"measured FLOPs {[round(f / base, 3) for f in group_flops]}·F; DDIM {diffusion.num_steps} steps "
          f"{cost.steps_per_group} per group; batch {args.batch}{' bf16' if args.bf16 else ''}")
    with torch.inference_mode():
        times = alternating_medians({"single model": lambda: run(single), "TDC ensemble": lambda: run(router)},
                                    device=device, warmup=args.warmup, repeats=args.repeats,
                                    on_time=lambda n, r, t: print(f"  round {r + 1}: {n}: {t:.2f} s", flush=True))
    t_single, t_router = times["single model"].median, times["TDC ensemble"].median
    ratio = t_router / t_single
    paired = [a / b for a, b in zip(times["TDC ensemble"].times, times["single model"].times, strict=True)]
    flops = {"single model": cost.single_model_flops, "TDC ensemble": cost.total_flops}
    print()
    print(table(["model", "sampling time (median)", "spread (min–max)", "ms / image", "FLOPs / image"], [
        [name, f"{t.median:.2f} s", f"{t.spread[0]:.2f}–{t.spread[1]:.2f} s", f"{1e3 * t.median / args.batch:.2f}",
         f"{flops[name] / 1e9:.3f} G"] for name, t in times.items()]))
    within = abs(ratio / cost.ratio - 1) <= TOLERANCE
    print(f"\ntime ratio {ratio:.3f} (per round {', '.join(f'{p:.3f}' for p in paired)}), FLOPs ratio "
          f"{cost.ratio:.3f}: time / FLOPs = {ratio / cost.ratio:.3f} "
          f"({'within' if within else 'outside'} the 5 % target)")
    record = {"benchmark": "sampling", "preset": args.preset, "batch": args.batch, "steps": diffusion.num_steps,
              "bf16": args.bf16, "device": str(device), "warmup": args.warmup, "repeats": args.repeats,
              "arms": {n: t.summary() for n, t in times.items()}, "time_ratio": ratio, "paired_time_ratios": paired,
              "flops_ratio": cost.ratio, "time_over_flops": ratio / cost.ratio, "within_target": within,
              "flops_per_image": flops, "group_flops_fraction": [f / base for f in group_flops]}
    write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
