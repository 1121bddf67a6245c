#!/usr/bin/env bash
# One command on a GPU machine, inside one 10-minute call: install this checkout, run the GPU test suite, then
# the benchmark runner within what is left of the time, and collect the results.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root (no internet needed)
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: print the plan and check its plumbing, run nothing
#
# Writes benchmarks/results/<gpu-name>/ (results.json, results.md, plots, logs) and, when $OUT is set, copies at
# most 8 files into $OUT. Time plan (seconds, override with the variables): GPU_CHECK_TOTAL_S (570: a 600 s call
# less a margin for the copy back) = install (measured, ~30) + tests (at most GPU_CHECK_TESTS_S, 180) + runner
# (what is left, less GPU_CHECK_MARGIN_S, 45, for the runner's overrun of its last case and the packing).
# GPU_CHECK_RUNNER_ARGS passes more options to the runner (a second call: GPU_CHECK_TESTS_S=0
# GPU_CHECK_RUNNER_ARGS="--skip ops" runs the training steps and the noise benchmark with all the time).
set -uo pipefail
cd "$(dirname "$0")/.."

TOTAL_S=${GPU_CHECK_TOTAL_S:-570}
TESTS_S=${GPU_CHECK_TESTS_S:-180}
MARGIN_S=${GPU_CHECK_MARGIN_S:-45}
RUNNER_ARGS=${GPU_CHECK_RUNNER_ARGS:-}  # e.g. "--skip ops" for a second call that runs the training steps
INSTALL_ESTIMATE_S=30
MIN_RUNNER_S=60
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

# Files that come back from $OUT (at most 8, one folder level).
BACK=(results.json results.md runner.log pytest.log plots.tar.gz environment.txt gpu_check.log)

runner_budget() {  # what the runner may use, given the seconds already spent
    echo $(( TOTAL_S - $1 - MARGIN_S ))
}

copy_back() {  # copy_back <results dir> <destination>
    local n=0
    mkdir -p "$2"
    for f in "${BACK[@]}"; do
        if [[ -f "$1/$f" ]]; then cp "$1/$f" "$2/"; n=$((n + 1)); fi
    done
    echo "copied $n files to $2"
}

