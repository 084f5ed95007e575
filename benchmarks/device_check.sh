#!/usr/bin/env bash
# One device run (H100/H200): at most 6 minutes of wall time (BUDGET_S), so a rerun still fits a 15-minute
# window. Steps in order of value, each under its own timeout (cut to what the budget has left):
#   versions; install (stop on failure); CUDA tests (one timeout per file, no -x); headline (DiT-XL/2 training
#   step reference / fused / compiled, 8-step guided sampling); kernel ratios (MMD, adaLN, attention against
#   their reference and torch.compile, interleaved); attention dispatch table; profile of one XL/2 step; the
#   kernels' measured times beside the memory floor and the static model's bound (benchmarks/roofline.py, computed
#   off the device into benchmarks/roofline_model.json); the table.
# Every case appends one JSON line to results.jsonl when it finishes (benchmarks/results.py), and table.md is
# rebuilt from those lines after every step: a timeout or a crash loses at most the case that was running.
#
#   bash benchmarks/device_check.sh            # on the device machine, from anywhere; results in $OUT
#   bash benchmarks/device_check.sh --dry-run  # here, on the CPU: the same steps on CPU shapes, CUDA-only parts
#                                              # reported as skipped; every output file written
# Files in $OUT (the device tool's folder; default /tmp/imm_fast_device), 8 at most, each capped at 16 MiB:
#   results.jsonl table.md run.log install.log tests.log bench.log profile.txt ratio-<host>.json
# Needs only torch, triton, pytest, pytest-benchmark, einops and ninja; no network.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/imm_fast_device}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
for f in run.log install.log tests.log bench.log profile.txt; do : >"$OUT/$f"; done
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 IMM_FAST_BENCH_QUICK=1 IMM_FAST_RESULTS="$RESULTS" PYTHONPATH="$PWD/benchmarks"
unset TRITON_INTERPRET IMM_FAST_BACKEND IMM_FAST_BENCH_INJECT
PY=${PYTHON:-python3}
SKIPPED=$(mktemp)  # outside $OUT: what comes back is the 8 files listed above
trap 'rm -f "$SKIPPED"' EXIT
T0=$(date +%s)
if [ $DRY = 1 ]; then  # a shared CPU imports torch in seconds to tens of seconds: the dry run's limits are 3x
    DEVICE=cpu SCALE=3; export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} IMM_FAST_BENCH_COMPILE_BACKEND=eager
else
    DEVICE=cuda SCALE=1
fi
BUDGET_S=${BUDGET_S:-$(( 360 * SCALE ))}

# step NAME SECONDS CMD...: run CMD (a command or one of the functions below) in bash under `timeout` (SECONDS,
# or what the budget has left), and record one line with its status and seconds.
step() {
    local name=$1 limit=$(( $2 * SCALE )); shift 2
    local left=$(( BUDGET_S - ($(date +%s) - T0) ))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 3 ]; then skip "$name" "the ${BUDGET_S} s budget is spent"; return 124; fi
    echo "== $name (timeout ${limit} s, at $(( $(date +%s) - T0 )) s)"
    local s rc status ms
    s=$(date +%s%N)
    : >"$SKIPPED"
    IMM_FAST_STEP=$name timeout -k 5 "$limit" bash -c "$*"
    rc=$?
    ms=$(( ($(date +%s%N) - s) / 1000000 ))
    if [ $rc = 0 ] && [ -s "$SKIPPED" ]; then skip "$name" "$(cat "$SKIPPED")"; return 0; fi
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
    printf '{"kind": "step", "step": "%s", "status": "%s", "rc": %d, "seconds": %d.%03d, "timeout_s": %d}\n' \
        "$name" "$status" "$rc" $(( ms / 1000 )) $(( ms % 1000 )) "$limit" >>"$RESULTS"
    echo "== $name: $status (rc $rc, $(( ms / 1000 )) s)"
    table
    return $rc
}
not_here() {  # REASON: the running step has nothing to do here (recorded by step as skipped)
    echo "$1" >"$SKIPPED"
}
skip() {  # NAME REASON
    printf '{"kind": "step", "step": "%s", "status": "skipped", "rc": 0, "seconds": 0.0, "reason": "%s"}\n' \
        "$1" "$2" >>"$RESULTS"
    echo "== $1: skipped ($2)"
}
table() { "$PY" benchmarks/summarize.py "$RESULTS" >"$OUT/table.md" 2>&1 || true; }

versions() {
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" - <<'PY'
import json, os, platform, sys, time
import torch
from results import append
info = {"kind": "env", "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "host": platform.node(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": torch.get_num_threads()}
try:
    import importlib.metadata as md
    info["triton"] = md.version("triton")
except Exception:  # noqa: BLE001
    info["triton"] = None
append(info)
print(json.dumps(info))
PY
}

install() {
    if [ $DRY = 1 ]; then  # the dry run uses the checkout as installed here; it checks what the install provides
        "$PY" -c "import imm_fast.kernels, imm_fast; print('dry run: imm_fast from', imm_fast.__file__)"
        return
    fi
    # The package alone (seconds); the C++/CUDA extension is built beside the CUDA tests (build_extension).
    IMM_FAST_BUILD_EXT=0 "$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
        || { tail -30 "$OUT/install.log"; return 1; }
    "$PY" -c "import imm_fast.kernels, imm_fast; print('installed', imm_fast.__file__)"
}

