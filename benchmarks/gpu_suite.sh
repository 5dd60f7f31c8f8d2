#!/usr/bin/env bash
# Every GPU benchmark of issue 7 in one call: benchmarks/gpu_suite.py (read its docstring). It
# adapts to the GPUs it finds (DDP over all of them when there are ≥ 2, "skipped: 1 GPU"
# otherwise), records each step's result or error and goes on, and stays within a budget
# (--budget-s, default 330 s; ≈ 5.5 min on one H200 plus the machine's start).
#
#   bash benchmarks/gpu_suite.sh                   # on a GPU machine
#   bash benchmarks/gpu_suite.sh --cpu-dry-run     # every step at toy size on CPU (a CI test)
#
# On the lent H200 (no registry reachable; its python3 holds torch but not pydantic), one call:
#   run(command="bash benchmarks/gpu_suite.sh", carry=["benchmarks/.whl"], timeout_s=480)
# where benchmarks/.whl holds the wheels of pydantic and its needs for CPython 3.12 (fetch them
# here once: see benchmarks/RESULTS.md, "Running the GPU suite"). Results land in $OUT/gpu-suite
# (results.json, results.md, suite.log) when $OUT is set, else in runs/ (git-ignored).
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python          # the project's environment (uv sync)
else
  py=python3                   # e.g. the device machine's image
fi
if ! "$py" -c "import pydantic, yaml, torch" 2>/dev/null; then
  wheels=(benchmarks/.whl/*.whl)
  if [[ -e "${wheels[0]}" ]]; then
    echo "installing ${#wheels[@]} carried wheel(s) from benchmarks/.whl into /tmp/tdc-site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tdc-site \
      "${wheels[@]}" || echo "warning: installing the carried wheels failed"
    export PYTHONPATH="/tmp/tdc-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$py" -c "import pydantic, yaml, torch" \
    || echo "warning: $py cannot import pydantic, yaml and torch: the steps will fail and say so"
fi
args=("$@")
out=""
for ((i = 0; i < ${#args[@]}; i++)); do
  [[ "${args[i]}" == "--out" ]] && out="${args[i+1]:-}"
done
if [[ -z "$out" ]]; then
  if [[ -n "${OUT:-}" ]]; then out="$OUT/gpu-suite"; else out="runs/gpu-suite-$(date -u +%Y%m%d-%H%M%S)"; fi
  args+=(--out "$out")
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
"$py" -m benchmarks.gpu_suite "${args[@]}" 2>&1 | tee "$out/suite.log"
exit "${PIPESTATUS[0]}"
