"""The run report: a Markdown summary and a table, as Prefect artifacts and in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.tracking import TrackingRef
from tdc_core.atomic import atomic_write_bytes
from tdc_core.run.layout import RunLayout

__all__ = ["render_report", "report_task"]


def render_report(summary: dict) -> tuple[str, list[dict]]:
    """Markdown text and table rows (one per model) of a pipeline summary (as a plain dict)."""
    costs = summary["costs"]
    rows = []
    for g in summary["groups"]:
        rows.append({
            "model": f"group {g['group']}", "timesteps": f"[{g['lo']}, {g['hi']})", "rank": g["rank"],
            "MFLOP/forward": round(g["flops"] / 1e6, 3), "budget MFLOP": round(g["budget_flops"] / 1e6, 3),
            "budget met": g["budget_met"], "held-out ε-MSE shared → pruned → expert":
                f"{g['heldout_loss_shared']:.4f} → "
                + (f"{g['heldout_loss_pruned']:.4f} → " if g.get("heldout_loss_pruned") is not None else "— → ")
                + f"{g['heldout_loss']:.4f}",
        })
    t, s = costs["training"], costs["sampling"]
    lines = [
        "# TDC pipeline run",
        "",
        f"- run folder: `{summary['run_dir']}`",
        f"- MLflow run: `{summary['mlflow_run_id']}` ({summary['tracking_uri']})",
        f"- group boundaries (timesteps): {summary['boundaries']}",
        "",
        "| model | timesteps | rank | MFLOP/forward | budget MFLOP | budget met "
        "| held-out ε-MSE shared → pruned → expert |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['model']} | {r['timesteps']} | {r['rank']} | {r['MFLOP/forward']} | {r['budget MFLOP']} | "
          f"{'yes' if r['budget met'] else 'no'} | {r['held-out ε-MSE shared → pruned → expert']} |" for r in rows],
        "",
        "## Cost",
        "",
        "| | TDC | single model | ratio |",
        "|---|---|---|---|",
        f"| sampling FLOPs per image ({costs['sampler']}, {costs['sampling_steps']} steps) | "
        f"{s['total_flops']:.4g} | {s['single_model_flops']:.4g} | {s['ratio']:.3f} |",
        f"| training FLOPs (incl. pruning search {t['pruning_flops']:.3g}) | {t['tdc_flops']:.4g} | "
        f"{t['baseline_flops']:.4g} | {t['ratio']:.3f} |",
    ]
    sh = summary["shared"]
    lines += ["", "## Held-out ε-MSE (t uniform on [0, T))", "",
              f"- TDC ensemble: {summary['ensemble_heldout_loss']:.4f}",
              f"- shared model alone: {sh['heldout_loss']:.4f} ({sh['step']} steps)"]
    if summary.get("baseline"):
        b = summary["baseline"]
        lines += [f"- baseline: {b['heldout_loss']:.4f} ({b['step']} steps, same training FLOPs as TDC; "
                  f"MLflow run `{summary['baseline_run_id']}`)"]
    comparison = summary.get("comparison")
    if comparison:
        lines += ["", "## TDC vs the single-model baseline", "", _comparison_table(comparison)]
    reg = summary.get("registration")
    if reg:
        lines += ["", f"Registered as `{reg['name']}` version {reg['version']}"
                  + (" (alias `champion`)" if reg["champion"] else " (the champion stays)")]
    if not costs["budgets_met"]:
        lines += ["", "Some budgets below F are not met (pruning disabled: `prune.enabled=false`)."]
    return "\n".join(lines) + "\n", rows


def _comparison_table(c: dict) -> str:
    """The comparison as Markdown (the evaluation module writes the same data in full)."""
    setup = c["setup"]
    rows = ["| | FID (mean ± std) | KID (mean ± std) | FID per seed | sampling MFLOP/image | ms/image "
            "| training FLOPs |",
            "|---|---|---|---|---|---|---|"]
    for name in ("tdc", "baseline"):
        e, cost = c[name]["eval"], c[name]["cost"]
        seeds = ", ".join(f"{s['fid']:.3f}" for s in e["per_seed"])
        train = f"{cost['training_flops']:.3g}" if cost.get("training_flops") is not None else "—"
        rows.append(f"| {'TDC' if name == 'tdc' else 'baseline'} | {e['fid_mean']:.4f} ± {e['fid_std']:.4f} | "
                    f"{e['kid_mean']:.5f} ± {e['kid_std']:.5f} | {seeds} | "
                    f"{cost['sampling_flops_per_image'] / 1e6:.1f} | {1e3 * e['seconds_per_image']:.2f} | {train} |")
    real = c.get("real_heldout")
    tail = [f"{setup['num_samples']} samples per seed, seeds {list(setup['seeds'])}, {setup['sampler']} "
            f"{c['tdc']['eval']['sampling_steps']} steps; features: {c['feature_extractor']} ({c['fid_mode']}) — "
            f"{c['comparability']}."]
    if real:
        tail.append(f"Real held-out images for scale: FID {real['fid']:.4f} ({real['num_images']} images).")
    tail += c.get("notes", [])
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {t}" for t in tail)


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
