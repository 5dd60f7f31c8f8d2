"""Where a study arm's FID gap comes from: each group's expert swapped alone into the baseline.

For every replicate of ARM in studies/STUDY/replicates.json whose run folder still exists, reads
``eval/experts-G-eval.json`` (written by ``tdc fid --run-dir R --experts G --seeds S``) and the
run's own ``eval/baseline-eval.json`` and ``eval/tdc-eval.json`` at the same sampling seed S, which
share the sampling noise (common random numbers). Prints, as Markdown, per group: its timesteps,
its budget, and FID(swap) − FID(baseline), mean [95 % t interval over training seeds] with the
per-seed values, and the same for the whole ensemble (TDC − baseline at S).

    uv run python studies/expert_swaps.py digits-final-sensitivity tdc --seed 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tdc_core.run.study import interval


def _fid(path: Path, seed: int) -> float:
    return next(p["fid"] for p in json.loads(path.read_text())["per_seed"] if p["seed"] == seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study")
    p.add_argument("arm")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed the swaps were scored at")
    args = p.parse_args(argv)
    records = [r for r in json.loads((Path("studies") / args.study / "replicates.json").read_text())
               if r["arm"] == args.arm and (Path(r["run_dir"]) / "eval").is_dir()]
    if not records:
        raise SystemExit(f"no run folder of arm {args.arm} of studies/{args.study} exists here")
    runs = [Path(r["run_dir"]) for r in records]
    budgets = [json.loads((run / "grouping" / "budgets.json").read_text())["budgets"] for run in runs]
    num_groups = len(budgets[0])
    base = [_fid(run / "eval" / "baseline-eval.json", args.seed) for run in runs]
    lines = [f"Training seeds {[r['seed'] for r in records]}, sampling seed {args.seed} (2,000 samples each); "
             "FID(model) − FID(baseline) at the same sampling noise, mean [95 % t interval over training seeds].",
             "", "| experts swapped in | timesteps (per seed) | budget (per seed) | FID − baseline | per seed |",
             "|---|---|---|---|---|"]
    for g in range(num_groups):
        paths = [run / "eval" / f"experts-{g}-eval.json" for run in runs]
        if not all(path.is_file() for path in paths):
            lines.append(f"| group {g} | | | not scored on every seed | |")
            continue
        diffs = [_fid(path, args.seed) - b for path, b in zip(paths, base)]
        spans = ", ".join(f"{b[g]['lo']}–{b[g]['hi']}" for b in budgets)
        fracs = ", ".join(f"{b[g]['fraction']:.1f}" for b in budgets)
        lines.append(f"| group {g} | {spans} | {fracs} F | {interval(diffs).signed()} | "
                     f"{', '.join(f'{d:+.4f}' for d in diffs)} |")
    whole = [_fid(run / "eval" / "tdc-eval.json", args.seed) - b for run, b in zip(runs, base)]
    lines.append(f"| all (TDC) | | | {interval(whole).signed()} | {', '.join(f'{d:+.4f}' for d in whole)} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
