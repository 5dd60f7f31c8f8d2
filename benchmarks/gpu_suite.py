"""Every GPU benchmark of issue 7 in one call, adapting to the GPUs it finds, never stopping at a
failure, within a time budget; and the same steps at toy size on CPU (``--cpu-dry-run``, a CI test).

    bash benchmarks/gpu_suite.sh                          # on a GPU machine (≈ 5 minutes on one H200)
    uv run python -m benchmarks.gpu_suite --cpu-dry-run   # every step at toy size on CPU (≈ 1 minute)

Steps, in this order (the most likely to overrun last, so it cannot starve the others):
  anchors     parameters and FLOPs of the ImageNet-64 UNet, meta device   (benchmarks/anchors.py)
  sampling    routed pruned ensemble vs single model, time vs FLOPs ratio (benchmarks/bench_sampling.py)
  ddp         DDP over every visible GPU (NCCL) when there are ≥ 2; with one GPU a
              "skipped: 1 GPU" line and record                         (benchmarks/bench_ddp.py)
  train_step  fp32 eager vs bf16 / NHWC / compile: MFU, speed-up, peak memory (benchmarks/bench_train_step.py)
Each step is its own process (its own process group) with a timeout taken from the plan and
what is left of ``--budget-s``; a failure or timeout is recorded with the tail of its log and
the suite goes on. A step's partial JSON (train_step writes one after its eager phase) is kept.

Sizing: each GPU step's FLOPs come from the anchors (counted on the meta device), divided by an
assumed achieved throughput (``ASSUMED_TFLOPS``: deliberately low guesses, not measurements)
plus fixed costs (process start with CUDA initialisation, ``torch.compile``); the plan and each
step's measured time are both written, so the first GPU session corrects the guesses.

Writes two files to ``--out`` (default ``$OUT/gpu-suite`` when ``$OUT`` is set, else
``runs/gpu-suite-<UTC time>``), rewritten after every step: ``results.json`` (machine,
plan, every step's status, time, command, result or error with the end of its log, and each
target's status) and ``results.md`` (the Markdown rows for benchmarks/RESULTS.md). The steps' own
logs and JSON files go to a scratch folder (``--keep-step-files`` keeps them under ``<out>/steps``).
Exit code 0 when every step ran or was skipped by design, 1 when any failed (after everything is
written).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Achieved throughput assumed for sizing on one H200 (TFLOP/s). Guesses on the low side of what
# this UNet should reach (peak: 790 bf16 dense as measured by the issue; fp32 eager runs the
# convolutions in TF32 by default): they size timeouts, they are never reported as results.
ASSUMED_TFLOPS = {"fp32": 40.0, "bf16": 200.0}
PROCESS_START_S = 20.0   # python + torch import + CUDA context, per process (guess)
COMPILE_S = 150.0        # torch.compile of the ImageNet-64 UNet's training step (guess)
DRY_RUN_STEP_S = 45.0    # a toy step on 2 busy CPU cores, start-up included (measured order: 5-20 s)


@dataclass
class Step:
    """One benchmark process: its command, planned seconds, and what it wrote."""

    name: str
    command: list[str]
    estimate_s: float
    json_path: Path | None = None
    what: str = ""
    skip_reason: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


LOG_TAIL = 6000  # characters of each step's log kept in results.json


def run_step(step: Step, *, out: Path, timeout_s: float) -> dict[str, object]:
    """Run one step to completion or timeout; its record (never raises for the step's failure).

    ``out`` is the scratch folder of the steps' logs."""
    log = out / f"{step.name}.log"
    rec: dict[str, object] = {"what": step.what, "command": " ".join(step.command),
                              "estimate_s": round(step.estimate_s, 1)}
    if step.skip_reason is not None:
        log.write_text(step.skip_reason + "\n")
        print(f"== {step.name}: {step.skip_reason}", flush=True)
        return {**rec, "status": "skipped", "reason": step.skip_reason, "elapsed_s": 0.0}
    if timeout_s < 1:
        reason = "skipped: no time left in the suite's budget"
        log.write_text(reason + "\n")
        print(f"== {step.name}: {reason}", flush=True)
        return {**rec, "status": "skipped", "reason": reason, "elapsed_s": 0.0}
    print(f"== {step.name}: {step.what} (timeout {timeout_s:.0f} s)\n   $ {rec['command']}", flush=True)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **step.env}
    t0 = time.perf_counter()
    status, code = "ok", None
    with log.open("w") as fh:
        try:
            proc = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as exc:
            fh.write(f"could not start: {exc}\n")
            status = "error"
        else:
            try:
                code = proc.wait(timeout=timeout_s)
                status = "ok" if code == 0 else "error"
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
                status = "timeout"
            finally:
                _kill_group(proc)  # anything it left behind (torchrun workers, compile workers)
    elapsed = time.perf_counter() - t0
    rec.update(status=status, returncode=code, elapsed_s=round(elapsed, 1))
    text = log.read_text(errors="replace")
    rec["log_tail"] = text[-LOG_TAIL:]
    if status != "ok":
        rec["error"] = (f"timed out after {timeout_s:.0f} s; " if status == "timeout" else "") + text[-2000:]
    if step.json_path is not None and step.json_path.is_file():
        try:
            rec["result"] = json.loads(step.json_path.read_text())
            if status != "ok":
                rec["result_partial"] = True
        except json.JSONDecodeError as exc:
            rec["result_error"] = f"unreadable JSON: {exc}"
    # The Markdown tables the step printed (its rows for RESULTS.md), each with the line above it.
    lines = text.splitlines()
    rec["tables"] = [line for i, line in enumerate(lines) if line.startswith("|") or (
        i + 1 < len(lines) and lines[i + 1].startswith("|") and not line.startswith("|") and line.strip())]
    print(f"   {status} in {elapsed:.1f} s" + (f" (exit code {code})" if status == "error" else ""), flush=True)
    return rec


