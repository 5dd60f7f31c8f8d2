"""Where TDC's experts gain or lose against the single model: held-out ε-MSE per group.

For every replicate of ARM in studies/STUDY/replicates.json whose run folder still exists, reads
the run's ``eval/comparison.json``: its held-out ε-MSE per group (the run's own boundaries; 180
held-out images × 100 timesteps, the same images and noise for both models) of TDC and of the
single model. With ``--baseline-arm B`` the single model is arm B's at the same training seed
(for an arm that ran TDC alone on B's stage 1). Prints, as Markdown, per group: its timesteps and
budget per seed, and TDC − single model in ε-MSE, absolute and relative, mean [95 % t interval
over training seeds] with the per-seed values.

    uv run python studies/group_errors.py digits-final-sensitivity tdc
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tdc_core.run.study import interval


def _heldout(run: Path, name: str) -> dict:
    return next(h for h in json.loads((run / "eval" / "comparison.json").read_text())["heldout"] if h["name"] == name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study")
    p.add_argument("arm")
    p.add_argument("--baseline-arm", help="the arm whose single model to compare with (default: ARM's own)")
    args = p.parse_args(argv)
    records = json.loads((Path("studies") / args.study / "replicates.json").read_text())
    base_arm = args.baseline_arm or args.arm

    def runs(arm: str) -> dict[int, Path]:
        return {r["seed"]: Path(r["run_dir"]) for r in records
                if r["arm"] == arm and (Path(r["run_dir"]) / "eval" / "comparison.json").is_file()}

    mine, theirs = runs(args.arm), runs(base_arm)
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        raise SystemExit(f"no run folders of arms {args.arm} and {base_arm} of studies/{args.study} exist here")
    tdc = [_heldout(mine[s], "tdc") for s in seeds]
    single = [_heldout(theirs[s], "baseline") for s in seeds]
    for s, a, b in zip(seeds, tdc, single):
        if a["boundaries"] != b["boundaries"]:  # a baseline scores by the groups of its own run
            raise SystemExit(f"seed {s}: the two runs group the timesteps differently ({a['boundaries']}, "
                             f"{b['boundaries']}); compare arms on one stage 1")
    budgets = [json.loads((mine[s] / "grouping" / "budgets.json").read_text())["budgets"] for s in seeds]
    lines = [f"Arm `{args.arm}` of `{args.study}` against the single model of arm `{base_arm}`, training seeds "
             f"{seeds}: held-out ε-MSE per group, TDC − single model, mean [95 % t interval over training seeds].",
             "", "| group | timesteps (per seed) | budget (per seed) | TDC − single model | relative "
             "| per seed (relative) |",
             "|---|---|---|---|---|---|"]
    for g in range(len(tdc[0]["group_eps_mse"])):
        diff = [a["group_eps_mse"][g] - b["group_eps_mse"][g] for a, b in zip(tdc, single)]
        rel = [100 * d / b["group_eps_mse"][g] for d, b in zip(diff, single)]
        spans = ", ".join(f"{b[g]['lo']}–{b[g]['hi']}" for b in budgets)
        fracs = ", ".join(f"{b[g]['fraction']:.1f}" for b in budgets)
        lines.append(f"| {g} | {spans} | {fracs} F | {interval(diff).signed()} | {interval(rel).signed('+.1f')} % | "
                     f"{', '.join(f'{r:+.1f} %' for r in rel)} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
