"""Anchors: parameters and FLOPs of a preset's dense UNet, counted on the meta device.

    uv run python -m benchmarks.anchors                       # the IDDPM ImageNet-64 UNet
    uv run python -m benchmarks.anchors --presets digits,imagenet64

The model is built on torch's ``meta`` device (shapes only: no memory, no arithmetic), and
``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs (multiply-add = 2) of one forward
pass, and of one forward + backward pass of a scalar loss, on a batch of 2; the per-image
numbers are those divided by 2. Also printed: the step time a given MFU allows at a batch on a
given peak (the issue's 40 % of 790 TFLOP/s on one H200, batch 128), which is what the training
benchmark's MFU column is judged against. Runs on a CPU in seconds.
"""

from __future__ import annotations

import argparse
from functools import cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._common import bench_config, table, write_json
from tdc_core.model.unet import UNet
from tdc_core.training.trainer import spec_for


@cache
def count(preset: str, *, batch: int = 2) -> dict[str, float]:
    """Parameters, forward and forward + backward FLOPs per image of ``preset``'s dense UNet."""
    cfg = bench_config(preset)
    with torch.device("meta"):
        model = UNet(spec_for(cfg))
        x = torch.empty(batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        t = torch.zeros(batch, dtype=torch.long)
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as fwd:
        model(x, t)
    with FlopCounterMode(display=False) as both:
        model(x, t).float().square().mean().backward()
    return {"preset": preset, "image_size": cfg.data.image_size, "params": params,
            "forward_flops_per_image": fwd.get_total_flops() / batch,
            "train_flops_per_image": both.get_total_flops() / batch}


def step_time_bound(train_flops_per_image: float, *, batch: int, mfu: float, peak_tflops: float) -> float:
    """Seconds per training step at which ``batch`` images reach ``mfu`` of ``peak_tflops``."""
    return batch * train_flops_per_image / (mfu * peak_tflops * 1e12)


def _giga(flops: float) -> str:
    return f"{flops / 1e9:.2f} G" if flops >= 1e9 else f"{flops / 1e9:.4f} G"


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="imagenet64", help="comma-separated presets")
    ap.add_argument("--batch", type=int, default=128, help="training batch of the step-time bound")
    ap.add_argument("--mfu", type=float, default=0.40)
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="H200 dense bf16, as measured by the issue")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)
    rows, out = [], []
    for preset in args.presets.split(","):
        a = dict(count(preset))
        bound = step_time_bound(a["train_flops_per_image"], batch=args.batch, mfu=args.mfu,
                                peak_tflops=args.peak_tflops)
        a["step_time_bound_s"] = bound
        out.append(a)
        rows.append([preset, f"{a['params'] / 1e6:.2f} M", _giga(a["forward_flops_per_image"]),
                     _giga(a["train_flops_per_image"]), f"{1e3 * bound:.3g} ms ({args.batch / bound:,.0f} images/s)"])
    print("counted on the meta device with torch.utils.flop_counter.FlopCounterMode (multiply-add = 2)")
    print(table(["preset (dense UNet)", "parameters", "forward FLOPs / image", "forward + backward FLOPs / image",
                 f"step at {100 * args.mfu:.0f} % MFU of {args.peak_tflops:g} TFLOP/s, batch {args.batch}"], rows))
    record = {"benchmark": "anchors", "batch": args.batch, "mfu": args.mfu, "peak_tflops": args.peak_tflops,
              "models": out}
    write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
