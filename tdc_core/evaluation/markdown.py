"""The comparison as Markdown: a header that states how it was measured, then every number.

Lower is better for every metric shown except precision and recall. A verdict ("TDC better",
"TDC worse", "no clear difference") is printed only from a 95 % interval.
"""

from __future__ import annotations

from pathlib import Path

from tdc_core.evaluation.heldout import PairedDifference
from tdc_core.evaluation.results import Comparison
from tdc_core.evaluation.units import fmt_flops

__all__ = ["comparison_markdown"]




def _fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def comparison_markdown(c: Comparison) -> str:
    """The comparison as a Markdown table with a header that states how it was measured."""
    s = c.setup
    rows = (c.tdc,) if c.baseline is None else (c.tdc, c.baseline)
    lines = [
        "## TDC vs single-model baseline" if c.baseline is not None else "## TDC alone (no baseline)",
        "",
        f"- features: `{c.feature_extractor}`, mode `{c.fid_mode}` — **{c.comparability}**",
        f"- {s.num_samples} samples per seed, seeds {list(s.seeds)}, sampler {s.sampler}, "
        f"{c.tdc.eval.sampling_steps} steps, eta {s.eta:g}"
        + ("; both models get the same seeds (and initial noise)" if c.baseline is not None else ""),
        f"- reference: {c.tdc.eval.reference.num_images} images, the "
        f"{'held-out split (disjoint from training)' if c.tdc.eval.reference.split == 'heldout' else 'training split'} "
        f"(dataset {c.tdc.eval.reference.dataset_fingerprint}, {c.tdc.eval.reference.resolution} px)",
        "",
        "| model | FID ↓ mean ± std | FID per seed | KID ↓ mean ± std | sampling FLOPs / image "
        "| sampling ms / image | training FLOPs |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        e = row.eval
        seeds = ", ".join(f"{p.fid:.3f}" for p in e.per_seed)
        kid = f"{e.kid_mean:.5f} ± {e.kid_std:.5f}" if e.kid_mean is not None else "– (n < 2,000)"
        lines.append(
            f"| {e.name} | {e.fid_mean:.3f} ± {e.fid_std:.3f} | {seeds} | {kid} "
            f"| {fmt_flops(row.cost.sampling_flops_per_image)} | {1e3 * e.seconds_per_image:.2f} "
            f"| {fmt_flops(row.cost.training_flops)} |"
        )
    if c.real_heldout is not None:
        r = c.real_heldout
        kid = f"{r.kid:.5f}" if r.kid is not None else "–"
        lines.append(f"| {r.name} ({r.num_images} images) | {r.fid:.3f} | – | {kid} | – | – | – |")
    if c.baseline is not None:
        lines += [
            "",
            f"TDC − baseline FID: {c.fid_difference:+.3f} (negative: TDC better) · sampling FLOPs TDC/baseline: "
            f"{_fmt_ratio(c.sampling_flops_ratio)} · training FLOPs TDC/baseline: {_fmt_ratio(c.training_flops_ratio)}",
        ]
    lines += ["", f"- TDC training: {c.tdc.cost.training_detail}"]
    if c.baseline is not None:
        lines.append(f"- baseline training: {c.baseline.cost.training_detail}")
    lines += _evidence_lines(c)
    lines += ["", "Notes:", *[f"- {n}" for n in c.notes]] if c.notes else []
    return "\n".join(lines) + "\n"


def _ci(d: PairedDifference, digits: int = 4) -> str:
    return f"{d.difference:+.{digits}f} [{d.ci_low:+.{digits}f}, {d.ci_high:+.{digits}f}]"


def _verdict(low: float, high: float) -> str:
    """What a 95 % interval of TDC − other says when lower is better."""
    return "TDC better" if high < 0 else "TDC worse" if low > 0 else "no clear difference"


def _evidence_lines(c: Comparison) -> list[str]:
    """The sample-quality, held-out and likelihood sections (each only when it was measured)."""
    lines: list[str] = []
    if c.fid_difference_ci is not None:
        ci = c.fid_difference_ci
        lines += ["", "### FID with its uncertainty", "",
                  f"- TDC − baseline FID over all seeds pooled (n = {ci.n} per model, paired by initial noise): "
                  f"{ci.difference:+.4f}, 95 % bootstrap interval [{ci.low:+.4f}, {ci.high:+.4f}] "
                  f"({ci.n_boot} replicates) — {_verdict(ci.low, ci.high)}"]
    if c.real_floor is not None:
        f = c.real_floor
        lines.append(f"- real-vs-real floor: FID of two disjoint reference subsets of n = {f.n}: "
                     f"{f.mean:.4f} ± {f.sd:.4f} ({f.repeats} draws from {f.pool_size} images)")
    if c.sample_quality:
        lines += ["", "| model | precision ↑ | recall ↑ | memorized ↓ | nearest training images |",
                  "|---|---|---|---|---|"]
        for q in c.sample_quality:
            mem = f"{q.memorized_share:.1%}" if q.memorized_share is not None else "–"
            lines.append(f"| {q.name} | {q.precision:.3f} | {q.recall:.3f} | {mem} | "
                         f"{Path(q.nearest_png).name if q.nearest_png else '–'} |")
        q = c.sample_quality[0]
        lines.append(f"\nPrecision/recall: k-NN manifolds (k = {q.k}) in the FID features, {q.num_samples} samples vs "
                     f"{q.num_real} reference images. Memorized: share of the first seed's samples whose nearest "
                     f"training image (pixel L2) is closer than {q.memorization_ratio:.2f} × the second nearest; "
                     f"the PNG shows pairs: sample (left), its nearest training image (right).")
    if c.heldout:
        h0 = c.heldout[0]
        groups = [f"[{lo}, {hi})" for lo, hi in zip(h0.boundaries[:-1], h0.boundaries[1:])]
        lines += ["", f"### Held-out denoising error ({h0.num_images} held-out images × {h0.per_image} stratified "
                      f"timesteps, the same triples for every model; ± = SE over images)", "",
                  "| model | ε-MSE ↓ (uniform t) | x0-MSE ↓ | Min-SNR-5 ε-MSE ↓ | " + " | ".join(
                      f"ε-MSE {g}" for g in groups) + " |",
                  "|---|---|---|---|" + "---|" * len(groups)]
        for h in c.heldout:
            lines.append(f"| {h.name} | {h.eps_mse:.4f} ± {h.eps_mse_se:.4f} | {h.x0_mse:.4f} ± {h.x0_mse_se:.4f} | "
                         f"{h.eps_mse_min_snr:.4f} ± {h.eps_mse_min_snr_se:.4f} | "
                         + " | ".join(f"{v:.4f}" for v in h.group_eps_mse) + " |")
    if c.likelihood:
        l0 = c.likelihood[0]
        how = "exact bound, all T" if l0.timesteps_per_image is None else (
            f"unbiased estimate, {l0.timesteps_per_image} stratified timesteps per image")
        groups = [f"[{lo}, {hi})" for lo, hi in zip(l0.boundaries[:-1], l0.boundaries[1:])]
        lines += ["", f"### Held-out negative log-likelihood (bits/dim, variational bound; {how}; "
                      f"{l0.num_images} images; ± = SE)", "",
                  "| model | bits/dim ↓ | prior | " + " | ".join(f"terms {g}" for g in groups) + " |",
                  "|---|---|---|" + "---|" * len(groups)]
        for lk in c.likelihood:
            lines.append(f"| {lk.name} | {lk.bpd:.4f} ± {lk.bpd_se:.4f} | {lk.prior_bpd:.2e} | "
                         + " | ".join(f"{v:.4f}" for v in lk.group_bpd) + " |")
    diffs = [*c.heldout_differences, *c.likelihood_differences]
    if diffs:
        lines += ["", "### Paired differences (TDC − other, same held-out images; 95 % interval)", "",
                  "| metric | other | TDC − other | verdict |", "|---|---|---|---|"]
        for d in diffs:
            lines.append(f"| {d.metric} | {d.b} | {_ci(d)} | {_verdict(d.ci_low, d.ci_high)} |")
    return lines