if (( DRY_RUN )); then
    echo "gpu_check dry run: the plan of a GPU run, checked here without a GPU"
    budget=$(runner_budget $(( INSTALL_ESTIMATE_S + TESTS_S )))
    echo "1. install: $PYTHON -m pip install --no-deps --no-build-isolation -e .   (~${INSTALL_ESTIMATE_S} s)"
    echo "2. tests:   $PYTHON -m pytest -q tests [-n 4 with pytest-xdist]             (at most ${TESTS_S} s)"
    echo "3. runner:  $PYTHON -m benchmarks --budget-s <${TOTAL_S} - elapsed - ${MARGIN_S}> (${budget} s if the steps above take their limits)"
    echo "4. results: benchmarks/results/<gpu-name>/; \$OUT gets ${#BACK[@]} files: ${BACK[*]}"
    status=0
    (( ${#BACK[@]} <= 8 )) || { echo "FAIL: more than 8 files would come back"; status=1; }
    (( budget >= MIN_RUNNER_S )) || { echo "FAIL: the runner would get ${budget} s"; status=1; }
    for f in "${BACK[@]}"; do
        [[ "$f" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "FAIL: $f is not a name \$OUT can return"; status=1; }
    done
    tmp=$(mktemp -d)
    echo "--- the runner's plan for ${budget} s:"
    if ! $PYTHON -m benchmarks --dry-run --budget-s "$budget" --out "$tmp/results" $RUNNER_ARGS > "$tmp/plan.txt"; then
        echo "FAIL: python -m benchmarks --dry-run"; status=1
    fi
    head -n 40 "$tmp/plan.txt"; echo "   ..."; tail -n 1 "$tmp/plan.txt"
    $PYTHON - "$tmp/results/plan.json" <<'EOF' || status=1
import json, sys
plan = json.load(open(sys.argv[1]))["plan"]
runs = [p for p in plan if p["status"] == "would run"]
tiers = [p["tier"] for p in runs]
assert runs and tiers[0] == "headline", "the first cases must be the headline ratios"
headline = [p for p in plan if p["tier"] == "headline"]
assert all(p["status"] == "would run" for p in headline), "every headline case must fit the budget"
from benchmarks.plan import TIERS
assert tiers == sorted(tiers, key=TIERS.index), "cases must run tier by tier"
target = [p["case"] for p in runs if p["tier"] == "train target"]
print(f"plan checked: {len(runs)} of {len(plan)} cases fit, every headline ratio among them, and "
      f"{len(target)} training-step target cases ({', '.join(target) or 'none'}); the rest are recorded as skipped: "
      "run again with GPU_CHECK_TESTS_S=0 GPU_CHECK_RUNNER_ARGS='--skip ops' (say) for them")
EOF
    n_tests=$($PYTHON -m pytest --collect-only -q tests 2>/dev/null | tail -n 1)
    echo "--- tests collected: ${n_tests}"
    [[ "$n_tests" == *" tests collected"* || "$n_tests" == *" test collected"* ]] || { echo "FAIL: pytest collection"; status=1; }
    for f in "${BACK[@]}"; do echo "placeholder" > "$tmp/results/$f"; done
    copy_back "$tmp/results" "$tmp/OUT" > /dev/null
    n_back=$(find "$tmp/OUT" -type f | wc -l)
    (( n_back <= 8 )) || { echo "FAIL: $n_back files in \$OUT"; status=1; }
    echo "--- \$OUT would receive $n_back files"
    rm -rf "$tmp"
    (( status == 0 )) && echo "dry run OK ($(elapsed) s)" || echo "dry run FAILED"
    exit $status
fi

# ---- the real run ----------------------------------------------------------------------------------------------
gpu=$($PYTHON -c "import torch; from benchmarks.harness import device_name; print(device_name(torch.device('cuda')))" 2>/dev/null)
if [[ -z "$gpu" ]]; then
    echo "no CUDA GPU visible to $PYTHON: run this on a GPU machine (or pass --dry-run)" >&2
    exit 2
fi
results="benchmarks/results/$gpu"
mkdir -p "$results"
exec > >(tee "$results/gpu_check.log") 2>&1
echo "gpu_check on $gpu, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
{
    nvidia-smi || true
    $PYTHON -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__)"
    git status --short 2>/dev/null | head -20
} > "$results/environment.txt" 2>&1

echo "[$(elapsed) s] install"
if ! $PYTHON -m pip install -q --no-deps --no-build-isolation -e . > "$results/install.log" 2>&1; then
    echo "install failed:"; tail -20 "$results/install.log"
    cat "$results/install.log" >> "$results/environment.txt"
fi

echo "[$(elapsed) s] tests (at most ${TESTS_S} s)"
xdist=""
$PYTHON -c "import xdist" 2>/dev/null && xdist="-n 4"
if (( TESTS_S > 0 )); then
    timeout -k 10 "$TESTS_S" $PYTHON -m pytest -q tests -p no:cacheprovider $xdist > "$results/pytest.log" 2>&1
    tests_rc=$?
else
    echo "tests skipped (GPU_CHECK_TESTS_S=0)" > "$results/pytest.log"
    tests_rc=0
fi
tail -n 5 "$results/pytest.log"
(( tests_rc == 124 )) && echo "tests stopped at their ${TESTS_S} s limit: the log has what finished"

budget=$(runner_budget "$(elapsed)")
echo "[$(elapsed) s] runner, budget ${budget} s"
if (( budget >= MIN_RUNNER_S )); then
    $PYTHON -m benchmarks --budget-s "$budget" --out "$results" $RUNNER_ARGS > "$results/runner.log" 2>&1
    runner_rc=$?
    tail -n 3 "$results/runner.log"
else
    runner_rc=3
    echo "no time left for the runner (${budget} s)"
fi

(cd "$results" && ls ./*.png > /dev/null 2>&1 && tar czf plots.tar.gz ./*.png)
echo "[$(elapsed) s] done: tests rc=${tests_rc}, runner rc=${runner_rc}; results in $results"
if [[ -n "${OUT:-}" ]]; then
    sleep 1  # let tee flush gpu_check.log
    copy_back "$results" "$OUT"
fi
exit $(( tests_rc != 0 || runner_rc != 0 ))
