"""The worker processes the pipeline launches: ``python -m tdc_core.run.worker <job> ...``.

Two jobs, each in a run folder whose owner (the flow) already holds the lock; a worker acts
under the owner's inherited token (:mod:`tdc_core.run.runlock`):

- ``finetune-group --run-dir D --group G --metrics-file F``: stage 2 for one group
  (:func:`tdc_core.run.stages.finetune_group_stage`), in its own process for crash isolation
  and so its memory is freed at exit; one GPU (``CUDA_VISIBLE_DEVICES``) or a share of the cores.
- ``train --out-dir D --metrics-file F --result-file R``: dense training of the folder's
  config, run by every rank of a ``torchrun`` job (rank 0 writes the checkpoint, the metrics and
  the result).

A worker is silent on the console: its metrics, progress and messages go to ``F`` as JSON lines
(:class:`tdc_core.run.worker_reports.JsonlReporter`), which the parent replays live and logs to
MLflow. A user error is one line on stderr, ``tdc worker <job>: error: ...``, and exit code 2;
the parent quotes that line. The people-facing commands (``tdc train``, ``tdc finetune-group``)
live in ``flows/cli.py`` and print summaries; this entry point is for the pipeline alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from tdc_core.atomic import atomic_write_bytes
from tdc_core.config import PipelineConfig, read_run_config
from tdc_core.errors import TDCError
from tdc_core.run.layout import RunLayout
from tdc_core.run.runlock import hold_run_folder
from tdc_core.run.stages import finetune_group_stage
from tdc_core.run.worker_reports import JsonlReporter
from tdc_core.training.device import resolve_device
from tdc_core.training.trainer import run_training

__all__ = ["finetune_group_command", "main", "train_command"]

MODULE = "tdc_core.run.worker"


def finetune_group_command(*, run_dir: Path, group: int, metrics_file: Path) -> list[str]:
    """The argv (after ``python``) of a group fine-tune worker."""
    return ["-m", MODULE, "finetune-group", "--run-dir", str(run_dir), "--group", str(group),
            "--metrics-file", str(metrics_file)]


def train_command(*, out_dir: Path, metrics_file: Path, result_file: Path,
                  snapshot_steps: Sequence[int] = ()) -> list[str]:
    """The argv (after ``torchrun`` or ``python``) of a dense-training worker."""
    return ["-m", MODULE, "train", "--out-dir", str(out_dir), "--metrics-file", str(metrics_file),
            "--result-file", str(result_file), "--snapshot-steps", ",".join(str(int(n)) for n in snapshot_steps)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdc worker", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="job", required=True)
    fg = sub.add_parser("finetune-group")
    fg.add_argument("--run-dir", type=Path, required=True)
    fg.add_argument("--group", type=int, required=True)
    fg.add_argument("--metrics-file", type=Path, required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--out-dir", type=Path, required=True)
    tr.add_argument("--metrics-file", type=Path, required=True)
    tr.add_argument("--result-file", type=Path, required=True)
    tr.add_argument("--snapshot-steps", type=lambda s: [int(n) for n in s.split(",") if n], default=[])
    return p


def _device(config: PipelineConfig) -> torch.device:
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    return resolve_device(config.train.device)


def _finetune_group(args: argparse.Namespace) -> None:
    layout = RunLayout(args.run_dir)
    config = read_run_config(layout)
    with hold_run_folder(layout.root, command=f"worker finetune-group --group {args.group}", group=args.group):
        reporter = JsonlReporter(args.metrics_file)
        try:
            finetune_group_stage(config, layout, group=args.group, reporter=reporter, device=_device(config))
        finally:
            reporter.close()


def _train(args: argparse.Namespace) -> None:
    layout = RunLayout(args.out_dir)
    config = read_run_config(layout)
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 holds the folder and speaks for the job
        run_training(config, run_dir=layout.root, device=_device(config), snapshot_steps=args.snapshot_steps)
        return
    with hold_run_folder(layout.root, command="worker train"):
        reporter = JsonlReporter(args.metrics_file)
        try:
            result = run_training(config, run_dir=layout.root, reporter=reporter, device=_device(config),
                                  snapshot_steps=args.snapshot_steps)
        finally:
            reporter.close()
    record = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(result).items()}
    atomic_write_bytes(args.result_file, json.dumps(record).encode())


_JOBS = {"finetune-group": _finetune_group, "train": _train}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _JOBS[args.job](args)
    except TDCError as exc:
        print(f"tdc worker {args.job}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
