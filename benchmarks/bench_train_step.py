"""Shared-training throughput: the real ``Trainer`` step, plain fp32 eager vs the fast paths.

    uv run python -m benchmarks.bench_train_step                       # CPU: digits model
    uv run python -m benchmarks.bench_train_step --preset imagenet64 --batch 128   # one GPU

Variants (each a fresh Trainer, same model and batch, measured in one process):
  fp32-eager        precision=fp32, contiguous, no compile: the plain reference
  bf16              bf16 autocast (CUDA only: on CPU, autocast bf16 is slower than fp32)
  bf16+nhwc         + channels_last
  bf16+nhwc+compile + torch.compile of the training forward pass
(on CPU: fp32-eager, fp32+nhwc, fp32+compile).

Phase 1 times the eager variants: warm-up calls of each, then ``--repeats`` rounds in
alternating order, each call ``--steps`` optimizer steps. Phase 2 (the compiled variant, whose
first call compiles for minutes) builds and warms it, then times it in alternating rounds against
the eager variants again, so "vs fp32 eager" is always from the same rounds. Results are written
to ``--json`` after each phase, so a run stopped during compilation keeps phase 1.
Printed per variant: median step time and spread, images/s, model-FLOPs utilisation (forward +
backward FLOPs counted by FlopCounterMode, over the median step time, against ``--peak-tflops``),
speed-up over fp32-eager in the same rounds, and peak GPU memory of the variant alone (the
call's peak above what was allocated before it, plus the variant's own resident state: weights,
EMA, gradients, optimizer state, on-device data; other variants' state is not counted).
The targets (issue 7): ≥ 40 % MFU and ≥ 3× fp32 eager on the ImageNet-64 config at batch 128 on
one H200, within 80 GB.
"""

from __future__ import annotations

import argparse
import gc

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._common import Timing, alternating_medians, bench_config, machine, table, write_json
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.model.flops import count_forward_flops
from tdc_core.training.trainer import Trainer, TrainPlan, init_model, spec_for

MFU_TARGET, SPEEDUP_TARGET, MEMORY_TARGET_GB = 0.40, 3.0, 80.0


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
    return Trainer(model=init_model(spec_for(cfg), seed=cfg.train.seed), diffusion=Diffusion.from_config(cfg.diffusion),
                   config=cfg, plan=TrainPlan.dense(cfg).replace(random_flip=False),  # no flips, as timed so far
                   train_images=images, heldout_images=images[:batch])


class Arm:
    """One variant: its trainer, resident memory and the peak memory of its calls (CUDA)."""

    def __init__(self, name: str, trainer: Trainer, steps: int) -> None:
        self.name, self.trainer, self.steps = name, trainer, steps
        self.cuda = trainer.device.type == "cuda"
        self.resident = 0
        self.peak: int | None = None

    def __call__(self) -> None:
        before = torch.cuda.memory_allocated() if self.cuda else 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(self.steps):
            self.trainer._train_step()
        if self.cuda:
            torch.cuda.synchronize()
            own = torch.cuda.max_memory_allocated() - before + self.resident
            self.peak = max(self.peak or 0, own)


def build(name: str, overrides: list[str], args: argparse.Namespace, batch: int, *,
          compile_backend: str = "inductor") -> Arm:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    before = torch.cuda.memory_allocated() if cuda else 0
    trainer = make_trainer(args.preset, batch, overrides)
    if compile_backend != "inductor":
        # train.compile=true wrapped the module with the default backend, lazily (nothing is
        # compiled before the first call); wrap the same module with the asked-for backend instead.
        trainer.train_model = torch.compile(trainer.train_model._orig_mod, backend=compile_backend)
    arm = Arm(name, trainer, args.steps)
    if cuda:
        arm.trainer._train_step()  # allocates gradients and optimizer state: part of the variant's state
        torch.cuda.synchronize()
        arm.resident = torch.cuda.memory_allocated() - before
    return arm


def rows_for(arms: dict[str, Arm], times: dict[str, Timing], *, batch: int, steps: int, flops: float,
             peak_tflops: float, cuda: bool) -> tuple[list[list[object]], dict[str, dict[str, object]]]:
    rows, record = [], {}
    base = times["fp32-eager"].median
    for name, t in times.items():
        step = t.median / steps
        ips = batch / step
        mfu = flops * ips / (peak_tflops * 1e12)
        peak = arms[name].peak / 2**30 if arms[name].peak is not None else None
        lo, hi = (1e3 * x / steps for x in t.spread)
        rows.append([name, f"{step * 1e3:.1f} ms", f"{lo:.1f}–{hi:.1f} ms",
                     f"{ips:,.0f}", f"{100 * mfu:.1f} %" if cuda else "n/a (CPU)", f"{base / t.median:.2f}×",
                     f"{peak:.1f} GiB" if peak is not None else "n/a (CPU)"])
        record[name] = {"step_s": t.summary(1 / steps), "images_per_s": ips, "mfu": mfu if cuda else None,
                        "speedup_vs_fp32_eager": base / t.median, "peak_memory_gib": peak}
    return rows, record


