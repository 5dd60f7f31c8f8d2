"""The ``tdc`` command.

    tdc train  [--preset digits] [--config FILE] [--out-dir DIR] [key=value ...]
    tdc sample (--checkpoint PATH | --run-dir DIR) [--out grid.png] [--num 64] [--steps 50]
    tdc config [--preset digits] [--config FILE] [key=value ...]   # print the resolved config

The TDC stages, by hand, over one run folder (docs/METHOD.md steps 1-4, 6, 7):

    tdc profile --run-dir R [--preset digits] [key=value ...]   # probe training + difficulty profile
    tdc group   --run-dir R                                      # timestep groups + FLOPs budgets
    tdc train   --out-dir R                                      # shared training, continues the probe
    tdc finetune-group --run-dir R --group G                     # one group's expert (any process/GPU)
    tdc sample  --run-dir R                                      # sample from the routed ensemble

Evaluation (clean-fid; reference statistics cached under eval.cache_dir):

    tdc fid (--checkpoint PATH | --run-dir R) [--num N] [--seeds 0,1,2] [key=value ...]
    tdc compare --run-dir R [--baseline PATH]                    # TDC vs the single-model baseline

Stage 1 from a released openai/improved-diffusion checkpoint instead of training it:

    tdc import-iddpm CKPT.pt --preset cifar10 --out-dir R [data.path=DIR]   # then: tdc run --run-dir R

A study: arms × training seeds through the pipeline, with intervals over training seeds:

    tdc study STUDY.yaml [--dry-run]

A run folder remembers its config (config.yaml): later commands on it need no preset or overrides.

Bad input (config, data, checkpoints) prints one line naming the field or file and exits 2;
an interrupted training run says how to resume it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tdc",
        description="Timestep-adaptive divide-and-conquer training of diffusion models (TDC).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--preset", default="digits",
                        help="named preset: smoke, digits, cifar10, imagenet64 (default: digits)")
        sp.add_argument("--config", type=Path, help="YAML/JSON file applied on top of the preset")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=2e-4")

    ru = sub.add_parser("run",
                        help="run the whole TDC pipeline (Prefect flow 'tdc') in this process, with the baseline")
    config_args(ru)
    ru.add_argument("--run-dir", type=Path,
                    help="run folder (default: runs/<name>-<preset>-<config hash>; a re-run resumes)")
    ru.add_argument("--workers", type=int, help="parallel group fine-tunes (default: one per GPU, or 2 on CPU)")
    ru.add_argument("--wait", action="store_true",
                    help="if another process is using the run folder, wait for it instead of exiting")
    ru.add_argument("--verbose", action="store_true", help="show Prefect's own logs and full tracebacks")

    st = sub.add_parser("study", help="a study: arms × training seeds through the pipeline, with confidence "
                                      "intervals over training seeds (tdc study studies/digits-claim.yaml)")
    st.add_argument("study", type=Path, help="the study file (YAML: name, arms, seeds)")
    st.add_argument("--dry-run", action="store_true", help="list the replicates and their run folders, run nothing")
    st.add_argument("--out-dir", type=Path, help="where study.{md,json} go (default: studies/<name>)")
    st.add_argument("--summary-only", action="store_true",
                    help="re-derive study.{md,json,png} from <out-dir>/replicates.json (e.g. after adding "
                         "contrasts); runs nothing")
    st.add_argument("--partial", action="store_true",
                    help="with --summary-only: summarise a part-run study over the replicates it has, naming "
                         "the arm × seeds and contrasts not run yet")
    st.add_argument("--add", action="append", default=[], metavar="SOURCE",
                    help="with --summary-only: first copy replicates run elsewhere into <out-dir>/replicates.json, "
                         "each checked against its arm's config (SOURCE: a replicates.json or a study folder, "
                         "optionally :THEIRS=OURS to take arm THEIRS as arm OURS; repeatable)")
    st.add_argument("--verbose", action="store_true", help="show Prefect's own logs and full tracebacks")

    hl = sub.add_parser("headline", help="the headline table, TDC against each baseline, from the committed "
                                         "studies' study.json (tdc headline studies/headline.yaml)")
    hl.add_argument("headline", type=Path, help="the headline file (YAML: rows of baseline, study, arm or contrast)")
    hl.add_argument("--out", type=Path, help="also write the table here (atomically), e.g. studies/RESULTS.md")

    tr = sub.add_parser("train",
                        help="train one model on all timesteps (the baseline; in a TDC run folder, the shared model)")
    config_args(tr)
    tr.add_argument("--out-dir", type=Path,
                    help="run folder (default: runs/<name>-<time>); resumes if it holds a checkpoint")
    tr.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out-dir and start over")
    tr.add_argument("--no-samples", action="store_true", help="do not write samples.png at the end")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")

    pr = sub.add_parser("profile", help="train the probe and profile per-timestep difficulty (TDC step 1)")
    config_args(pr)
    pr.add_argument("--run-dir", type=Path, required=True)

    gr = sub.add_parser("group", help="group timesteps and assign FLOPs budgets (TDC steps 2-3)")
    gr.add_argument("--run-dir", type=Path, required=True)

    fg = sub.add_parser("finetune-group", help="fine-tune one group's expert on its timesteps (TDC step 6)")
    fg.add_argument("--run-dir", type=Path, required=True)
    fg.add_argument("--group", type=int, required=True, help="group index, 0 = the group holding t = 0")
    fg.add_argument("--quiet", action="store_true", help="no progress bar")

    sa = sub.add_parser("sample", help="write a PNG grid of samples from a checkpoint or a TDC run's ensemble")
    src = sa.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a single model's checkpoint")
    src.add_argument("--run-dir", type=Path, help="a TDC run folder: sample from its routed ensemble")
    sa.add_argument("--out", type=Path, default=Path("samples.png"))
    sa.add_argument("--num", type=int, default=None, help="number of samples (default: sample.num_samples)")
    sa.add_argument("--sampler", choices=("ddim", "ddpm"), default=None)
    sa.add_argument("--steps", type=int, default=None, help="respaced sampling steps")
    sa.add_argument("--seed", type=int, default=None)
    sa.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")

    def eval_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--num", type=int, help="samples per seed (default: eval.num_samples); the FID reference "
                        "stays the split the run's eval.num_samples chose (eval.reference=auto), so the scores "
                        "compare with the run's")
        sp.add_argument("--seeds", type=_int_list, help="comma-separated sample seeds (default: eval.seeds)")
        sp.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default: sample.sampler")
        sp.add_argument("--steps", type=int, help="respaced sampling steps (default: sample.steps)")
        sp.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides of the saved config, e.g. eval.inception_weights=/path/inception-2015-12-05.pt")

    fi = sub.add_parser("fid",
                        help="FID/KID (clean-fid) of a checkpoint or a TDC run's ensemble over several sample seeds")
    src = fi.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a single model's checkpoint")
    src.add_argument("--run-dir", type=Path, help="a TDC run folder: evaluate its routed ensemble")
    fi.add_argument("--out-dir", type=Path, help="sample grid and scores (default: <run>/eval)")
    fi.add_argument("--experts", metavar="G[,G...]",
                    help="with --run-dir: only these groups' experts, the run's baseline on every other group's "
                         "timesteps (how much those experts move sample quality); scores go to "
                         "<out>/experts-G-...-eval.json")
    eval_args(fi)

    cm = sub.add_parser("compare", help="TDC ensemble vs the single-model baseline: FID/KID over seeds, sampling "
                                        "and training cost")
    cm.add_argument("--run-dir", type=Path, required=True)
    cm.add_argument("--baseline", type=Path,
                    help="baseline checkpoint (default: <run-dir>/baseline/checkpoints/last.pt; a run with "
                         "baseline.enabled=false and no --baseline is scored alone)")
    cm.add_argument("--out-dir", type=Path, help="table, JSON, plot and sample grids (default: <run-dir>/eval)")
    eval_args(cm)

    co = sub.add_parser("config", help="print the resolved configuration (a dry run)")
    config_args(co)

    im = sub.add_parser("import-iddpm", help="a released openai/improved-diffusion checkpoint as a run folder's "
                                             "stage 1 (then: tdc run --run-dir R)")
    im.add_argument("checkpoint", type=Path, help="IDDPM .pt file (a state dict), e.g. cifar10_uncond_50M_500K.pt")
    im.add_argument("--preset", required=True, help="the preset whose model it is: cifar10 or imagenet64 (any preset "
                                                     "with IDDPM's architecture)")
    im.add_argument("--config", type=Path, help="YAML/JSON file applied on top of the preset")
    im.add_argument("--out-dir", type=Path, required=True, help="the run folder to create")
    im.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.path=DIR")
    return p


class _LineReporter:
    """Prints each message on its own line (evaluation reports per seed, not per step)."""

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        pass

    def progress(self, *, step: int, total: int) -> None:
        pass

    def message(self, text: str) -> None:
        print(f"  {text}", flush=True)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return values


def _fmt_seconds(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _resolve_config(args: argparse.Namespace, run_dir: Path | None, *, check_budgets: bool = False,
                    write: bool = True):
    """The run folder's saved config when it has one (plus any overrides), else preset + file +
    overrides. Saves the result as the folder's config.yaml unless ``write`` is false.

    ``check_budgets``: also refuse FLOPs budgets that pruning cannot reach (for commands that
    start a TDC run: found now rather than after hours of training)."""
    from tdc_core.config import load_config, read_run_config, write_run_config
    from tdc_core.run.layout import RunLayout

    overrides = getattr(args, "overrides", [])
    layout = RunLayout(run_dir) if run_dir is not None else None
    if layout is not None and (layout.config.is_file() or not hasattr(args, "preset")):
        cfg = read_run_config(layout, overrides=overrides)
    else:
        cfg = load_config(preset=args.preset, path=getattr(args, "config", None), overrides=overrides)
    if check_budgets:
        from tdc_core.method.budgets import check_budgets_reachable  # imports torch: only when asked

        check_budgets_reachable(cfg)
    if layout is not None and write:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(layout, cfg)
    return cfg


def _preflight(cfg, run_dir: Path | None, *needs: str, checkpoints: int | None = None) -> None:
    """The checks of :mod:`tdc_core.run.preflight` a stage command needs, before it writes anything."""
    from tdc_core.run.preflight import preflight

    preflight(cfg, run_dir=run_dir, needs=set(needs), checkpoints=checkpoints)


def _warn(text: str) -> None:
    print(f"tdc: warning: {text}", file=sys.stderr, flush=True)


def _hold(run_dir: Path, command: str, *, group: int | None = None, wait: bool = False):  # noqa: ANN202
    """The run folder's lock for a stage command (one owner per run folder)."""
    from tdc_core.run.runlock import hold_run_folder

    return hold_run_folder(run_dir, command=command, group=group, wait=wait, warn=_warn)


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = _resolve_config(args, None, check_budgets=True)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _setup(cfg):
    import torch

    from tdc_core.training.device import resolve_device

    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    return resolve_device(cfg.train.device)


