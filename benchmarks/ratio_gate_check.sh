#!/usr/bin/env bash
# Does the ratio gate cry wolf, does it sleep? Repeated CPU ratio runs against a commit (--ratio-against REF,
# default HEAD) or a stored baseline (an argument ending in .json):
#   N as-is, N with one extra busy core (a Python busy loop), N with the kernels doing their work twice (twice),
#   three times (x3), N with a copy of both inputs added to the MMD launcher (copy) (IMM_FAST_BENCH_INJECT,
#   test-only). Prints the pass counts; each run's table lands in $LOGS/<kind>-<i>.log.
# Usage: bash benchmarks/ratio_gate_check.sh [REF|BASELINE.json] [N] [LOGS]   (torch threads: OMP_NUM_THREADS)
set -uo pipefail
cd "$(dirname "$0")/.."
BASE=${1:-HEAD}
case $BASE in *.json) REFARGS=(--ratio-baseline "$BASE") ;; *) REFARGS=(--ratio-against "$BASE") ;; esac
N=${2:-10}
LOGS=${3:-/tmp/imm_fast_ratio_check}
mkdir -p "$LOGS"
run() {  # kind i -> 0 when the gate passed
    python -m pytest benchmarks -k cpu_ratio -q -p no:cacheprovider "${REFARGS[@]}" --ratio-fail 20% \
        --benchmark-columns=median >"$LOGS/$1-$2.log" 2>&1
}
KINDS=${KINDS:-as-is busy twice x3 copy}
declare -A pass
for kind in $KINDS; do pass[$kind]=0; done
for i in $(seq 1 "$N"); do  # the kinds take turns, so each sees the same spread of machine load
    for kind in $KINDS; do
        busy=""
        if [ "$kind" = busy ]; then python3 -c "while True: pass" & busy=$!; fi
        case $kind in twice|x3|copy) export IMM_FAST_BENCH_INJECT=$kind ;; *) unset IMM_FAST_BENCH_INJECT ;; esac
        if run "$kind" "$i"; then pass[$kind]=$(( ${pass[$kind]} + 1 )); r=pass; else r=FAIL; fi
        if [ -n "$busy" ]; then kill "$busy"; wait "$busy" 2>/dev/null; fi
        echo "$(date -u +%H:%M:%S) $kind $i: $r (load $(cut -d' ' -f1-3 /proc/loadavg))"
    done
done
unset IMM_FAST_BENCH_INJECT
for kind in $KINDS; do echo "$kind: the gate passed ${pass[$kind]} of $N runs"; done
# Per kind and speed-up: the range measured and its change against the baseline, from the runs' tables.
python3 - "$LOGS" $KINDS <<'PY'
import collections, glob, re, sys
logs, kinds = sys.argv[1], sys.argv[2:]
row = re.compile(r"^(\S.*? vs \S+)\s+([\d.]+)x\s+([\d.]+)x\s+([+-][\d.]+)%\s+(.*)$")
print("| kind | speed-up | measured | change | statuses |")
print("|---|---|---|---|---|")
for kind in kinds:
    seen = collections.defaultdict(list)
    for f in sorted(glob.glob(f"{logs}/{kind}-*.log")):
        for line in open(f):
            m = row.match(line.rstrip())
            if m:
                seen[m.group(1)].append((float(m.group(3)), float(m.group(4)), m.group(5)))
    for key, v in seen.items():
        now, ch = [x[0] for x in v], [x[1] for x in v]
        st = dict(collections.Counter(x[2] for x in v))
        print(f"| {kind} | {key} | {min(now):.2f}-{max(now):.2f}x | {min(ch):+.1f}% .. {max(ch):+.1f}% | {st} |")
PY
