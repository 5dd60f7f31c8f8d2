"""DDP shared training on every visible GPU (NCCL), or on CPU processes (gloo): the training
code path under ``torchrun``, checked and timed.

    uv run python -m benchmarks.bench_ddp --processes 2 --device cuda     # a machine with ≥ 2 GPUs
    uv run python -m benchmarks.bench_ddp --processes 2 --device cpu      # gloo, for the CPU dry run

It launches ``torchrun --standalone --nproc_per_node=N`` on itself. Every process builds the
same ``Trainer`` (the pipeline's, the global batch split between ranks) on synthetic images and:
  1. trains ``--steps`` steps straight;
  2. trains ``--resume-at`` steps, checkpoints, builds a fresh trainer, resumes, trains to
     ``--steps`` — the kill-and-resume path;
  3. times ``--timed-steps`` more steps of the straight trainer after ``--warmup-steps``
     (synchronised; rank 0's clock; global images/s).
Rank 0 then compares every rank's final weights (DDP keeps them identical) and each resumed
run's with its straight run's, and reports the largest absolute difference of each (0 = bit for
bit: on CUDA, cuDNN's non-deterministic kernels may make a resume differ in the last bits), and
the throughput. The launcher itself imports no torch on CPU (a dry run's cost is mostly imports).
A CUDA job with more processes than visible GPUs is refused before it starts
(``tdc_core.training.distributed.check_gpus_for_processes``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import bench_config, machine, table, write_json

ROOT = Path(__file__).resolve().parents[1]


def _trainer(args: argparse.Namespace):  # noqa: ANN202 - Trainer
    import torch

    from tdc_core.diffusion.gaussian import Diffusion
    from tdc_core.training.trainer import Trainer, TrainPlan, init_model, spec_for

    cfg = bench_config(args.preset, [f"train.batch_size={args.batch}", "profile.profile_steps=0",
                                     f"train.device={args.device}", f"train.steps={args.steps}",
                                     f"train.checkpoint_every={args.steps}", f"train.log_every={args.steps}",
                                     f"train.heldout_every={args.steps}"])
    size, ch = cfg.data.image_size, cfg.data.channels
    gen = torch.Generator().manual_seed(0)  # every rank holds the same dataset
    images = torch.randint(0, 256, (max(4 * args.batch, 256), ch, size, size), dtype=torch.uint8, generator=gen)
    return Trainer(model=init_model(spec_for(cfg), seed=cfg.train.seed), diffusion=Diffusion.from_config(cfg.diffusion),
                   config=cfg, plan=TrainPlan.dense(cfg).replace(random_flip=False),  # no flips, as timed so far
                   train_images=images, heldout_images=images[:args.batch])


def worker(args: argparse.Namespace) -> None:
    """One rank of the torchrun job; rank 0 writes the comparison to ``<out>/summary.json``."""
    import json

    import torch
    import torch.distributed as dist

    out = Path(args.out)
    if args.device == "cpu":
        torch.set_num_threads(1)
    straight = _trainer(args)
    rank, world = straight.dist.rank, straight.dist.world_size
    straight.fit(until_step=args.steps, checkpoint_path=out / "a.pt")
    straight_weights = {k: v.detach().cpu().clone() for k, v in straight.model.state_dict().items()}
    first = _trainer(args)
    first.fit(until_step=args.resume_at, checkpoint_path=out / "b.pt")
    del first
    resumed = _trainer(args)
    resumed.resume(out / "b.pt")
    resumed.fit(until_step=args.steps, checkpoint_path=out / "b.pt")
    sync = torch.cuda.synchronize if straight.device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup_steps):
        straight._train_step()
    sync()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.timed_steps):
        straight._train_step()
    sync()
    dist.barrier()
    step_s = (time.perf_counter() - t0) / max(1, args.timed_steps)
    torch.save({"rank": rank, "world": world, "local_batch": straight.local_batch, "device": str(straight.device),
                "straight": straight_weights,
                "resumed": {k: v.detach().cpu() for k, v in resumed.model.state_dict().items()},
                "step_s": step_s}, out / f"result-{rank}.pt")
    dist.barrier()
    if rank == 0:
        results = [torch.load(out / f"result-{r}.pt", weights_only=True) for r in range(world)]
        summary = {"world": world, "device": str(straight.device), "local_batch": straight.local_batch,
                   "ranks_max_abs_diff": max(max_abs_diff(results[0]["straight"], r["straight"]) for r in results),
                   "resume_max_abs_diff": max(max_abs_diff(r["straight"], r["resumed"]) for r in results),
                   "step_s": step_s}
        (out / "summary.json").write_text(json.dumps(summary))
    dist.barrier()
    dist.destroy_process_group()


def max_abs_diff(a: dict, b: dict) -> float:
    """The largest |a − b| over every tensor of two state dicts."""
    return max(float((x.double() - b[k].double()).abs().max()) if x.numel() else 0.0 for k, x in a.items())


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=None, help="default: every visible GPU")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--batch", type=int, default=16, help="global batch (split between the processes)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--resume-at", type=int, default=4)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--timed-steps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.device == "cuda":
        import torch

        from tdc_core.training.distributed import check_gpus_for_processes

        n = args.processes or torch.cuda.device_count()
        check_gpus_for_processes(n)
    else:
        n = args.processes or 2
    out = Path(tempfile.mkdtemp(prefix="tdc-ddp-"))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "benchmarks.bench_ddp", "--worker", "--out", str(out), "--device", args.device,
           "--preset", args.preset, "--batch", str(args.batch), "--steps", str(args.steps),
           "--resume-at", str(args.resume_at), "--warmup-steps", str(args.warmup_steps),
           "--timed-steps", str(args.timed_steps)]
    print(f"machine: {machine()}\nDDP: {n} processes on {args.device} ({'NCCL' if args.device == 'cuda' else 'gloo'}), "
          f"preset {args.preset}, global batch {args.batch}, {args.steps} steps; resume at {args.resume_at}",
          flush=True)
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode:
        raise SystemExit(f"torchrun failed with exit code {done.returncode}:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    ranks_diff, resume_diff, step_s = summary["ranks_max_abs_diff"], summary["resume_max_abs_diff"], summary["step_s"]
    rows = [["processes", n], ["device (rank 0)", summary["device"]], ["local batch", summary["local_batch"]],
            ["ranks' weights, largest difference", f"{ranks_diff:.3g}"],
            ["resumed vs straight, largest difference", f"{resume_diff:.3g}"],
            ["step (rank 0)", f"{1e3 * step_s:.1f} ms"], ["global images/s", f"{args.batch / step_s:,.0f}"]]
    print()
    print(table(["DDP", "value"], rows))
    record = {"benchmark": "ddp", "processes": n, "device": args.device, "preset": args.preset, "batch": args.batch,
              "steps": args.steps, "resume_at": args.resume_at, "ranks_max_abs_diff": ranks_diff,
              "resume_max_abs_diff": resume_diff, "ranks_identical": ranks_diff == 0.0,
              "resume_exact": resume_diff == 0.0, "step_s": step_s, "images_per_s": args.batch / step_s}
    write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