def _cmd_train(args: argparse.Namespace) -> int:
    from tdc_core.config import load_config
    from tdc_core.run.layout import safe_child
    from tdc_core.training.trainer import run_training

    # Under torchrun (DDP) every process runs this; rank 0 alone prints, checkpoints and samples.
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.out_dir is None:
        print("error: under torchrun pass --out-dir: all processes must share one run folder", file=sys.stderr)
        return 2
    preview = (load_config(preset=args.preset, path=args.config, overrides=args.overrides)
               if args.out_dir is None else None)
    out = args.out_dir or safe_child(Path("runs"), f"{preview.name}-{preview.preset}-{datetime.now():%Y%m%d-%H%M%S}")
    cfg = _resolve_config(args, out, write=False)
    if rank != 0:  # rank 0 checked the inputs and holds the folder for the job
        run_training(cfg, run_dir=out, resume=not args.fresh, device=_setup(cfg))
        return 0
    _preflight(cfg, out, "data", "device", "disk", checkpoints=2)  # the checkpoint and its replacement
    with _hold(out, "tdc train"):
        _resolve_config(args, out)  # the folder is ours: write its config
        return _train_rank0(args, cfg, out)


def _train_rank0(args: argparse.Namespace, cfg, out: Path) -> int:
    from tdc_core.model.flops import count_forward_flops
    from tdc_core.model.unet import UNet
    from tdc_core.run.layout import RunLayout
    from tdc_core.training.trainer import load_model, run_training, spec_for

    device = _setup(cfg)
    model = UNet(spec_for(cfg))
    params = sum(p.numel() for p in model.parameters())
    flops = count_forward_flops(model, in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    print(f"TDC · training the {cfg.preset} model on {cfg.data.source} "
          f"({params / 1e6:.2f} M parameters, {flops / 1e6:.1f} MFLOP per image) on {device}")
    print(f"run folder: {out}")
    ckpt = RunLayout(out).shared_checkpoint
    if ckpt.exists() and not args.fresh:
        print(f"resuming from {ckpt}")
    try:
        with _stage_reporter(desc="training", quiet=args.quiet) as reporter:
            result = run_training(cfg, run_dir=out, reporter=reporter, resume=not args.fresh, device=device)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the last checkpoint is kept. Resume with:\n  tdc train --out-dir {out}", file=sys.stderr)
        return 130
    print(f"\ntrained {result.step} steps in {_fmt_seconds(result.seconds)}"
          + (f" (resumed at step {result.resumed_from})" if result.resumed_from else ""))
    print(f"  held-out ε-MSE (EMA)   {result.initial_heldout_loss:.4f} → {result.heldout_loss:.4f}")
    print(f"  last training loss     {result.train_loss:.4f}")
    print(f"  checkpoint             {result.checkpoint}")
    print(f"  config                 {out / 'config.yaml'}")
    if not args.no_samples:
        t0 = time.perf_counter()
        loaded = load_model(result.checkpoint, device=device)
        grid = _write_samples(loaded.model, loaded.config, out=RunLayout(out).samples_png, num=None, sampler=None,
                              steps=None, seed=None, device=device)
        print(f"  samples                {grid}  ({_fmt_seconds(time.perf_counter() - t0)})")
    print(f"\nmore samples: tdc sample --checkpoint {result.checkpoint} --out grid.png")
    return 0


def _cmd_import_iddpm(args: argparse.Namespace) -> int:
    """Map an IDDPM checkpoint onto the preset's model (every key and shape checked) and write it
    as the run folder's stage 1, at step ``train.steps`` (IDDPM's published training length)."""
    from tdc_core.config import load_config, write_run_config
    from tdc_core.errors import ConfigError
    from tdc_core.run.layout import RunLayout
    from tdc_core.training.checkpoint import save_checkpoint
    from tdc_core.training.import_iddpm import imported_checkpoint
    from tdc_core.training.trainer import spec_for

    src = args.checkpoint.resolve()
    cfg = load_config(preset=args.preset, path=args.config,
                      overrides=[*args.overrides, f"train.init_from={src}"])
    layout = RunLayout(args.out_dir)
    if layout.shared_checkpoint.exists():
        raise ConfigError(f"{layout.shared_checkpoint} exists already; choose a new --out-dir (an import "
                          f"never overwrites a run's stage 1)")
    payload = imported_checkpoint(cfg, src, spec=spec_for(cfg))  # reads and checks everything before writing anything
    n = sum(t.numel() for t in payload["model"].values())
    _preflight(cfg, args.out_dir, "disk", checkpoints=1)
    with _hold(args.out_dir, "tdc import-iddpm"):
        write_run_config(layout, cfg)
        save_checkpoint(layout.shared_checkpoint, payload)
    scale = (f"t·1000/{cfg.diffusion.num_timesteps}" if cfg.diffusion.rescale_timesteps else "raw t")
    print(f"TDC · imported {src.name} (sha256 {payload['imported']['sha256'][:16]}…) into the {cfg.preset} model: "
          f"{n:,} parameters in {len(payload['model'])} tensors, every key and shape matched")
    print(f"  output      {'ε and learned Σ (L_hybrid)' if cfg.learn_sigma else 'ε'}; the network sees {scale}")
    print(f"  checkpoint  {layout.shared_checkpoint}  (step {cfg.train.steps:,}: IDDPM's published training, "
          f"charged as such in the cost report; model = EMA = the imported weights)")
    print(f"  config      {layout.config}")
    print("next:")
    print(f"  tdc sample --checkpoint {layout.shared_checkpoint} --out grid.png   # look at the imported model")
    print(f"  tdc run --run-dir {args.out_dir}   # TDC from it: profile, groups, stage 2, baseline, comparison")
    return 0


# The stage commands a person types, by stage of tdc_core.run.outline.STAGES (whose order says
# which one comes next).
_STAGE_COMMANDS = {
    "profile": "tdc profile --run-dir {run_dir}",
    "group": "tdc group --run-dir {run_dir}",
    "shared": "tdc train --out-dir {run_dir}   (shared training)",
    "finetune": "tdc finetune-group --run-dir {run_dir} --group G   (for each group G)",
}


def _next_hint(stage: str, run_dir: Path) -> str:
    """``next: <command>`` for the stage after ``stage``."""
    from tdc_core.run.outline import next_stage

    command = _STAGE_COMMANDS.get(next_stage(stage) or "", "tdc compare --run-dir {run_dir}")
    return "next: " + command.format(run_dir=run_dir)


def _cmd_profile(args: argparse.Namespace) -> int:
    from tdc_core.run.layout import RunLayout
    from tdc_core.run.stages import profile_stage

    cfg = _resolve_config(args, args.run_dir, write=False)
    _preflight(cfg, args.run_dir, "budgets", "data", "device", "disk", checkpoints=2)
    with _hold(args.run_dir, "tdc profile"):
        _resolve_config(args, args.run_dir)
        device = _setup(cfg)
        layout = RunLayout(args.run_dir)
        print(f"TDC · step 1: probe training to step {cfg.profile.profile_steps}, then difficulty profile "
              f"over {cfg.profile.num_buckets} timestep buckets")
        with _stage_reporter(desc="probe", quiet=False) as reporter:
            profile = profile_stage(cfg, layout, reporter=reporter, device=device)
    lm = profile.loss_mean
    print(f"profiled the model at step {profile.model_step} in {_fmt_seconds(profile.seconds)}: "
          f"held-out ε-MSE {lm[0]:.3f} at t≈0 … {lm[-1]:.3f} at t≈T")
    print(f"  {layout.profile_json}\n  {layout.profile_png}")
    print(_next_hint("profile", args.run_dir))
    return 0


def _cmd_group(args: argparse.Namespace) -> int:
    from tdc_core.run.layout import RunLayout
    from tdc_core.run.stages import group_stage

    cfg = _resolve_config(args, args.run_dir, write=False)
    layout = RunLayout(args.run_dir)
    with _hold(args.run_dir, "tdc group"):
        res = group_stage(cfg, layout)
    g = res.grouping
    print(f"TDC · steps 2-3: {g.num_groups} groups by the {g.cost_kind!r} cost, budgets ranked by "
          f"{g.difficulty_measure} (k = {res.plan.k}, F = {res.plan.base_flops / 1e6:.1f} MFLOP)")
    print(f"  {'group':>5}  {'timesteps':>13}  {'difficulty':>10}  {'rank':>4}  {'budget':>7}")
    for b, d in zip(res.plan.budgets, g.difficulty):
        print(f"  {b.group:>5}  {f'[{b.lo}, {b.hi})':>13}  {d:>10.3f}  {b.rank:>4}  {b.fraction:>6.0%} F")
    print(f"  {layout.grouping_json}\n  {layout.budgets_json}\n  {layout.grouping_png}")
    print(_next_hint("group", args.run_dir))
    return 0


def _cmd_finetune_group(args: argparse.Namespace) -> int:
    from tdc_core.run.layout import RunLayout
    from tdc_core.run.stages import finetune_group_stage

    cfg = _resolve_config(args, args.run_dir, write=False)
    layout = RunLayout(args.run_dir)
    _check_group(layout, args.group)
    _preflight(cfg, args.run_dir, "data", "device", "prune")
    with _hold(args.run_dir, f"tdc finetune-group --group {args.group}", group=args.group), \
            _stage_reporter(desc=f"group {args.group}", quiet=args.quiet) as reporter:
        r = finetune_group_stage(cfg, layout, group=args.group, reporter=reporter, device=_setup(cfg))
    print(f"group {r.group}: timesteps [{r.lo}, {r.hi}), rank {r.rank}, {r.steps} steps in {_fmt_seconds(r.seconds)}")
    pruned = f" → pruned {r.heldout_loss_pruned:.4f}" if r.heldout_loss_pruned is not None else ""
    print(f"  held-out ε-MSE on its timesteps: shared {r.heldout_loss_shared:.4f}{pruned} → "
          f"fine-tuned {r.heldout_loss:.4f}")
    print(f"  FLOPs {r.flops / 1e6:.1f} M vs budget {r.budget_flops / 1e6:.1f} M: "
          + ("met" if r.budget_met else "NOT met (prune.enabled=false: the expert keeps full width)")
          + (f"; pruning search cost {r.pruning_flops:.3g} FLOPs" if r.pruned else ""))
    print(f"  {r.checkpoint}")
    return 0


@contextlib.contextmanager
def _stage_reporter(*, desc: str, quiet: bool):  # noqa: ANN202
    """Progress: a live bar on a terminal, else periodic lines; none when ``quiet``."""
    from tasks.progress import StageProgress
    from tdc_core.reporter import NullReporter

    if quiet:
        yield NullReporter()
        return
    with StageProgress(desc) as bar:
        yield bar


def _check_group(layout, group: int) -> None:
    """``--group`` names one of the run's groups (else one line, not a traceback)."""
    from tdc_core.errors import ConfigError
    from tdc_core.run.stages import load_plan

    n = len(load_plan(layout).budgets)
    if not 0 <= group < n:
        raise ConfigError(f"--group={group} does not exist in {layout.root}; allowed: 0..{n - 1}")


def _write_samples(model, cfg, *, out: Path, num: int | None, sampler: str | None, steps: int | None,
                   seed: int | None, device) -> Path:
    from tdc_core.diffusion.gaussian import Diffusion
    from tdc_core.diffusion.samplers import generate
    from tdc_core.evaluation.grids import save_grid

    sc = cfg.sample
    diffusion = Diffusion.from_config(cfg.diffusion).respaced(steps if steps is not None else sc.steps)
    images = generate(model, diffusion, num=num or sc.num_samples, seed=sc.seed if seed is None else seed,
                      batch_size=sc.batch_size, image_shape=(cfg.data.channels, cfg.data.image_size,
                                                             cfg.data.image_size),
                      sampler=sampler or sc.sampler, eta=sc.eta, device=device)
    return save_grid(out, images)


def _cmd_sample(args: argparse.Namespace) -> int:
    from tdc_core.errors import ConfigError
    from tdc_core.run.layout import RunLayout
    from tdc_core.run.stages import assemble_router
    from tdc_core.training.device import resolve_device
    from tdc_core.training.trainer import load_model

    if args.num is not None and args.num < 1:
        raise ConfigError(f"--num must be ≥ 1, got {args.num}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be ≥ 1, got {args.steps}")
    device = resolve_device("auto")
    if args.run_dir is not None:
        cfg = _resolve_config(args, args.run_dir)
        model = assemble_router(RunLayout(args.run_dir), device=device)
        what = f"the routed ensemble of {model.num_groups} experts"
    else:
        loaded = load_model(args.checkpoint, use_ema=not args.raw_weights, device=device)
        model, cfg, what = loaded.model, loaded.config, f"{args.checkpoint}"
    if args.steps is not None and args.steps > cfg.diffusion.num_timesteps:
        raise ConfigError(f"--steps={args.steps} exceeds the model's {cfg.diffusion.num_timesteps} timesteps")
    path = _write_samples(model, cfg, out=args.out, num=args.num, sampler=args.sampler, steps=args.steps,
                          seed=args.seed, device=device)
    print(f"wrote {path} (samples from {what})")
    return 0


def _eval_setup(args: argparse.Namespace, cfg):
    from tdc_core.errors import ConfigError
    from tdc_core.evaluation.results import EvalSetup

    if args.num is not None and args.num < 2:
        raise ConfigError(f"--num must be ≥ 2 (FID needs a covariance), got {args.num}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be ≥ 1, got {args.steps}")
    return EvalSetup.from_config(cfg, num_samples=args.num, seeds=args.seeds, sampler=args.sampler, steps=args.steps)


def _print_scores_header(what: str, setup, device, cfg) -> None:
    from tdc_core.evaluation.features import resolve_cache_dir

    steps = setup.steps if setup.steps is not None else cfg.diffusion.num_timesteps
    print(f"TDC · FID/KID of {what} on {device}: {setup.num_samples} samples × seeds {list(setup.seeds)}, "
          f"{setup.sampler} {steps} steps (reference statistics cache: {resolve_cache_dir(cfg.eval.cache_dir)})")


def _parse_groups(text: str) -> list[int]:
    """``--experts 3,4`` → [3, 4] (parsed as ``--seeds`` is), one clear error otherwise; which
    groups a run has is checked where the run is read."""
    from tdc_core.errors import ConfigError

    try:
        return sorted(set(_int_list(text)))
    except argparse.ArgumentTypeError:
        raise ConfigError(f"--experts {text!r}: allowed: comma-separated group indices, e.g. --experts 3,4") from None


def _cmd_fid(args: argparse.Namespace) -> int:
    from tdc_core.config import apply_overrides, read_run_config
    from tdc_core.errors import ConfigError
    from tdc_core.run.evaluation import evaluate_config
    from tdc_core.run.layout import RunLayout
    from tdc_core.run.stages import assemble_router
    from tdc_core.training.trainer import load_model

    if args.experts is not None and args.run_dir is None:
        raise ConfigError("--experts swaps a TDC run's experts into its baseline: it needs --run-dir, not --checkpoint")
    if args.run_dir is not None:
        layout = RunLayout(args.run_dir)
        cfg = read_run_config(layout, overrides=args.overrides)  # not written back: eval overrides stay local
        device = _setup(cfg)
        if args.experts is None:
            model, name, what = assemble_router(layout, device=device), "tdc", f"the routed ensemble of {args.run_dir}"
        else:
            groups = _parse_groups(args.experts)
            model = assemble_router(layout, device=device, experts=groups, elsewhere=layout.baseline_checkpoint)
            name = "experts-" + "-".join(map(str, groups))
            what = f"the baseline of {args.run_dir} with the experts of groups {groups} on their timesteps"
        out = args.out_dir or layout.eval_dir
    else:
        loaded = load_model(args.checkpoint, device="cpu")
        cfg = apply_overrides(loaded.config, args.overrides, source=f"checkpoint {args.checkpoint}")
        device = _setup(cfg)
        model, name, what = loaded.model.to(device), "model", str(args.checkpoint)
        ckpt_dir = args.checkpoint.parent
        run_root = ckpt_dir.parent if ckpt_dir.name == "checkpoints" else ckpt_dir
        out = args.out_dir or RunLayout(run_root).eval_dir
    setup = _eval_setup(args, cfg)
    _preflight(cfg, None, "data", "features")  # the reference images and the feature extractor
    _print_scores_header(what, setup, device, cfg)
    result, real = evaluate_config(cfg, model=model, name=name, out_dir=out, setup=setup, device=device,
                                   reporter=_LineReporter())
    print(f"features: {result.feature_extractor} ({result.fid_mode}) — {result.comparability}")
    kid = (f"KID {result.kid_mean:.5f} ± {result.kid_std:.5f}" if result.kid_mean is not None
           else "KID not reported (< 2,000 images per seed)")
    print(f"FID {result.fid_mean:.4f} ± {result.fid_std:.4f}   {kid}   "
          f"(mean ± std over {len(result.per_seed)} seeds; {1e3 * result.seconds_per_image:.2f} ms per image)")
    print(f"{real.name} images ({real.num_images}) for scale: FID {real.fid:.4f}"
          + (f", KID {real.kid:.5f}" if real.kid is not None else ""))
    print(f"  {result.grid_png}\n  {out / f'{name}-eval.json'}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from tdc_core.config import read_run_config
    from tdc_core.evaluation.markdown import comparison_markdown
    from tdc_core.run.evaluation import compare_run
    from tdc_core.run.layout import RunLayout

    layout = RunLayout(args.run_dir)
    cfg = read_run_config(layout, overrides=args.overrides)  # not written back: eval overrides stay local
    device = _setup(cfg)
    setup = _eval_setup(args, cfg)
    _preflight(cfg, None, "data", "features")
    # The run's own baseline unless it was run without one: then TDC is scored alone, as it was.
    baseline = args.baseline or (layout.baseline_checkpoint if cfg.baseline.enabled else None)
    _print_scores_header(f"TDC ({args.run_dir})" + (" and its baseline" if baseline else " alone (no baseline)"),
                         setup, device, cfg)
    c = compare_run(cfg, layout, baseline_checkpoint=baseline, out_dir=args.out_dir, setup=setup, device=device,
                    reporter=_LineReporter())
    print()
    print(comparison_markdown(c))
    print(f"  {c.markdown_path}\n  {c.json_path}\n  {c.plot_path}")
    if args.baseline is None and c.baseline is not None and c.heldout:  # the run's own dense run: its curve
        from tdc_core.evaluation.curves import plot_curve
        from tdc_core.records import save_record
        from tdc_core.run.curve import single_model_curve

        curve = single_model_curve(cfg, layout, c, device=device, reporter=_LineReporter())
        out = Path(c.json_path).parent
        save_record(out / "curve.json", curve)
        plot_curve(curve, out / "curve.png", title=f"Single model vs TDC — {layout.root.name}")
        print(f"  {out / 'curve.json'}\n  {out / 'curve.png'}")
    return 0


def _prefect_settings(*, verbose: bool) -> None:
    """Settings of the in-process Prefect API, set before anything imports prefect (it reads its
    logging settings once)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary in-process API needs more than the default 20 s on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if not verbose:
        import logging

        # The console shows the CLI's own lines; Prefect's console handler only warnings (a
        # user error's traceback is removed there, tasks.console.QuietConsole). The flow run's
        # log on the API keeps everything at INFO, stage lines included.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _check_summary_flags(args: argparse.Namespace) -> None:
    """``--partial`` and ``--add`` belong to ``--summary-only``: one clear error otherwise."""
    from tdc_core.errors import ConfigError

    if args.summary_only:
        return
    if args.partial:
        raise ConfigError("--partial summarises the replicates a study has (with --summary-only); a run of the "
                          "study makes all of them")
    if args.add:
        raise ConfigError("--add copies replicates into a study's summary (with --summary-only); a run of the "
                          "study makes its own")


def _cmd_study(args: argparse.Namespace) -> int:
    _prefect_settings(verbose=args.verbose)
    from tdc_core.run.layout import default_run_dir
    from tdc_core.run.study import load_study, replicate_config, study_markdown

    spec = load_study(args.study)  # every replicate's config is built here: a bad override stops now
    from flows.checks import check_before_run
    from flows.study import plan_lines

    _check_summary_flags(args)
    if args.summary_only:
        from flows.study import add_replicates, resummarise

        if args.add:
            print("\n".join(add_replicates(spec, sources=args.add, out_dir=args.out_dir)))
        result = resummarise(spec, out_dir=args.out_dir, partial=args.partial)
        print(study_markdown(result))
        return 0
    print("\n".join(plan_lines(spec)))
    if args.dry_run:
        return 0
    for arm in spec.arms:
        for seed in spec.seeds:
            cfg = replicate_config(arm, seed=seed)
            check_before_run(cfg, run_dir=default_run_dir(cfg).resolve())
    if spec.replicates == "deployment":
        from flows.checks import check_deployment
        from tasks.storage import open_store

        check_deployment(spec.deployment, field="deployment", why=f"study file {args.study}: replicates: deployment "
                         f"submits each replicate as a flow run for a Prefect server's workers")
        open_store(spec.storage).check_writable()
    api_ready = _start_prefect_api_early()
    from flows.study import tdc_study
    from tasks.console import cli_reports_failures

    if not args.verbose:
        cli_reports_failures()
    t0 = time.perf_counter()
    api_ready()
    result = tdc_study(spec, out_dir=str(args.out_dir) if args.out_dir else None)
    out = args.out_dir or Path("studies") / spec.name
    print()
    print(study_markdown(result))
    print(f"finished in {_fmt_seconds(time.perf_counter() - t0)}")
    for name in ("study.md", "study.json", "replicates.json", "study.png", "curves.png"):
        if (out / name).is_file():
            print(f"  {out / name}")
    if not args.verbose:
        _silence_teardown()
    return 0


def _cmd_headline(args: argparse.Namespace) -> int:
    from tdc_core.atomic import atomic_write_bytes
    from tdc_core.errors import ConfigError
    from tdc_core.run.headline import headline_markdown, load_headline
    from tdc_core.run.study import StudySummary

    spec = load_headline(args.headline)
    summaries = {}
    for study in {r.study for r in spec.rows}:
        path = args.headline.parent / study / "study.json"  # beside the headline file, as tdc study writes it
        try:
            summaries[study] = StudySummary.model_validate_json(path.read_text())
        except OSError as exc:
            raise ConfigError(f"headline file {args.headline}: study {study}: {path} cannot be read "
                              f"({exc.strerror}); run `tdc study studies/{study}.yaml` first") from None
        except ValueError as exc:
            raise ConfigError(f"headline file {args.headline}: {path} is not a study summary: {exc}") from None
    text = headline_markdown(spec, summaries, source=str(args.headline))
    print(text, end="")
    if args.out:
        atomic_write_bytes(args.out, text.encode())
        print(f"  {args.out}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    _prefect_settings(verbose=args.verbose)
    from tdc_core.run.layout import default_run_dir

    # Everything the run needs, checked before Prefect's temporary server starts, before any
    # run folder or MLflow run exists: a refused run leaves nothing behind. The config first: it
    # needs no torch (a mistyped key is answered in a second).
    cfg = _resolve_config(args, args.run_dir, write=False)
    root = Path(args.run_dir or default_run_dir(cfg)).resolve()
    from flows.checks import check_before_run

    check_before_run(cfg, run_dir=root)
    with _hold(root, "tdc run", wait=args.wait):
        api_ready = _start_prefect_api_early()
        from flows.pipeline import run_pipeline
        from tasks.console import cli_reports_failures
        from tasks.run_report import render_report

        if not args.verbose:
            cli_reports_failures()

        evaluation = ("" if not cfg.eval.enabled else " → evaluation" if cfg.baseline.enabled
                      else " → evaluation of TDC alone")
        print(f"TDC · full pipeline on the {cfg.preset} preset: profile → group → shared training → "
              f"{cfg.grouping.num_groups} group fine-tunes → costs" + (" → baseline" if cfg.baseline.enabled else "")
              + evaluation)
        print(f"run folder: {root}")
        t0 = time.perf_counter()
        api_ready()
        summary = run_pipeline(cfg, run_dir=str(root), workers=args.workers)
    markdown, _ = render_report(summary.model_dump(mode="json"))
    print()
    print(markdown)
    print(f"finished in {_fmt_seconds(time.perf_counter() - t0)}")
    uri = summary.tracking_uri
    # MLflow 3's UI opens in its GenAI view unless asked for the model-training one.
    print(f"MLflow UI:  uv run mlflow ui --backend-store-uri {uri}   then open "
          f"http://127.0.0.1:5000/#/experiments/{summary.experiment_id}?workflowType=machine_learning")
    if not args.verbose:
        _silence_teardown()
    return 0


def _start_prefect_api_early():  # noqa: ANN202 - returns a join function
    """Without ``PREFECT_API_URL``, Prefect starts a temporary API server (a subprocess: 8-13 s
    on 2 cores) when the flow begins. Starting it in a thread now overlaps that with imports,
    config checks and MLflow's start. Returns a function that waits for it; a failure there is
    left for the flow's own start to report."""
    import threading

    if os.environ.get("PREFECT_API_URL"):
        return lambda: None

    def start() -> None:
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_ENABLED

        if PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            with contextlib.suppress(Exception):
                SubprocessASGIServer().start()

    thread = threading.Thread(target=start, name="prefect-api-start", daemon=True)
    thread.start()
    return thread.join


def _silence_teardown() -> None:
    """Prefect 3.9's temporary in-process API prints CancelledError tracebacks while it shuts
    down after a successful run; everything the user needs is printed by now, so stderr is
    closed for the interpreter's teardown (use --verbose to see it)."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)


_COMMANDS = {
    "run": _cmd_run, "study": _cmd_study, "headline": _cmd_headline,
    "train": _cmd_train, "sample": _cmd_sample, "config": _cmd_config, "profile": _cmd_profile,
    "group": _cmd_group, "finetune-group": _cmd_finetune_group, "fid": _cmd_fid, "compare": _cmd_compare,
    "import-iddpm": _cmd_import_iddpm,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives a positional list one run of words: `import-iddpm CKPT --out-dir R k=v` leaves
    # the overrides after the options unparsed. key=value words are overrides wherever they stand.
    if extra and hasattr(args, "overrides") and all("=" in w and not w.startswith("-") for w in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from tdc_core.errors import TDCError

    try:
        return _COMMANDS[args.command](args)
    except TDCError as exc:
        if getattr(args, "verbose", False):
            import traceback

            traceback.print_exc()
        print(f"tdc {args.command}: error: {exc}", file=sys.stderr, flush=True)
        if args.command in ("run", "study") and not getattr(args, "verbose", False):
            _silence_teardown()  # Prefect's temporary server may print while it shuts down
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