HEADERS = ["variant", "step (median)", "spread (min–max)", "images/s", "MFU", "vs fp32 eager", "peak memory"]


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="digits")
    ap.add_argument("--batch", type=int, default=None, help="default: the preset's train.batch_size")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per timed call")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls of every variant first")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds, alternating order")
    ap.add_argument("--peak-tflops", type=float, default=790.0,
                    help="dense bf16 peak for MFU (H200 measured ≈790; fp32 variants use the same peak)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled variant (phase 2)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of phase 2 (default inductor, what train.compile=true uses; "
                         "the CPU dry run passes eager: dynamo's tracing of the same step without minutes of "
                         "C++ code generation)")
    ap.add_argument("--json", default=None, help="write the results here as JSON (after each phase)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    batch = args.batch or bench_config(args.preset).train.batch_size
    eager = {"fp32-eager": ["train.precision=fp32", "train.channels_last=false"]}
    if cuda:
        eager |= {"bf16": ["train.precision=bf16", "train.channels_last=false"],
                  "bf16+nhwc": ["train.precision=bf16", "train.channels_last=true"]}
        compiled = ("bf16+nhwc+compile", ["train.precision=bf16", "train.channels_last=true", "train.compile=true"])
    else:
        eager["fp32+nhwc"] = ["train.precision=fp32", "train.channels_last=true"]
        compiled = ("fp32+compile", ["train.precision=fp32", "train.channels_last=false", "train.compile=true"])

    print(f"machine: {machine()}")
    print(f"preset {args.preset}, batch {batch}, {args.steps} steps per call, warm-up {args.warmup} calls, "
          f"{args.repeats} alternating rounds (median)", flush=True)
    arms = {name: build(name, ov, args, batch) for name, ov in eager.items()}
    first = arms["fp32-eager"].trainer
    params = sum(p.numel() for p in first.model.parameters())
    flops = training_flops_per_image(first)
    fwd = count_forward_flops(first.model, in_channels=first.config.data.channels,
                              image_size=first.config.data.image_size)
    print(f"model: {params / 1e6:.2f} M parameters, {fwd / 1e9:.3f} GFLOP forward, "
          f"{flops / 1e9:.3f} GFLOP forward+backward per image", flush=True)
    record: dict[str, object] = {"benchmark": "train_step", "preset": args.preset, "batch": batch, "steps": args.steps,
                                 "warmup": args.warmup, "repeats": args.repeats, "peak_tflops": args.peak_tflops,
                                 "params": params, "forward_flops_per_image": fwd, "train_flops_per_image": flops,
                                 "device": str(first.device), "phases": {}}

    def progress(name: str, r: int, secs: float) -> None:
        print(f"  round {r + 1}: {name}: {1e3 * secs / args.steps:.1f} ms/step", flush=True)

    times = alternating_medians(arms, device=first.device, warmup=args.warmup, repeats=args.repeats, on_time=progress)
    rows, rec = rows_for(arms, times, batch=batch, steps=args.steps, flops=flops, peak_tflops=args.peak_tflops,
                         cuda=cuda)
    print("\nphase 1: eager variants")
    print(table(HEADERS, rows), flush=True)
    record["phases"]["eager"] = rec
    write_json(args.json, record)

    if not args.no_compile:
        name, ov = compiled
        if args.compile_backend != "inductor":
            name = f"{name}[{args.compile_backend}]"
        print(f"\nphase 2: {name} (compiling in its warm-up), against the eager variants in the same rounds",
              flush=True)
        for other in [n for n in arms if n not in ("fp32-eager", "bf16+nhwc", "fp32+nhwc")]:
            del arms[other]  # keep the reference and the best eager layout: fewer calls per round
        gc.collect()
        arms[name] = build(name, ov, args, batch, compile_backend=args.compile_backend)
        times = alternating_medians(arms, device=first.device, warmup=args.warmup, repeats=args.repeats,
                                    on_time=progress)
        rows, rec = rows_for(arms, times, batch=batch, steps=args.steps, flops=flops, peak_tflops=args.peak_tflops,
                             cuda=cuda)
        print(f"\nphase 2: {name} and the eager references")
        print(table(HEADERS, rows))
        record["phases"]["compile"] = rec
    best = max(((ph, n, v) for ph, vs in record["phases"].items() for n, v in vs.items()),
               key=lambda x: x[2]["images_per_s"])
    record["best"] = {"phase": best[0], "variant": best[1], **best[2]}
    if cuda:
        mfu, speed = best[2]["mfu"], best[2]["speedup_vs_fp32_eager"]
        default = record["phases"]["eager"].get("bf16+nhwc", {})  # what the pipeline trains with on CUDA
        mem = default.get("peak_memory_gib")
        record["targets"] = {"mfu_met": mfu >= MFU_TARGET, "speedup_met": speed >= SPEEDUP_TARGET,
                             "default_variant_peak_gib": mem,
                             "memory_met": mem is not None and mem * 2**30 <= MEMORY_TARGET_GB * 1e9}
        print(f"\nfastest: {best[1]}: MFU {100 * mfu:.1f} % (target ≥ {100 * MFU_TARGET:.0f} %), "
              f"{speed:.2f}× fp32 eager (target ≥ {SPEEDUP_TARGET:g}×); bf16+nhwc (the pipeline's CUDA default) "
              f"peak {mem:.1f} GiB (target ≤ 80 GB = 74.5 GiB)")
    write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
