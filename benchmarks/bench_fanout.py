"""Per-group fan-out on a CPU machine: 2 group fine-tunes on 2 workers vs on 1 worker, at equal cores.

    uv run python -m benchmarks.bench_fanout            # digits preset, groups 1 and 2

Prepares one run folder (probe, profile, grouping, shared training: not timed), then runs the
same two group fine-tunes (prune search + fine-tune, each in its own ``tdc finetune-group``
process, exactly as the flow starts them), from scratch each time, in these arms:
  1 worker × all cores         what ``tdc run --workers 1`` does: the like-for-like reference
  2 workers × cores/2 threads  the default fan-out
  1 worker × 1 thread          only with ``--with-single-thread`` (informative: not equal cores)
Warm-up: one untimed call of every arm; then ``--repeats`` rounds in alternating order; medians,
spread (min–max) and the per-round ratio are printed.
The target (issue 7): 2 workers ≥ 1.7× one worker, wall clock, judged at equal cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks._common import alternating_medians, machine, table, write_json
from benchmarks.direct import finetune_groups
from tdc_core.config import load_config, write_run_config
from tdc_core.run.layout import RunLayout
from tdc_core.run.stages import group_stage, profile_stage, shared_stage

TARGET = 1.7


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="digits")
    ap.add_argument("--groups", default="1,2", help="the two groups to fine-tune (similar work: both pruned)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of every arm first")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds, alternating order")
    ap.add_argument("--with-single-thread", action="store_true", help="also time 1 worker × 1 thread")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    cores = os.cpu_count() or 1
    groups = [int(g) for g in args.groups.split(",")]
    workers = len(groups)
    cfg = load_config(preset=args.preset, overrides=args.overrides)
    run = Path(tempfile.mkdtemp(prefix="tdc-fanout-"))
    layout = RunLayout(run)
    write_run_config(layout, cfg)
    print(f"machine: {machine()}\npreparing {run} (profile, groups, shared model: not timed; 1 thread)", flush=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # untimed; on 2 busy cores a second thread slows these 8x8 stages several-fold
    profile_stage(cfg, layout)
    group_stage(cfg, layout)
    shared_stage(cfg, layout)
    torch.set_num_threads(threads)

    def arm(w: int, threads: int):  # noqa: ANN202
        def call() -> float:
            for g in groups:
                shutil.rmtree(layout.group_dir(g), ignore_errors=True)
            return finetune_groups(run, groups, workers=w, threads=threads)
        return call

    ref = f"1 worker × {cores} threads"
    fan = f"{workers} workers × {max(1, cores // workers)} thread{'s' if cores // workers > 1 else ''}"
    arms = {ref: arm(1, cores), fan: arm(workers, max(1, cores // workers))}
    if args.with_single_thread:
        arms["1 worker × 1 thread"] = arm(1, 1)
    print(f"arms: {', '.join(arms)}; warm-up {args.warmup}, {args.repeats} alternating rounds", flush=True)
    times = alternating_medians(arms, warmup=args.warmup, repeats=args.repeats,
                                on_time=lambda n, r, s: print(f"  round {r + 1}: {n}: {s:.1f} s", flush=True))
    shutil.rmtree(run, ignore_errors=True)

    speedup = times[ref].median / times[fan].median
    paired = [a / b for a, b in zip(times[ref].times, times[fan].times, strict=True)]
    rows = [[name, f"{t.median:.1f} s", f"{t.spread[0]:.1f}–{t.spread[1]:.1f} s",
             f"{t.median / times[fan].median:.2f}×" if name != fan else "—",
             "yes" if name == ref else ("—" if name == fan else "no (fewer cores)")]
            for name, t in times.items()]
    print()
    print(table([f"groups {args.groups}", "median wall clock", "spread (min–max)", f"{fan} faster by",
                 "equal cores"], rows))
    met = speedup >= TARGET
    print(f"\nat equal cores ({cores}): {speedup:.2f}× (per round {', '.join(f'{p:.2f}' for p in paired)}; "
          f"median {statistics.median(paired):.2f}); target ≥ {TARGET}×: {'met' if met else 'missed'}")
    record = {"benchmark": "fanout", "preset": args.preset, "groups": groups, "cores": cores,
              "warmup": args.warmup, "repeats": args.repeats, "arms": {n: t.summary() for n, t in times.items()},
              "reference_arm": ref, "fanout_arm": fan, "speedup_equal_cores": speedup, "paired_ratios": paired,
              "target": TARGET, "met": met}
    write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
