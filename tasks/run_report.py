"""The run report: a Markdown summary and a table, as Prefect artifacts and in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.tracking import TrackingRef
from tdc_core.atomic import atomic_write_bytes
from tdc_core.evaluation.curves import Curve
from tdc_core.records import load_record
from tdc_core.run.layout import RunLayout

__all__ = ["render_report", "report_task"]


def render_report(summary: dict) -> tuple[str, list[dict]]:
    """Markdown text and table rows (one per model) of a pipeline summary (as a plain dict)."""
    costs = summary["costs"]
    comparison = summary.get("comparison") or {}
    heldout = {h["name"]: h for h in comparison.get("heldout", [])}
    rows = []
    for i, g in enumerate(summary["groups"]):
        row = {"model": f"group {g['group']}", "timesteps": f"[{g['lo']}, {g['hi']})", "rank": g["rank"],
               "MFLOP/forward": round(g["flops"] / 1e6, 3), "budget MFLOP": round(g["budget_flops"] / 1e6, 3),
               "budget met": g["budget_met"]}
        # The held-out evaluator's ε-MSE on the group's timesteps, every model on the same triples.
        for name in ("tdc", "shared", "baseline"):
            if name in heldout:
                row[f"ε-MSE {name}"] = round(heldout[name]["group_eps_mse"][i], 5)
        rows.append(row)
    models = [n for n in ("tdc", "shared", "baseline") if n in heldout]
    t, s = costs["training"], costs["sampling"]
    lines = [
        "# TDC pipeline run",
        "",
        f"- run folder: `{summary['run_dir']}`",
        f"- MLflow run: `{summary['mlflow_run_id']}` ({summary['tracking_uri']})",
        f"- group boundaries (timesteps): {summary['boundaries']}",
        "",
        "| model | timesteps | rank | MFLOP/forward | budget MFLOP | budget met |"
        + "".join(f" held-out ε-MSE {n} |" for n in models),
        "|---|---|---|---|---|---|" + "---|" * len(models),
        *[f"| {r['model']} | {r['timesteps']} | {r['rank']} | {r['MFLOP/forward']} | {r['budget MFLOP']} | "
          f"{'yes' if r['budget met'] else 'no'} |" + "".join(f" {r[f'ε-MSE {n}']:.4f} |" for n in models)
          for r in rows],
        "",
        "## Cost",
        "",
        # Without a baseline the single-model column is what one would cost at TDC's training
        # FLOPs; say so, lest it read as a model that was trained.
        "| | TDC | " + ("single model" if summary.get("baseline") else "single model (not trained: its cost)")
        + " | ratio |",
        "|---|---|---|---|",
        f"| sampling FLOPs per image ({costs['sampler']}, {costs['sampling_steps']} steps) | "
        f"{s['total_flops']:.4g} | {s['single_model_flops']:.4g} | {s['ratio']:.3f} |",
        f"| training FLOPs (incl. pruning search {t['pruning_flops']:.3g}) | {t['tdc_flops']:.4g} | "
        f"{t['baseline_flops']:.4g} | {t['ratio']:.3f} |",
    ]
    if costs.get("stage1_imported"):
        lines += ["", f"Training FLOPs: {costs['stage1_imported']}."]
    if not comparison:
        lines += ["", "No evaluation (`eval.enabled=false` here)."]
    if comparison:
        title = "TDC vs the single-model baseline" if comparison.get("baseline") else "TDC alone (no baseline)"
        lines += ["", f"## {title}", "", _comparison_table(comparison)]
        if summary.get("baseline"):
            b = summary["baseline"]
            lines += ["", f"Baseline: {b['step']} steps at the same training FLOPs as TDC (MLflow run "
                          f"`{summary['baseline_run_id']}`). The full comparison, with every metric's interval: "
                          f"`{comparison['markdown_path']}`."]
    curve_json = RunLayout(Path(summary["run_dir"])).curve_json
    if comparison and curve_json.is_file():
        lines += ["", *_curve_lines(load_record(curve_json, Curve, what="curve"))]
    reg = summary.get("registration")
    if reg:
        lines += ["", f"Registered as `{reg['name']}` version {reg['version']}"
                  + (" (alias `champion`)" if reg["champion"] else " (the champion stays)")]
    if not costs["budgets_met"]:
        lines += ["", "Some budgets below F are not met (pruning disabled: `prune.enabled=false`)."]
    return "\n".join(lines) + "\n", rows


def _curve_lines(curve: Curve) -> list[str]:
    """The single model at every kept step of its run, and TDC, on the same held-out set."""
    lines = ["## Single model along its training, TDC beside it", "",
             f"Every row on the same {curve.num_images} held-out images × {curve.heldout_per_image} timesteps "
             f"(± one standard error over images); plot: `eval/curve.png`.", "",
             "| model | steps | training FLOPs | bits/dim | held-out ε-MSE |", "|---|---|---|---|---|"]
    for p in (*curve.single, curve.tdc):
        lines.append(f"| {'**TDC**' if p.kind == 'tdc' else p.name} | {p.step if p.step is not None else '—'} | "
                     f"{p.training_flops:.3g} | {p.bits_per_dim:.4f} ± {p.bits_per_dim_se:.4f} | "
                     f"{p.eps_mse:.5f} ± {p.eps_mse_se:.5f} |")
    return lines


def _comparison_table(c: dict) -> str:
    """The comparison as Markdown (the evaluation module writes the same data in full)."""
    setup = c["setup"]
    rows = ["| | FID (mean ± std) | KID (mean ± std) | FID per seed | sampling MFLOP/image | ms/image "
            "| training FLOPs |",
            "|---|---|---|---|---|---|---|"]
    for name in ("tdc", "baseline") if c.get("baseline") else ("tdc",):
        e, cost = c[name]["eval"], c[name]["cost"]
        seeds = ", ".join(f"{s['fid']:.3f}" for s in e["per_seed"])
        train = f"{cost['training_flops']:.3g}" if cost.get("training_flops") is not None else "—"
        kid = f"{e['kid_mean']:.5f} ± {e['kid_std']:.5f}" if e.get("kid_mean") is not None else "– (n < 2,000)"
        rows.append(f"| {'TDC' if name == 'tdc' else 'baseline'} | {e['fid_mean']:.4f} ± {e['fid_std']:.4f} | "
                    f"{kid} | {seeds} | "
                    f"{cost['sampling_flops_per_image'] / 1e6:.1f} | {1e3 * e['seconds_per_image']:.2f} | {train} |")
    real = c.get("real_heldout")
    tail = [f"{setup['num_samples']} samples per seed, seeds {list(setup['seeds'])}, {setup['sampler']} "
            f"{c['tdc']['eval']['sampling_steps']} steps; features: {c['feature_extractor']} ({c['fid_mode']}) — "
            f"{c['comparability']}."]
    if real:
        tail.append(f"Real held-out images for scale: FID {real['fid']:.4f} ({real['num_images']} images).")
    tail += c.get("notes", [])
    text = "\n".join(rows) + "\n\n" + "\n".join(f"- {t}" for t in tail)
    diffs = [*c.get("heldout_differences", []), *c.get("likelihood_differences", [])]
    ci = c.get("fid_difference_ci")
    if diffs or ci:
        verdict = lambda lo, hi: "TDC better" if hi < 0 else "TDC worse" if lo > 0 else "no clear difference"  # noqa: E731
        lines = ["", "| TDC − other (95 % interval; lower is better) | other | difference | verdict |",
                 "|---|---|---|---|"]
        if ci:
            lines.append(f"| FID, all seeds pooled (paired bootstrap, n = {ci['n']}) | baseline | "
                         f"{ci['difference']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}] | "
                         f"{verdict(ci['low'], ci['high'])} |")
        for d in diffs:
            lines.append(f"| {d['metric']} (held-out, n = {d['n']} images) | {d['b']} | {d['difference']:+.4f} "
                         f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] | {verdict(d['ci_low'], d['ci_high'])} |")
        text += "\n" + "\n".join(lines)
    return text


@task(name="report")
def report_task(*, summary_json: str, tracking: TrackingRef) -> str:
    """Write ``report.md`` into the run folder, log it to MLflow, publish Prefect artifacts."""
    summary = json.loads(summary_json)
    markdown, rows = render_report(summary)
    path = RunLayout(Path(summary["run_dir"])).report_md
    atomic_write_bytes(path, markdown.encode())
    tracking.log_artifact(tracking.parent_run_id, path)
    create_markdown_artifact(markdown=markdown, key="tdc-report", description="TDC pipeline run report")
    create_table_artifact(table=rows, key="tdc-groups", description="Per-group models of the TDC run")
    return markdown
