"""Shared-training throughput: the real ``Trainer`` step, plain fp32 eager vs the fast paths.

    uv run python -m benchmarks.bench_train_step                       # CPU: digits model
    uv run python -m benchmarks.bench_train_step --preset imagenet64 --batch 128   # one GPU

Variants (each a fresh Trainer, same model and batch, measured in one run):
  fp32-eager        precision=fp32, contiguous, no compile: the plain reference
  bf16              bf16 autocast (CUDA only: on CPU, autocast bf16 is slower than fp32)
  bf16+nhwc         + channels_last
  bf16+nhwc+compile + torch.compile of the training forward pass
Printed per variant: median step time, images/s, model-FLOPs utilisation (FLOPs of forward +
backward counted by FlopCounterMode, over the measured step time, against ``--peak-tflops``),
speed-up over fp32-eager, and peak GPU memory. The target (issue 7): ≥ 40 % MFU and ≥ 3× fp32
eager on the ImageNet-64 config at batch 128 on one H200, within 80 GB.
"""

from __future__ import annotations

import argparse
import gc

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._common import bench_config, machine, median_seconds, table
from tdc_core.diffusion import Diffusion
from tdc_core.flops import count_forward_flops
from tdc_core.train import Trainer, spec_for


def training_flops_per_image(trainer: Trainer) -> float:
    """Forward + backward FLOPs of one training image (counted on a batch of 2, fp32)."""
    model = trainer.model
    cfg = trainer.config
    x = torch.randn(2, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, device=trainer.device)
    t = torch.randint(0, 1000, (2,), device=trainer.device)
    with FlopCounterMode(display=False) as counter:
        model(x, t).square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def make_trainer(preset: str, batch: int, overrides: list[str]) -> Trainer:
    cfg = bench_config(preset, [f"train.batch_size={batch}", "profile.profile_steps=0", *overrides])
    size, ch = cfg.data.image_size, cfg.data.channels
    # Synthetic uint8 images of the configured shape: the step's cost does not depend on content,
    # and a benchmark must not need the dataset on disk.
    images = torch.randint(0, 256, (max(4 * batch, 512), ch, size, size), dtype=torch.uint8)
    return Trainer(spec=spec_for(cfg), diffusion=Diffusion.from_config(cfg.diffusion), train=cfg.train,
                   train_images=images, heldout_images=images[:batch], config=cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="digits")
    ap.add_argument("--batch", type=int, default=None, help="default: the preset's train.batch_size")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=790.0,
                    help="dense bf16 peak for MFU (H200 measured ≈790; fp32 variants use the same peak)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    batch = args.batch or bench_config(args.preset).train.batch_size
    variants = {"fp32-eager": ["train.precision=fp32", "train.channels_last=false"]}
    if cuda:
        variants |= {"bf16": ["train.precision=bf16", "train.channels_last=false"],
                     "bf16+nhwc": ["train.precision=bf16", "train.channels_last=true"]}
        if not args.no_compile:
            variants["bf16+nhwc+compile"] = ["train.precision=bf16", "train.channels_last=true", "train.compile=true"]
    else:
        variants["fp32+nhwc"] = ["train.precision=fp32", "train.channels_last=true"]
        if not args.no_compile:
            variants["fp32+compile"] = ["train.precision=fp32", "train.channels_last=false", "train.compile=true"]

    print(f"machine: {machine()}")
    print(f"preset {args.preset}, batch {batch}, {args.steps} steps × {args.repeats} repeats (median)")
    rows, base_time, flops = [], None, None
    for name, overrides in variants.items():
        trainer = make_trainer(args.preset, batch, overrides)
        if flops is None:
            params = sum(p.numel() for p in trainer.model.parameters())
            flops = training_flops_per_image(trainer)
            fwd = count_forward_flops(trainer.model, in_channels=trainer.config.data.channels,
                                      image_size=trainer.config.data.image_size)
            print(f"model: {params / 1e6:.2f} M parameters, {fwd / 1e9:.3f} GFLOP forward, "
                  f"{flops / 1e9:.3f} GFLOP forward+backward per image")
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def steps(trainer: Trainer = trainer) -> None:
            for _ in range(args.steps):
                trainer._train_step()

        secs = median_seconds(steps, device=trainer.device, warmup=2, repeats=args.repeats) / args.steps
        base_time = base_time or secs
        ips = batch / secs
        mfu = flops * ips / (args.peak_tflops * 1e12)
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "n/a (CPU)"
        rows.append([name, f"{secs * 1e3:.1f} ms", f"{ips:,.0f}", f"{100 * mfu:.1f} %" if cuda else "n/a (CPU)", f"{base_time / secs:.2f}×", peak])
        print(f"  {name}: {secs * 1e3:.1f} ms/step", flush=True)
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    print()
    print(table(["variant", "step", "images/s", "MFU", "vs fp32 eager", "peak memory"], rows))


if __name__ == "__main__":
    main()