build_extension() {  # the just-in-time build (imm_fast/_ext.py), in the background while the CUDA tests run
    "$PY" -c "from imm_fast import _ext; print('extension ($DEVICE):', _ext.unavailable('$DEVICE') or 'ok')"
}

cuda_tests() {  # one timeout per file, no -x: a broken file or fixture hides nothing else
    local f t m
    # file:seconds[:marker] (90 s in all): the kernel files whole (their tests run on CUDA where it exists), the
    # others' gpu-marked tests only
    for spec in "test_mmd.py:22" "test_adaln.py:18" "test_attention.py:25" "test_mmd_ext.py:10" "test_backend.py:5" \
                "test_bench_smoke.py:5:gpu" "test_unet.py:5:gpu"; do
        f=${spec%%:*}; t=${spec#*:}; m=${t#*:}; t=${t%%:*}
        [ "$m" = "$t" ] && m="" || m="-m $m"
        if [ $DRY = 1 ]; then skip "tests/$f" "needs CUDA"; continue; fi
        echo "-- tests/$f $m" >>"$OUT/tests.log"
        IMM_FAST_STEP="tests/$f" timeout -k 5 "$t" "$PY" -m pytest "tests/$f" $m -p results -q -rfE \
            -p no:cacheprovider >>"$OUT/tests.log" 2>&1
        echo "tests/$f: rc $? $(tail -1 "$OUT/tests.log")"
    done
}

ratios() {  # one pytest run per op, each with its share of the step's time: every op gets its numbers
    local host rc=0 args=() part spec
    host=$("$PY" -c "import re, torch; c = torch.cuda.is_available()
print(re.sub(r'[^a-z0-9]+', '-', (torch.cuda.get_device_name() if c else 'cpu').lower()).strip('-'))")
    args=(--ratio-save "$OUT/ratio-$host.json")  # merged run by run (the same host)
    [ -f "benchmarks/baselines/$host.json" ] \
        && args+=(--ratio-baseline "benchmarks/baselines/$host.json" --ratio-fail 20%)
    if [ $DRY = 1 ]; then
        set -- "mmd:60:cpu_ratio and not fwdbwd"
        args+=(--ratio-rounds 3)
    else
        set -- "mmd:40:gpu_ratio" "adaln:30:gpu_ratio" "attention:20:gpu_ratio"
    fi
    for spec in "$@"; do
        part=${spec%%:*}; spec=${spec#*:}
        timeout -k 5 $(( ${spec%%:*} * SCALE )) "$PY" -m pytest -q -p no:cacheprovider -k "${spec#*:}" \
            "benchmarks/bench_$part.py" "${args[@]}" >>"$OUT/bench.log" 2>&1 || rc=$?
        echo "bench_$part ratios: rc $rc"
    done
    sed -n '/== ratio gate ==/,/^measured/p' "$OUT/bench.log" | grep -v "^$" | head -80
    return $rc
}

attention_table() {
    if [ $DRY = 1 ]; then not_here "needs CUDA"; return; fi
    "$PY" benchmarks/bench_attention.py --table
}

profile() {
    local a=()
    [ $DRY = 1 ] && a=(--device cpu --model tiny --batch 16)
    "$PY" benchmarks/profile_train_step.py "${a[@]}" >"$OUT/profile.txt" 2>&1
    local rc=$?
    head -20 "$OUT/profile.txt"
    return $rc
}

roofline() {  # the static model needs minutes of compiling and no GPU: computed off the device, joined here
    local out
    out=$("$PY" -c "import results, summarize; summarize.print_against_model(results.read('$RESULTS')[0])") || return 1
    if [ -z "$out" ]; then
        not_here "no H100/H200 measurement of a modelled group (benchmarks/roofline_model.json) to set beside it"
        return
    fi
    echo "$out"
}

cap_files() {  # what comes back: at most 8 files of 16 MiB; a log over the cap keeps its end
    local f
    for f in "$OUT"/*; do
        [ "$(stat -c %s "$f")" -gt 16000000 ] && { tail -c 15000000 "$f" >"$f.tmp" && mv "$f.tmp" "$f"; }
    done
    ls -l "$OUT"
}

export DRY OUT RESULTS PY DEVICE BUDGET_S T0 SCALE SKIPPED
export -f step skip not_here table versions install build_extension cuda_tests ratios attention_table profile roofline
# Timeouts: 10 + 45 + 90 + 75 + 95 + 10 + 15 + 10 = 350 s of the 360 s budget.
step versions 10 versions
if ! step install 45 install; then
    echo "install failed: stopping (imm_fast.kernels exists only through the install)"
    for s in extension-build cuda-tests headline kernel-ratios attention-table profile roofline; do
        skip $s "the install failed"
    done
    table; cap_files; exit 1
fi
step extension-build 150 build_extension >>"$OUT/install.log" 2>&1 &
BUILD=$!
export IMM_FAST_BUILD_WAIT_S=10  # a case that wants the extension mid-build gives up quickly (reference path)
if [ $DRY = 1 ]; then cuda_tests; else step cuda-tests 90 cuda_tests; fi
step headline 75 "$PY" benchmarks/device_run.py --device $DEVICE
wait $BUILD
step kernel-ratios 95 ratios
step attention-table 10 attention_table
step profile 15 profile
step roofline 10 roofline
table
echo "== done in $(( $(date +%s) - T0 )) s; table:"
cat "$OUT/table.md"
cap_files
