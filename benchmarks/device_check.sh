#!/usr/bin/env bash
# The one device run (H100/H200): build, CUDA tests, GPU benchmarks + ratio gate, one table. Budget: about 10
# minutes (9 before the ratio tests were added; the ratio tests reuse the compiled graphs of the same run).
# Usage on the device machine, from the repo root:  bash benchmarks/device_check.sh
# Results land in $OUT (the device tool's folder) or /tmp/imm_fast_device: bench.json, table.md, gpu-<card>.json
# (the GPU ratio baseline), logs. Needs only torch, triton, pytest, pytest-benchmark, einops and ninja; no network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/imm_fast_device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 IMM_FAST_BENCH_QUICK=${IMM_FAST_BENCH_QUICK:-1}
unset TRITON_INTERPRET IMM_FAST_BACKEND
start=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - start )) s)"; }

stamp "versions"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

stamp "install (builds the CUDA extension)"
pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { echo "install failed"; tail -30 "$OUT/install.log"; }

stamp "GPU tests"
timeout 150 python -m pytest tests -m gpu -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15

# The GPU ratio gate: every kernel's speed-up over its reference / torch.compile, interleaved rounds. Written to
# $OUT/<gpu>.json after each case (copy it to benchmarks/baselines/ to make it the stored baseline); compared with
# benchmarks/baselines/<gpu>.json when that exists (a drop beyond 20% fails its test; the table is in bench.log).
GPU=$(python -c "import re, torch; print('gpu-' + re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))" 2>/dev/null || echo gpu-unknown)
ratio_args=(--ratio-save "$OUT/$GPU.json")
if [ -f "benchmarks/baselines/$GPU.json" ]; then ratio_args+=(--ratio-baseline "benchmarks/baselines/$GPU.json" --ratio-fail 20%); fi
stamp "GPU benchmarks + ratio gate ($GPU: ${ratio_args[*]})"
timeout 330 python -m pytest benchmarks -k "not cpu" -q -p no:cacheprovider "${ratio_args[@]}" \
    --benchmark-json="$OUT/bench.json" --benchmark-min-time=0.05 --benchmark-max-time=0.5 \
    --benchmark-columns=median,ops 2>&1 | tee "$OUT/bench.log" | grep -E -A60 "== ratio gate ==" | grep -v "^$" | head -60
tail -3 "$OUT/bench.log"

stamp "attention dispatch table (triton vs fastest SDPA, paste into imm_fast/ops/attention.py _CUDA_TABLE)"
timeout 45 python benchmarks/bench_attention.py --table 2>&1 | tee "$OUT/attention_table.txt" | tail -8

stamp "profile of one XL/2 training step"
timeout 45 python benchmarks/profile_train_step.py >"$OUT/profile.txt" 2>&1; head -40 "$OUT/profile.txt"

stamp "table"
[ -f "$OUT/bench.json" ] && python benchmarks/summarize.py "$OUT/bench.json" | tee "$OUT/table.md"
[ -f "$OUT/$GPU.json" ] && python benchmarks/summarize.py "$OUT/$GPU.json" | tee -a "$OUT/table.md"
stamp "done"
