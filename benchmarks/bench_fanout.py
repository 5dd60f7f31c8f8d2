"""Per-group fan-out on a CPU machine: 2 group fine-tunes on 2 workers vs on 1 worker.

    uv run python -m benchmarks.bench_fanout            # digits preset, groups 1 and 2

Prepares one run folder (probe, profile, grouping, shared training: not timed), then runs the
same two group fine-tunes (prune search + fine-tune, each in its own ``tdc finetune-group``
process, exactly as the flow starts them) three ways, from scratch each time:
  1 worker × 1 thread, 1 worker × all cores (what ``tdc run --workers 1`` does), 2 workers × 1 thread each.
The target (issue 7): 2 workers ≥ 1.7× one worker, wall clock.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from benchmarks._common import machine, table
from benchmarks.direct import finetune_groups
from tdc_core.config import load_config, write_run_config
from tdc_core.layout import RunLayout
from tdc_core.stages import group_stage, profile_stage, shared_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="digits")
    ap.add_argument("--groups", default="1,2", help="the two groups to fine-tune (similar work: both pruned)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    import os

    cores = os.cpu_count() or 1
    groups = [int(g) for g in args.groups.split(",")]
    cfg = load_config(preset=args.preset, overrides=args.overrides)
    run = Path(tempfile.mkdtemp(prefix="tdc-fanout-"))
    layout = RunLayout(run)
    write_run_config(layout, cfg)
    print(f"machine: {machine()}\npreparing {run} (profile, groups, shared model: not timed)", flush=True)
    profile_stage(cfg, layout)
    group_stage(cfg, layout)
    shared_stage(cfg, layout)
    rows, times = [], {}
    for name, workers, threads in (("1 worker × 1 thread", 1, 1), (f"1 worker × {cores} threads", 1, cores),
                                   ("2 workers × 1 thread", 2, 1)):
        for g in groups:
            shutil.rmtree(layout.group_dir(g), ignore_errors=True)
        times[name] = finetune_groups(run, groups, workers=workers, threads=threads)
        print(f"  {name}: {times[name]:.1f} s", flush=True)
    fan = times["2 workers × 1 thread"]
    for name, secs in times.items():
        rows.append([name, f"{secs:.1f} s", f"{secs / fan:.2f}×"])
    print()
    print(table(["groups " + args.groups, "wall clock", "2 workers are faster by"], rows))
    shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