def run_all(steps: list[Step], *, budget_s: float, scratch: Path, t_start: float | None = None,
            on_step: Callable[[str, dict[str, object]], object] = lambda name, rec: None,
            ) -> dict[str, dict[str, object]]:
    """Run every step in order, whatever the earlier ones did; each step's record by name.

    A step's timeout: up to twice its estimate (at least estimate + 60 s), but leaving the later
    steps their estimates out of what is left of ``budget_s``; never below its own estimate while
    time is left; the last step gets all that is left. ``on_step`` sees each record as it lands.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    records: dict[str, dict[str, object]] = {}
    for i, step in enumerate(steps):
        left = budget_s - (time.perf_counter() - t_start)
        later = sum(s.estimate_s for s in steps[i + 1:] if s.skip_reason is None)
        timeout = min(max(2 * step.estimate_s, step.estimate_s + 60), left - later) if later else left
        timeout = max(timeout, min(step.estimate_s, left))
        records[step.name] = run_step(step, out=scratch, timeout_s=timeout)
        on_step(step.name, records[step.name])
    return records


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def nvidia_smi() -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "nvidia-smi not found"
    try:
        done = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        return (done.stdout or done.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi failed: {exc}"


def plan(*, dry_run: bool, devices: int, out: Path) -> list[Step]:
    """The suite's steps for this machine (``devices``: visible GPUs, or CPU processes in a dry run)."""
    from benchmarks.anchors import count

    py = [sys.executable, "-m"]
    j = {name: out / f"{name}.json" for name in ("anchors", "sampling", "ddp", "train_step")}
    if dry_run:
        # Toy workloads on shared cores: one thread each (a second only adds synchronisation, and
        # under load it slows 8x8 work several-fold).
        one = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        ddp_skip = None if devices >= 2 else f"skipped: {devices} GPU (CPU dry run with --dry-run-devices {devices})"
        return [
            Step("anchors", [*py, "benchmarks.anchors", "--presets", "imagenet64", "--json", str(j["anchors"])],
                 DRY_RUN_STEP_S, j["anchors"], "parameters and FLOPs of the ImageNet-64 UNet, meta device (as on GPU)",
                 env=one),
            Step("sampling", [*py, "benchmarks.bench_sampling", "--preset", "smoke", "--batch", "4", "--steps", "2",
                              "--warmup", "1", "--repeats", "2", "--json", str(j["sampling"])],
                 DRY_RUN_STEP_S, j["sampling"], "ensemble vs single model, smoke model on CPU", env=one),
            Step("ddp", [*py, "benchmarks.bench_ddp", "--device", "cpu", "--processes", str(devices), "--preset",
                         "smoke", "--batch", "8", "--steps", "4", "--resume-at", "2", "--warmup-steps", "1",
                         "--timed-steps", "2", "--json", str(j["ddp"])],
                 DRY_RUN_STEP_S, j["ddp"], f"DDP over {devices} CPU processes (gloo), smoke model",
                 skip_reason=ddp_skip, env=one),
            Step("train_step", [*py, "benchmarks.bench_train_step", "--preset", "smoke", "--batch", "8", "--steps",
                                "1", "--warmup", "1", "--repeats", "2", "--compile-backend", "eager",
                                "--json", str(j["train_step"])],
                 DRY_RUN_STEP_S, j["train_step"],
                 "training step variants, smoke model on CPU (compile: dynamo with the eager backend)",
                 env=one),
        ]
    a = count("imagenet64")
    fwd, train = a["forward_flops_per_image"], a["train_flops_per_image"]
    tf = {k: v * 1e12 for k, v in ASSUMED_TFLOPS.items()}
    # train_step: batch 128, 5 steps a call, 1 warm-up + 3 timed calls per variant and phase.
    batch, steps, calls = 128, 5, 4
    per_call = {k: batch * steps * train / tf[k] for k in tf}
    phase1 = calls * (per_call["fp32"] + 2 * per_call["bf16"])
    phase2 = calls * (per_call["fp32"] + 2 * per_call["bf16"]) + COMPILE_S
    train_est = PROCESS_START_S + phase1 + phase2
    # sampling: batch 256, 50 DDIM steps, 1 warm-up + 3 timed calls of each model (ensemble ≤ 1.0·F).
    sample_est = PROCESS_START_S + 2 * 4 * 256 * 50 * fwd / tf["bf16"]
    ddp_est = 2 * PROCESS_START_S + 30.0
    return [
        Step("anchors", [*py, "benchmarks.anchors", "--presets", "imagenet64", "--json", str(j["anchors"])],
             PROCESS_START_S, j["anchors"], "parameters and FLOPs of the ImageNet-64 UNet, meta device"),
        Step("sampling", [*py, "benchmarks.bench_sampling", "--preset", "imagenet64", "--batch", "256", "--steps", "50",
                          "--bf16", "--warmup", "1", "--repeats", "3", "--json", str(j["sampling"])],
             sample_est, j["sampling"], "ensemble vs single model, ImageNet-64, batch 256, bf16, DDIM 50"),
        Step("ddp", [*py, "benchmarks.bench_ddp", "--device", "cuda", "--processes", str(devices), "--preset",
                     "digits", "--batch", str(64 * max(devices, 1)), "--steps", "10", "--resume-at", "4",
                     "--json", str(j["ddp"])],
             ddp_est, j["ddp"], f"DDP over {devices} GPUs (NCCL), digits model, exact resume",
             skip_reason=None if devices >= 2 else f"skipped: {devices} GPU (DDP needs ≥ 2; NCCL not run)"),
        Step("train_step", [*py, "benchmarks.bench_train_step", "--preset", "imagenet64", "--batch", str(batch),
                            "--steps", str(steps), "--warmup", "1", "--repeats", "3", "--json", str(j["train_step"])],
             train_est, j["train_step"], "training step, ImageNet-64 UNet, batch 128: fp32 eager vs bf16/NHWC/compile"),
    ]


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def targets(steps: dict[str, dict[str, object]], *, dry_run: bool) -> list[dict[str, str]]:
    """Each GPU target's measured value and status, from the steps' records."""

    def res(name: str) -> tuple[dict | None, str]:
        rec = steps.get(name, {})
        if rec.get("status") == "skipped":
            return None, f"not measured ({rec.get('reason')})"
        if "result" not in rec:
            return None, f"not measured ({name} {rec.get('status', 'did not run')})"
        return rec["result"], ""

    out = []
    ts, why = res("train_step")
    best = (ts or {}).get("best")
    tg = (ts or {}).get("targets")
    if dry_run or ts is None or tg is None:
        reason = why or ("not measured (CPU dry run)" if dry_run else "not measured (no CUDA result)")
        out += [{"target": t, "measured": "—", "status": reason} for t in
                ("shared training ≥ 40 % MFU, ImageNet-64, batch 128", "shared training ≥ 3× fp32 eager, same run",
                 "ImageNet-64 batch 128 training fits 80 GB")]
    else:
        out += [
            {"target": "shared training ≥ 40 % MFU, ImageNet-64, batch 128",
             "measured": f"{best['variant']}: {_fmt(100 * best['mfu'], '.1f')} % MFU",
             "status": "met" if tg["mfu_met"] else "missed"},
            {"target": "shared training ≥ 3× fp32 eager, same run",
             "measured": f"{best['variant']}: {best['speedup_vs_fp32_eager']:.2f}×",
             "status": "met" if tg["speedup_met"] else "missed"},
            {"target": "ImageNet-64 batch 128 training fits 80 GB",
             "measured": f"bf16+nhwc peak {_fmt(tg['default_variant_peak_gib'], '.1f')} GiB",
             "status": "met" if tg["memory_met"] else "missed"},
        ]
    sp, why = res("sampling")
    if dry_run or sp is None:
        out.append({"target": "ensemble sampling time / baseline within 5 % of the FLOPs ratio",
                    "measured": "—", "status": why or "not measured (CPU dry run)"})
    else:
        out.append({"target": "ensemble sampling time / baseline within 5 % of the FLOPs ratio",
                    "measured": f"time ratio {sp['time_ratio']:.3f} vs FLOPs ratio {sp['flops_ratio']:.3f} "
                                f"(× {sp['time_over_flops']:.3f})",
                    "status": "met" if sp["within_target"] else "missed"})
    dd, why = res("ddp")
    if dd is None:
        out.append({"target": "multi-GPU DDP: same code path, correct resume", "measured": "—", "status": why})
    else:
        measured = (f"{dd['processes']} × {dd['device']}: ranks identical {dd['ranks_identical']}, resume max |Δ| "
                    f"{dd['resume_max_abs_diff']:.3g}")
        ok = dd["ranks_identical"] and dd["resume_max_abs_diff"] <= (0.0 if dd["device"] == "cpu" else 1e-3)
        status = ("not measured on GPU (CPU dry run: " + ("passed" if ok else "FAILED") + ")") if dry_run else (
            "met" if ok else "missed")
        out.append({"target": "multi-GPU DDP: same code path, correct resume", "measured": measured, "status": status})
    return out


