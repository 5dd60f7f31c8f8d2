"""One fixed setting over the training seeds of several studies: TDC − its single model, pooled.

Each SOURCE is ``STUDY:ARM``: arm ARM of ``studies/STUDY`` (its study file and its committed
``replicates.json``). Every source's arm must be the same setting as the first's (same preset, same
overrides) and every training seed must appear once; the replicates are the studies' own records,
nothing is re-run. Prints, as Markdown, per metric the mean [95 % t interval over all seeds] of
TDC − its equal-FLOPs single model, paired by seed, each source's mean beside it, and how many
seeds lean each way. Costs are shown as ratios of the means.

Pooling is not selection: the setting is fixed before any of its seeds ran. A study's own
``tdc study --summary-only`` cannot pool replicates of different commits, because each new config
field changes the run folders' hashes; this script checks the study files' arm definitions
instead, so the note that cites it must name the commits the studies ran at.

    uv run python studies/pooled.py digits-final-sensitivity:tdc digits-final-stage2:tdc
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import fmean

from tdc_core.run.study import COSTS, HIGHER_IS_BETTER, METRICS, interval, load_study


def _source(text: str) -> tuple[str, str]:
    study, sep, arm = text.partition(":")
    if not sep or not study or not arm:
        raise SystemExit(f"{text!r}: give STUDY:ARM, e.g. digits-final-stage2:tdc")
    return study, arm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sources", nargs="+", metavar="STUDY:ARM")
    args = p.parse_args(argv)
    setting, per_source, seeds_seen = None, [], set()
    for study, arm_name in map(_source, args.sources):
        spec = load_study(Path("studies") / f"{study}.yaml")
        arm = next((a for a in spec.arms if a.name == arm_name), None)
        if arm is None:
            raise SystemExit(f"studies/{study}.yaml has no arm {arm_name!r}")
        here = (arm.preset, tuple(sorted(arm.overrides)))
        if setting is not None and here != setting:
            raise SystemExit(f"{study}:{arm_name} is {here}, not the first source's {setting}: not one setting")
        setting = here
        records = [r for r in json.loads((Path("studies") / study / "replicates.json").read_text())
                   if r["arm"] == arm_name and r.get("baseline")]
        again = seeds_seen & {r["seed"] for r in records}
        if again:
            raise SystemExit(f"{study}:{arm_name}: training seeds {sorted(again)} appear in an earlier source too")
        seeds_seen |= {r["seed"] for r in records}
        per_source.append((f"{study}:{arm_name}", sorted(records, key=lambda r: r["seed"])))
    everything = [r for _, records in per_source for r in records]
    where = ", ".join(f"{name} seeds {[r['seed'] for r in rs]}" for name, rs in per_source)
    lines = [f"TDC − its equal-FLOPs single model, setting {setting}, pooled over {len(everything)} training seeds "
             f"({where}): mean "
             "[95 % t interval over seeds], paired by seed.", "",
             f"| metric | pooled | {' | '.join(name for name, _ in per_source)} | seeds TDC better / worse |",
             f"|---|---|{'---|' * len(per_source)}---|"]
    for metric, label in METRICS.items():
        if metric in COSTS:
            continue
        # per source, paired by seed; the pooled sample is their concatenation
        by_source = [[r["tdc"][metric] - r["baseline"][metric] for r in rs] for _, rs in per_source]
        diffs = [d for ds in by_source for d in ds]
        better = sum((d > 0) == (metric in HIGHER_IS_BETTER) and d != 0 for d in diffs)
        worse = sum(d != 0 for d in diffs) - better
        means = " | ".join(interval(ds).signed() for ds in by_source)
        lines.append(f"| {label} | {interval(diffs).signed()} | {means} | {better} / {worse} |")
    for metric in sorted(COSTS):
        ratio = fmean(r["tdc"][metric] for r in everything) / fmean(r["baseline"][metric] for r in everything)
        lines.append(f"| {METRICS[metric]}, TDC / single model | {ratio:.2f}× | {' | ' * len(per_source)}|")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
