"""The ``tdc`` command.

    tdc train  [--preset digits] [--config FILE] [--out-dir DIR] [key=value ...]
    tdc sample --checkpoint PATH [--out grid.png] [--num 64] [--sampler ddim] [--steps 50]
    tdc config [--preset digits] [--config FILE] [key=value ...]   # print the resolved config

Bad input (config, data, checkpoints) prints one line naming the field or file and exits 2;
an interrupted training run says how to resume it.
"""

from __future__ import annotations

import argparse
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
        sp.add_argument("--preset", default="digits", help="named preset: smoke, digits, cifar10, imagenet64 (default: digits)")
        sp.add_argument("--config", type=Path, help="YAML/JSON file applied on top of the preset")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=2e-4")

    tr = sub.add_parser("train", help="train a single model on all timesteps (the baseline)")
    config_args(tr)
    tr.add_argument("--out-dir", type=Path, help="run folder (default: runs/<name>-<time>); resumes if it holds a checkpoint")
    tr.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out-dir and start over")
    tr.add_argument("--no-samples", action="store_true", help="do not write samples.png at the end")

    sa = sub.add_parser("sample", help="write a PNG grid of samples from a checkpoint")
    sa.add_argument("--checkpoint", type=Path, required=True)
    sa.add_argument("--out", type=Path, default=Path("samples.png"))
    sa.add_argument("--num", type=int, default=None, help="number of samples (default: sample.num_samples)")
    sa.add_argument("--sampler", choices=("ddim", "ddpm"), default=None)
    sa.add_argument("--steps", type=int, default=None, help="respaced sampling steps")
    sa.add_argument("--seed", type=int, default=None)
    sa.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")

    co = sub.add_parser("config", help="print the resolved configuration (a dry run)")
    config_args(co)
    return p


class _ProgressReporter:
    """Shows training progress as a tqdm bar with the latest loss."""

    def __init__(self, *, desc: str) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.desc = desc
        self.bar = None
        self.last: dict[str, float] = {}

    def progress(self, *, step: int, total: int) -> None:
        if self.bar is None:
            self.bar = self._tqdm(total=total, initial=step, desc=self.desc, unit="step", dynamic_ncols=True,
                                  disable=None)
        self.bar.n = step
        self.bar.refresh() if step == total else None
        self.bar.update(0)

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        self.last.update(metrics)
        if self.bar is not None:
            shown = {k: f"{v:.4f}" for k, v in metrics.items() if k in ("loss", "heldout_loss")}
            if "images_per_sec" in metrics:
                shown["img/s"] = f"{metrics['images_per_sec']:.0f}"
            self.bar.set_postfix(shown, refresh=False)

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_seconds(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from tdc_core.config import load_config

    cfg = load_config(preset=args.preset, path=args.config, overrides=args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import torch
    import yaml

    from tdc_core.checkpoint import atomic_write_bytes
    from tdc_core.config import load_config
    from tdc_core.device import resolve_device
    from tdc_core.flops import count_forward_flops
    from tdc_core.train import load_model, run_training, spec_for
    from tdc_core.unet import UNet

    cfg = load_config(preset=args.preset, path=args.config, overrides=args.overrides)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    out = args.out_dir or Path("runs") / f"{cfg.name}-{cfg.preset}-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).encode())
    device = resolve_device(cfg.train.device)
    model = UNet(spec_for(cfg))
    params = sum(p.numel() for p in model.parameters())
    flops = count_forward_flops(model, in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    print(f"TDC · training the {cfg.preset} model on {cfg.data.source} "
          f"({params / 1e6:.2f} M parameters, {flops / 1e6:.1f} MFLOP per image) on {device}")
    print(f"run folder: {out}")
    ckpt = out / "checkpoints" / "last.pt"
    if ckpt.exists() and not args.fresh:
        print(f"resuming from {ckpt}")
    reporter = _ProgressReporter(desc="train")
    try:
        result = run_training(cfg, run_dir=out, reporter=reporter, resume=not args.fresh, device=device)
    except KeyboardInterrupt:
        reporter.close()
        print(f"\ninterrupted; the last checkpoint is kept. Resume with:\n  tdc train --out-dir {out}"
              f"{' --config ' + str(args.config) if args.config else ''} --preset {args.preset} "
              + " ".join(args.overrides), file=sys.stderr)
        return 130
    reporter.close()
    print(f"\ntrained {result.step} steps in {_fmt_seconds(result.seconds)}"
          + (f" (resumed at step {result.resumed_from})" if result.resumed_from else ""))
    print(f"  held-out ε-MSE (EMA)   {result.initial_heldout_loss:.4f} → {result.heldout_loss:.4f}")
    print(f"  last training loss     {result.train_loss:.4f}")
    print(f"  checkpoint             {result.checkpoint}")
    print(f"  config                 {out / 'config.yaml'}")
    if not args.no_samples:
        t0 = time.perf_counter()
        grid = _write_samples(load_model(result.checkpoint, device=device), out=out / "samples.png",
                              num=None, sampler=None, steps=None, seed=None, device=device)
        print(f"  samples                {grid}  ({_fmt_seconds(time.perf_counter() - t0)})")
    print(f"\nmore samples: tdc sample --checkpoint {result.checkpoint} --out grid.png")
    return 0


def _write_samples(loaded, *, out: Path, num: int | None, sampler: str | None, steps: int | None,
                   seed: int | None, device) -> Path:
    import torch

    from tdc_core.data import to_uint8
    from tdc_core.diffusion import Diffusion
    from tdc_core.images import save_grid
    from tdc_core.samplers import sample

    cfg = loaded.config
    sc = cfg.sample
    num = num or sc.num_samples
    diffusion = Diffusion.from_config(cfg.diffusion).respaced(steps if steps is not None else sc.steps)
    gen = torch.Generator().manual_seed(sc.seed if seed is None else seed)
    chunks = []
    for start in range(0, num, sc.batch_size):
        n = min(sc.batch_size, num - start)
        x = sample(loaded.model, diffusion, shape=(n, cfg.data.channels, cfg.data.image_size, cfg.data.image_size),
                   generator=gen, sampler=sampler or sc.sampler, eta=sc.eta, device=device)
        chunks.append(to_uint8(x.cpu()))
    return save_grid(out, torch.cat(chunks))


def _cmd_sample(args: argparse.Namespace) -> int:
    from tdc_core.device import resolve_device
    from tdc_core.errors import ConfigError
    from tdc_core.train import load_model

    if args.num is not None and args.num < 1:
        raise ConfigError(f"--num must be ≥ 1, got {args.num}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be ≥ 1, got {args.steps}")
    device = resolve_device("auto")
    loaded = load_model(args.checkpoint, use_ema=not args.raw_weights, device=device)
    if args.steps is not None and args.steps > loaded.config.diffusion.num_timesteps:
        raise ConfigError(f"--steps={args.steps} exceeds the model's {loaded.config.diffusion.num_timesteps} timesteps")
    path = _write_samples(loaded, out=args.out, num=args.num, sampler=args.sampler, steps=args.steps,
                          seed=args.seed, device=device)
    print(f"wrote {path}")
    return 0


_COMMANDS = {"train": _cmd_train, "sample": _cmd_sample, "config": _cmd_config}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tdc_core.errors import TDCError

    try:
        return _COMMANDS[args.command](args)
    except TDCError as exc:
        print(f"tdc {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