def markdown(record: dict[str, object]) -> str:
    lines = [f"# GPU suite ({record['mode']}), {record['started']}", "",
             f"machine: {record['machine_line']}", f"nvidia-smi: {record['nvidia_smi']}",
             f"suite wall time {record['elapsed_s']:.0f} s of a {record['budget_s']:.0f} s budget", "",
             "| target | measured | status |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['status']} |" for t in record["targets"]]
    lines += ["", "| step | status | seconds (planned) | command |", "|---|---|---|---|"]
    for name, s in record["steps"].items():
        lines.append(f"| {name} | {s['status']}{': ' + s['reason'] if s.get('reason') else ''} | "
                     f"{s['elapsed_s']:.0f} ({s['estimate_s']:.0f}) | `{s['command']}` |")
    for name, s in record["steps"].items():
        if s.get("tables"):
            lines += ["", f"### {name}", "", *s["tables"]]
        if s.get("error"):
            lines += ["", f"### {name}: {s['status']}", "", "```", str(s["error"])[-1500:], "```"]
    return "\n".join(lines) + "\n"


def default_out() -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu-suite"
    return ROOT / "runs" / f"gpu-suite-{stamp}"  # runs/ is git-ignored


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry-run", action="store_true", help="every step at toy size on CPU (CI)")
    ap.add_argument("--dry-run-devices", type=int, default=2,
                    help="dry run: the device count to plan for (CPU processes for DDP; 1 exercises the skip)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the whole suite (default 330 on GPU, 240 in a dry run)")
    ap.add_argument("--only", default=None, help="comma-separated step names to run (default: all)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default: $OUT/gpu-suite, else runs/gpu-suite-<time>)")
    ap.add_argument("--keep-step-files", action="store_true", help="keep each step's log and JSON under <out>/steps")
    ap.add_argument("--plan-only", type=int, default=None, metavar="GPUS",
                    help="print the GPU plan for this many GPUs (steps, commands, planned seconds) and exit")
    args = ap.parse_args(argv)
    if args.plan_only is not None:
        steps = plan(dry_run=False, devices=args.plan_only, out=Path("<scratch>"))
        budget = args.budget_s or 330.0
        for st in steps:
            print(f"{st.name:<11} {'skipped' if st.skip_reason else f'{st.estimate_s:6.0f} s'}  "
                  f"{st.skip_reason or ' '.join(st.command[2:])}")
        total = sum(st.estimate_s for st in steps if st.skip_reason is None)
        print(f"planned {total:.0f} s of a {budget:.0f} s budget (assumed {ASSUMED_TFLOPS} TFLOP/s achieved, "
              f"{PROCESS_START_S:.0f} s per process start, {COMPILE_S:.0f} s to compile: guesses, not measurements)")
        return 0 if total <= budget else 1
    t_start = time.perf_counter()
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / "steps" if args.keep_step_files else Path(tempfile.mkdtemp(prefix="tdc-gpu-suite-"))
    scratch.mkdir(parents=True, exist_ok=True)
    dry = args.cpu_dry_run
    budget = args.budget_s or (240.0 if dry else 330.0)
    if dry:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # toy size on CPU even on a GPU machine
        devices = args.dry_run_devices
    else:
        devices = visible_gpus()
    from benchmarks._common import machine, machine_info

    smi = "not queried (CPU dry run)" if dry else nvidia_smi()
    print(f"GPU suite ({'CPU dry run' if dry else 'GPU'}), {started}\nmachine: {machine(query_gpus=not dry)}\n"
          f"nvidia-smi: {smi}\n"
          f"devices: {devices} {'(dry run)' if dry else 'visible GPU(s)'}; budget {budget:.0f} s; results in {out}",
          flush=True)
    record: dict[str, object] = {"suite": "gpu", "mode": "cpu-dry-run" if dry else "gpu", "started": started,
                                 "budget_s": budget, "machine": machine_info(query_gpus=not dry),
                                 "machine_line": machine(query_gpus=not dry),
                                 "nvidia_smi": smi, "devices": devices, "assumed_tflops": ASSUMED_TFLOPS,
                                 "plan": [], "steps": {}}
    if not dry and devices == 0:
        record["error"] = "no CUDA device visible: nothing to measure (use --cpu-dry-run on a CPU machine)"
        print(record["error"], flush=True)
    try:
        steps = plan(dry_run=dry, devices=devices, out=scratch) if dry or devices else []
    except Exception as exc:  # noqa: BLE001 - the plan's failure is a result too
        steps = []
        record["error"] = f"planning failed: {type(exc).__name__}: {exc}"
        print(record["error"], flush=True)
    if args.only:
        wanted = set(args.only.split(","))
        steps = [s for s in steps if s.name in wanted]
    record["plan"] = [{"step": s.name, "estimate_s": round(s.estimate_s, 1), "what": s.what} for s in steps]
    print("plan: " + ", ".join(f"{s.name} ≈ {s.estimate_s:.0f} s" for s in steps), flush=True)
    run_all(steps, budget_s=budget, scratch=scratch, t_start=t_start,
            on_step=lambda name, rec: (record["steps"].__setitem__(name, rec), _write(out, record, t_start, dry)))
    record = _write(out, record, t_start, dry)
    if not args.keep_step_files:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(markdown(record), flush=True)
    failed = [n for n, s in record["steps"].items() if s["status"] not in ("ok", "skipped")]
    if failed or record.get("error"):
        print(f"FAILED: {', '.join(failed) or record.get('error')}", flush=True)
        return 1
    return 0


def _write(out: Path, record: dict[str, object], t_start: float, dry: bool) -> dict[str, object]:
    record["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    record["finished"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    record["targets"] = targets(record["steps"], dry_run=dry)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out / "results.json")
    (out / "results.md").write_text(markdown(record))
    return record


if __name__ == "__main__":
    sys.exit(main())
