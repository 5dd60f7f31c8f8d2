"""Orchestration + tracking overhead: the whole pipeline through the Prefect flow (with MLflow)
vs the same stages called directly, on the embedded default, in one run.

    uv run python -m benchmarks.bench_orchestration          # digits preset: ~2 × 9 min on 2 cores

Both run as fresh processes in fresh run folders (the flow with its own throwaway Prefect home
and MLflow store, as ``tdc run`` would start), with the FID reference statistics already cached
(run once before timing). Reports each wall time and the overhead (flow − direct) / flow.
Targets (issue 7): the flow's pipeline ≤ 10 minutes on 2 cores; overhead ≤ 3 %.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import machine, table

ROOT = Path(__file__).resolve().parents[1]

DIRECT = """
import sys
from pathlib import Path
from benchmarks.direct import run_direct
from tdc_core.config import load_config
run_direct(load_config(preset=sys.argv[1], overrides=sys.argv[3:]), Path(sys.argv[2]))
"""


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd)
    if done.returncode:
        raise SystemExit(f"{cmd[:4]} failed with exit code {done.returncode}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="digits")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tdc-orch-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp / "prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    print(f"machine: {machine()}\nfolders under {tmp}", flush=True)
    flow = timed([sys.executable, "-m", "flows.cli", "run", "--preset", args.preset, "--run-dir",
                  str(tmp / "flow"), *args.overrides], env, tmp)
    direct = timed([sys.executable, "-c", DIRECT, args.preset, str(tmp / "direct"), *args.overrides], env, ROOT)
    print()
    print(table(["pipeline", "wall clock"], [["through the flow (Prefect + MLflow)", f"{flow:.1f} s"],
                                             ["stages called directly", f"{direct:.1f} s"]]))
    print(f"\noverhead (flow − direct) / flow = {100 * (flow - direct) / flow:.1f} %")


if __name__ == "__main__":
    main()
