#!/usr/bin/env bash
# One-call GPU check for the device machine: build (CUDA, sm_90a), run the GPU tests (GPU kernels
# vs the CPU ones), the CPU unit tests if time allows, and the kernel benchmark; logs and a short
# summary go to $OUT (at most 9 files with NCU_KERNEL). Every step runs even if an earlier one failed; the summary
# is printed last.
#
#   OUT=/some/dir scripts/device_check.sh [--quick] [--cpu-tests] [--no-train]
#
# Also trains TRAIN_CONFIGS (default configs/linear_llama3_1b.yaml) for TRAIN_STEPS steps on the GPU
# (extra --set options in TRAIN_SET), checks that TensorBoard reads the run's event files, and with
# 2+ GPUs runs the multi-rank tests over NCCL. TRAIN_VARIANTS="ce16k fp8 fp8fast swiglu" trains the first
# config again with one LM-head chunk / FP8 projections and LM head / FP8 fast accumulation /
# train.recompute=swiglu (also: fp4 = FP4 projections; fp8block = FP8 with block scaling; VARIANT_PROFILE=1 (or shapes) adds a 3-step LASP_PROFILE=1 (or shapes)
# run of each variant to its log). FP4_PROFILE=1
# times and profiles the FP4 emulation on configs/hybrid_27m.yaml (fp4_profile.log).
# TRAIN_SH=1 also runs scripts/train.sh (the README's first command) for 100 steps; PRECISION_SEEDS="1 2 3" runs scripts/compare_precision.sh with
# those seeds on the GPU (config PRECISION_CONFIG, default tiny.yaml; extra lasp train args in
# PRECISION_ARGS; variants in VARIANTS; cap PRECISION_CAP_S seconds).
#
# Environment: OUT (default ./device_out), BUILD (default /tmp/lasp-build-gpu), BUDGET_S (wall
# seconds for the whole script, default 520); BENCH_ONLY=gemm|linear|attention restricts the kernel
# benchmark, LA_PROFILE=1 adds its linear-attention passes one by one (LASP_PROFILE=shapes), LOWP=0 skips `lasp bench lowp/ops` (LOWP_ARGS: extra arguments, e.g. --quantizers; OPS=0 skips `lasp bench ops`), SDPA=0 skips the PyTorch SDPA timing;
# NCU_KERNEL=regex profiles that kernel under `lasp bench lowp` with Nsight Compute (ncu.log; NCU_SKIP,
# NCU_COUNT, NCU_ARGS, NCU_CAP_S, NCU_METRICS = extra --metrics, e.g. regex:...stalled_.*);
# SASS_FILE=gemm_fp8_sm90 SASS_MATCH=<mangled-name fragment> writes one kernel's SASS to sass.txt; GPU_FILTER / GPU_REPEAT pass --gtest_filter / --gtest_repeat to the GPU tests (flaky-test hunts), GPU_TESTS_CAP_S caps them (300 s). If the project cannot be configured on the device
# (missing yaml-cpp / OpenBLAS / protobuf / GoogleTest there), the script falls back to binaries
# prebuilt elsewhere and carried in .prebuilt/ (lasp_gpu_tests, lasp_tests, lib/ with their
# shared libraries): see docs/kernels.md.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/device_out}
BUILD=${BUILD:-/tmp/lasp-build-gpu}
BUDGET_S=${BUDGET_S:-520}
QUICK=0
CPU_TESTS=0
TRAIN=1
TRAIN_CONFIGS=${TRAIN_CONFIGS:-linear_llama3_1b.yaml}
TRAIN_STEPS=${TRAIN_STEPS:-6}
TRAIN_SET=${TRAIN_SET:-}
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    --cpu-tests) CPU_TESTS=1 ;;
    --no-cpu-tests) CPU_TESTS=0 ;;
    --no-train) TRAIN=0 ;;
    *) echo "device_check.sh: unknown argument $a (expected --quick, --cpu-tests, --no-train)"; exit 2 ;;
  esac
done
mkdir -p "$OUT"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
# Seconds left for a step: the smaller of its cap and what remains of the budget (minus 15 s
# reserved for the summary); at least 1.
left() {
  local cap=$1 rem
  rem=$((BUDGET_S - ($(date +%s) - START) - 15))
  ((rem < cap)) && cap=$rem
  ((cap < 1)) && cap=1
  echo "$cap"
}

say "== device_check $(date -u +%FT%TZ) in $ROOT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  nvcc --version | tail -2
  cmake --version | head -1
  uname -r
} >/tmp/lasp_env.txt 2>&1
tee -a "$SUMMARY" </tmp/lasp_env.txt

# ---- 1. build ----
GPU_BIN="" CPU_BIN="" LASP_BIN="" BUILD_STATUS="failed"
if timeout "$(left 60)" cmake -S "$ROOT" -B "$BUILD" -DLASP_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a \
    -DCMAKE_BUILD_TYPE=Release >"$OUT/build.log" 2>&1; then
  if [ "${GPU_TESTS:-1}" = 0 ]; then
    BUILD_STATUS="built on device (GPU tests not built: GPU_TESTS=0)"
  elif timeout "$(left 300)" cmake --build "$BUILD" -j 16 --target lasp_gpu_tests >>"$OUT/build.log" 2>&1; then
    GPU_BIN="$BUILD/tests/lasp_gpu_tests"
    BUILD_STATUS="built on device"
  fi
  if ((CPU_TESTS)) && timeout "$(left 200)" cmake --build "$BUILD" -j 16 --target lasp_tests >>"$OUT/build.log" 2>&1; then
    CPU_BIN="$BUILD/tests/lasp_tests"
  fi
  if [ -f "$ROOT/launch/main.cc" ] && timeout "$(left 120)" cmake --build "$BUILD" -j 16 --target lasp >>"$OUT/build.log" 2>&1; then
    LASP_BIN="$BUILD/lasp"
    [ "${GPU_TESTS:-1}" = 0 ] || [ -n "$GPU_BIN" ] || BUILD_STATUS="lasp built on device, lasp_gpu_tests failed"
  fi
  if (($(nvidia-smi -L 2>/dev/null | wc -l) >= 2)); then
    timeout "$(left 120)" cmake --build "$BUILD" -j 16 --target lasp_mpi_tests >>"$OUT/build.log" 2>&1
  fi
fi
if [ -z "$GPU_BIN" ] && [ "${GPU_TESTS:-1}" != 0 ] && [ -x "$ROOT/.prebuilt/lasp_gpu_tests" ]; then
  say "device build failed (see build.log tail below); using carried .prebuilt/ binaries"
  tail -5 "$OUT/build.log" | tee -a "$SUMMARY"
  export LD_LIBRARY_PATH="$ROOT/.prebuilt/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
  GPU_BIN="$ROOT/.prebuilt/lasp_gpu_tests"
  [ -x "$ROOT/.prebuilt/lasp_tests" ] && CPU_BIN="$ROOT/.prebuilt/lasp_tests"
  BUILD_STATUS="prebuilt (carried)"
fi
say "build: $BUILD_STATUS (at $(($(date +%s) - START)) s)"
grep -E "error|warning: " "$OUT/build.log" | grep -v "^--" | head -20 | tee -a "$SUMMARY"

# ---- 2. GPU tests ----
GPU_RESULT="not run"
if [ -n "$GPU_BIN" ]; then
  timeout "$(left ${GPU_TESTS_CAP_S:-300})" "$GPU_BIN" --gtest_color=no --gtest_filter="${GPU_FILTER:-*}" \
    --gtest_repeat="${GPU_REPEAT:-1}" 2>&1 | tee "$OUT/gpu_tests.log"
  rc=$?
  GPU_RESULT="rc=$rc; $(grep -E '^\[  PASSED  \]|^\[  FAILED  \]|^\[  SKIPPED \] [0-9]' "$OUT/gpu_tests.log" | tr '\n' ' ')"
fi

# ---- 3. CPU unit tests ----
CPU_RESULT="not run"
if ((CPU_TESTS)) && [ -n "$CPU_BIN" ]; then
  timeout "$(left 120)" "$CPU_BIN" --gtest_color=no --gtest_brief=1 2>&1 | tee "$OUT/cpu_tests.log" | tail -30
  rc=$?
  CPU_RESULT="rc=$rc; $(grep -E '^\[  PASSED  \]|^\[  FAILED  \]' "$OUT/cpu_tests.log" | tr '\n' ' ')"
fi

# ---- 4. kernel benchmark ----
BENCH_ARGS="--csv $OUT/bench.csv"
((QUICK)) && BENCH_ARGS="$BENCH_ARGS --quick"
[ -n "${BENCH_ONLY:-}" ] && BENCH_ARGS="$BENCH_ARGS --only $BENCH_ONLY"
BENCH_RESULT="not run"
if [ -n "$LASP_BIN" ] && [ "${BENCH:-1}" = 0 ]; then
  :  # BENCH=0: no kernel benchmark
elif [ -n "$LASP_BIN" ]; then
  timeout "$(left 240)" "$LASP_BIN" bench kernels $BENCH_ARGS 2>&1 | tee "$OUT/bench.log"
  rc=$?
  BENCH_RESULT="rc=$rc (lasp bench kernels)"
  ((rc == 0)) || LASP_BIN=""
  # LA_PROFILE=1: the linear-attention benchmark again with every pass a profile region (appended
  # to bench.log; the times in its table include the synchronisations around each pass).
  if [ -n "$LASP_BIN" ] && [ "${LA_PROFILE:-0}" = 1 ]; then
    LASP_PROFILE=shapes timeout "$(left 120)" "$LASP_BIN" bench kernels --only linear --iters 5 --warmup 2 2>&1 |
      sed -n '/^profile/,$p' | tee -a "$OUT/bench.log"
  fi
fi
if [ -z "$LASP_BIN" ] && [ -n "$GPU_BIN" ] && [ "${BENCH:-1}" != 0 ]; then
  LASP_BENCH_ARGS="$BENCH_ARGS" timeout "$(left 240)" "$GPU_BIN" --gtest_color=no \
    --gtest_filter='BenchKernels.*' 2>&1 | tee "$OUT/bench.log"
  BENCH_RESULT="rc=$? (through lasp_gpu_tests --gtest_filter=BenchKernels.*)"
fi

# ---- 4b. low-precision GEMMs (bf16 vs fp8) ----
# CLOCKS=1 (default) samples the SM clock, power and the clock-event reasons every 100 ms while it
# runs (clocks_lowp.csv; the bench's rows carry their end time in UTC to line up with it).
LOWP_RESULT="not run"
if [ -n "$LASP_BIN" ] && [ "${LOWP:-1}" = 1 ]; then
  CLOCK_PID=""
  if [ "${CLOCKS:-1}" = 1 ] && command -v nvidia-smi >/dev/null; then
    REASONS=clocks_event_reasons.active
    nvidia-smi --query-gpu=$REASONS --format=csv,noheader >/dev/null 2>&1 || REASONS=clocks_throttle_reasons.active
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,$REASONS \
      --format=csv -lms 100 >"$OUT/clocks_lowp.csv" 2>&1 &
    CLOCK_PID=$!
  fi
  timeout "$(left ${LOWP_CAP_S:-240})" "$LASP_BIN" bench lowp ${LOWP_ARGS:-} 2>&1 | tee "$OUT/bench_lowp.log" | tail -20
  LOWP_RESULT="rc=$? (lasp bench lowp)"
  if [ -n "$CLOCK_PID" ]; then
    kill "$CLOCK_PID" 2>/dev/null
    LOWP_RESULT="$LOWP_RESULT; SM clock $(awk -F', ' 'NR > 1 && $2 + 0 > 0 {n++; s += $2; p += $4;
      if (min == "" || $2 + 0 < min) min = $2 + 0; if ($2 + 0 > max) max = $2 + 0}
      END {if (n) printf "mean %.0f MHz (%d to %d), power mean %.0f W over %d samples", s / n, min, max, p / n, n}' \
      "$OUT/clocks_lowp.csv")"
  fi
  [ "${OPS:-1}" = 1 ] && timeout "$(left 90)" "$LASP_BIN" bench ops 2>&1 | tee -a "$OUT/bench_lowp.log" | tail -20
fi

# ---- 4a'. SASS of one kernel (SASS_FILE = an object file under $BUILD, SASS_MATCH = a fragment of
# the mangled name): cuobjdump's listing of the first matching function goes to sass.txt.
SASS_RESULT="not run"
if [ -n "${SASS_FILE:-}" ] && [ -n "${SASS_MATCH:-}" ]; then
  CUOBJDUMP=$(command -v cuobjdump || ls /usr/local/cuda/bin/cuobjdump 2>/dev/null | head -1)
  OBJ=$(find "$BUILD" -path "*$SASS_FILE*" -name "*.o" | head -1)
  if [ -n "$CUOBJDUMP" ] && [ -n "$OBJ" ]; then
    "$CUOBJDUMP" -sass "$OBJ" 2>&1 | awk -v m="$SASS_MATCH" '/Function : /{ if (on) exit; if (index($0, m)) on = 1 } on' >"$OUT/sass.txt"
    SASS_RESULT="$(wc -l <"$OUT/sass.txt") lines of $(basename "$OBJ") (sass.txt)"
  else
    SASS_RESULT="cuobjdump or the object file not found"
  fi
fi

# ---- 4b'. Nsight Compute on one kernel (NCU_KERNEL = a kernel-name regex, e.g. gemm_fp8_sm90) ----
# Profiles launch NCU_SKIP (default 5, past the warm-up) and NCU_COUNT - 1 more of the matching
# kernel while `lasp bench lowp NCU_ARGS` (default --quick) runs; ncu.log gets the speed-of-light,
# warp-state, scheduler, compute and memory sections.
NCU_RESULT="not run"
if [ -n "$LASP_BIN" ] && [ -n "${NCU_KERNEL:-}" ]; then
  NCU_BIN=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [ -n "$NCU_BIN" ]; then
    timeout "$(left ${NCU_CAP_S:-150})" "$NCU_BIN" --kernel-name "regex:$NCU_KERNEL" --launch-skip "${NCU_SKIP:-5}" \
      --launch-count "${NCU_COUNT:-1}" --section SpeedOfLight --section WarpStateStats \
      --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      ${NCU_METRICS:+--metrics "$NCU_METRICS"} "$LASP_BIN" bench lowp ${NCU_ARGS:---quick} >"$OUT/ncu.log" 2>&1
    NCU_RESULT="rc=$? (ncu on $NCU_KERNEL, ncu.log)"
  else
    NCU_RESULT="ncu not found on this machine"
  fi
fi

# ---- 4c. PyTorch SDPA on the same GPU (baseline for the softmax attention rows) ----
SDPA_RESULT="not run"
if [ "${SDPA:-1}" = 1 ] && python3 -c "import torch" 2>/dev/null; then
  timeout "$(left 90)" python3 "$ROOT/scripts/bench_sdpa.py" --lengths 65536 --iters 3 --warmup 2 2>&1 |
    tee -a "$OUT/bench.log" | tail -8
  SDPA_RESULT="rc=$? (scripts/bench_sdpa.py, appended to bench.log)"
fi

# ---- 5. training on the GPU: the 1B linear model, a few steps ----
# train_run LOG CAP_S ARGS...: `lasp train ARGS` with nvidia-smi sampling the GPU every 100 ms;
# each step line of LOG ends with what the GPU did during that step: mean SM clock, mean power,
# top temperature and the clock-limit reasons seen (nvidia-smi's bit mask: 0x4 power cap, 0x20/0x40
# thermal). Returns lasp's exit status.
train_run() {
  local log=$1 cap=$2 smi=/tmp/lasp_smi.csv smi_pid rc
  shift 2
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv,noheader,nounits -lms 100 >"$smi" 2>/dev/null &
  smi_pid=$!
  timeout "$cap" "$LASP_BIN" train "$@" 2>&1 | grep --line-buffered -v '^  ' |
    while IFS= read -r line; do printf '%s %s\n' "$(date +%s.%N)" "$line"; done >"/tmp/$(basename "$log").raw"
  rc=${PIPESTATUS[0]}
  kill "$smi_pid" 2>/dev/null; wait "$smi_pid" 2>/dev/null
  python3 - "/tmp/$(basename "$log").raw" "$smi" >"$log" <<'PY'
import sys, datetime
samples = []
for row in open(sys.argv[2], errors="replace"):
    f = [x.strip() for x in row.split(",")]
    try:
        t = datetime.datetime.strptime(f[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        samples.append((t, float(f[1]), float(f[2]), float(f[3]), int(f[4], 16)))
    except (ValueError, IndexError):
        pass
prev = None
for row in open(sys.argv[1], errors="replace"):
    t, _, line = row.rstrip("\n").partition(" ")
    t = float(t)
    if line.startswith("step") and prev is not None:
        s = [x for x in samples if prev < x[0] <= t]
        if s:
            reasons = 0
            for x in s:
                reasons |= x[4]
            line += " | gpu %d samples: sm %.0f MHz (min %.0f), %.0f W, %.0f C, reasons 0x%x" % (
                len(s), sum(x[1] for x in s) / len(s), min(x[1] for x in s),
                sum(x[2] for x in s) / len(s), max(x[3] for x in s), reasons)
    if line.startswith("step") or prev is None:
        prev = t
    print(line)
PY
  tail -12 "$log"
  return "$rc"
}
TRAIN_RESULT="not run"
if [ -n "$LASP_BIN" ] && ((TRAIN)); then
  for cfg in $TRAIN_CONFIGS; do
    name=$(basename "$cfg" .yaml)
    train_run "$OUT/train_$name.log" "$(left 200)" "$ROOT/configs/$cfg" --set train.steps="$TRAIN_STEPS" \
      --set run.dir=/tmp/lasp-run-$name $TRAIN_SET
    TRAIN_RESULT="$TRAIN_RESULT | $name rc=$? $(grep -E '^step' "$OUT/train_$name.log" | tail -1)"
    # Where the time goes (LASP_PROFILE synchronises around every region, so this run is slower;
    # PROFILE=shapes, the default, splits the GEMMs by shape with their TFLOP/s).
    LASP_PROFILE=${PROFILE:-shapes} timeout "$(left 120)" "$LASP_BIN" train "$ROOT/configs/$cfg" --set train.steps=3 \
      --set run.dir=/tmp/lasp-prof-$name $TRAIN_SET 2>&1 | sed -n '/^profile/,$p' >>"$OUT/train_$name.log"
  done
  # Variants of the first config (TRAIN_VARIANTS, space-separated): ce16k = one LM-head chunk of
  # 16384 rows, fp8 = FP8 projections and LM head, fp8fast = the same with fast accumulation in
  # the forward projections, swiglu = recompute each MLP's SwiGLU output in the backward;
  # fp8lt / fp8lasp = fp8 with the FP8 GEMMs in cuBLASLt / in lasp's own kernel (LASP_FP8_GEMM);
  # fp8block = fp8 with block scaling (1x128 activations and gradients, 128x128 weights).
  first=${TRAIN_CONFIGS%% *}
  for variant in ${TRAIN_VARIANTS:-}; do
    sets=()
    unset LASP_FP8_GEMM
    case "$variant" in
      fp8lt | fp8lasp)
        sets=(--set precision.attention=fp8 --set precision.mlp=fp8 --set precision.lm_head=fp8)
        if [ "$variant" = fp8lt ]; then export LASP_FP8_GEMM=cublaslt; else export LASP_FP8_GEMM=lasp; fi ;;
      fp4) sets=(--set precision.attention=fp4 --set precision.mlp=fp4) ;;
      ce16k) sets=(--set model.ce_chunk=16384) ;;
      fp8) sets=(--set precision.attention=fp8 --set precision.mlp=fp8 --set precision.lm_head=fp8) ;;
      fp8block) sets=(--set precision.attention=fp8 --set precision.mlp=fp8 --set precision.lm_head=fp8
                      --set precision.fp8_scaling=block) ;;
      fp8fast) sets=(--set precision.attention=fp8 --set precision.mlp=fp8 --set precision.lm_head=fp8
                     --set precision.fp8_fast_accum=true) ;;
      swiglu) sets=(--set train.recompute=swiglu) ;;
      *) say "unknown TRAIN_VARIANTS entry $variant (expected ce16k, fp8, fp8fast, fp8block, fp8lt, fp8lasp, fp4, swiglu)"; continue ;;
    esac
    log="$OUT/train_$(basename "$first" .yaml)_$variant.log"
    train_run "$log" "$(left 200)" "$ROOT/configs/$first" \
      --set train.steps="$TRAIN_STEPS" --set run.dir=/tmp/lasp-run-$variant $TRAIN_SET "${sets[@]}"
    TRAIN_RESULT="$TRAIN_RESULT | $variant rc=$? $(grep -E '^step' "$log" | tail -1)"
    if [ "${VARIANT_PROFILE:-0}" != 0 ]; then  # where this variant's time goes (3 steps, LASP_PROFILE=1|shapes)
      LASP_PROFILE=$VARIANT_PROFILE timeout "$(left 120)" "$LASP_BIN" train "$ROOT/configs/$first" --set train.steps=3 \
        --set run.dir=/tmp/lasp-prof-$variant $TRAIN_SET "${sets[@]}" 2>&1 | sed -n '/^profile/,$p' >>"$log"
    fi
  done
  unset LASP_FP8_GEMM
  TRAIN_RESULT=${TRAIN_RESULT#not run | }
  # TensorBoard reads the event files the run wrote (issue: metrics).
  tb_dir=$(ls -d /tmp/lasp-run-*/tb 2>/dev/null | head -1)
  if [ -n "$tb_dir" ]; then
    TB_RESULT=$(timeout "$(left 60)" python3 -c "
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator('$tb_dir'); ea.Reload()
tags = ea.Tags()['scalars']; print('tensorboard read', len(ea.Scalars('loss')), 'loss points; tags', sorted(tags))
" 2>&1 | tail -1)
  fi
fi

# ---- 5b. the README's first command (scripts/train.sh) on the GPU, with TRAIN_SH=1 ----
TRAINSH_RESULT="not run"
if [ "${TRAIN_SH:-0}" = 1 ]; then
  LASP_BUILD_DIR=$BUILD timeout "$(left 150)" bash "$ROOT/scripts/train.sh" --set train.steps=100 \
    --set run.dir=/tmp/lasp-trainsh >"$OUT/train_sh.log" 2>&1
  TRAINSH_RESULT="rc=$? $(grep -E '^step|final validation' "$OUT/train_sh.log" | tail -2 | tr '\n' ' ')"
fi

# ---- 5b2. where the FP4 emulation's time goes, with FP4_PROFILE=1 ----
# On configs/hybrid_27m.yaml: tokens/s of 200 steps in bf16, NVFP4 + MS-EDEN and MXFP4 + SR; the
# NVFP4 run's profile regions (LASP_PROFILE=1, 20 steps); with NCU_PROFILE=1 also every kernel's
# time over 2000 launches (ncu, one metric, clocks left alone), summed per kernel name (slow: on
# 2026-12-02 it did not finish in 150 s).
FP4P_RESULT="not run"
if [ "${FP4_PROFILE:-0}" = 1 ] && [ -n "$LASP_BIN" ]; then
  cfg27="$ROOT/configs/hybrid_27m.yaml"
  nv=(--set precision.attention=fp4 --set precision.mlp=fp4 --set precision.fp4_format=nvfp4
      --set precision.fp4_backward=ms_eden --set precision.hadamard_block=32)
  mx=(--set precision.attention=fp4 --set precision.mlp=fp4 --set precision.fp4_format=mxfp4
      --set precision.fp4_backward=sr --set precision.hadamard_block=32)
  log="$OUT/fp4_profile.log"
  : >"$log"
  for v in bf16 nv mx; do
    sets=()
    [ "$v" = nv ] && sets=("${nv[@]}")
    [ "$v" = mx ] && sets=("${mx[@]}")
    echo "== $v: 200 steps" >>"$log"
    timeout "$(left 60)" "$LASP_BIN" train "$cfg27" --set train.steps=200 --set eval.every=1000 \
      --set run.dir=/tmp/lasp-fp4p-$v "${sets[@]}" 2>&1 | grep -E '^step +(50|100|150|200)/' >>"$log"
  done
  echo "== nv: LASP_PROFILE=1, 20 steps" >>"$log"
  LASP_PROFILE=1 timeout "$(left 60)" "$LASP_BIN" train "$cfg27" --set train.steps=20 --set eval.every=1000 \
    --set run.dir=/tmp/lasp-fp4p-prof "${nv[@]}" 2>&1 | sed -n '/^profile/,$p' >>"$log"
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  if [ -n "$NCU" ] && [ "${NCU_PROFILE:-0}" = 1 ]; then
    echo "== nv: ncu kernel times (launches 4000-5999)" >>"$log"
    timeout "$(left 150)" "$NCU" --clock-control none --cache-control none --metrics gpu__time_duration.sum \
      --csv --print-units base --launch-skip 4000 --launch-count 2000 "$LASP_BIN" train "$cfg27" \
      --set train.steps=12 --set eval.every=1000 --set run.dir=/tmp/lasp-fp4p-ncu "${nv[@]}" \
      >/tmp/lasp_ncu.csv 2>/tmp/lasp_ncu.err
    echo "ncu rc=$?" >>"$log"
    python3 - /tmp/lasp_ncu.csv >>"$log" 2>&1 <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(l for l in open(sys.argv[1], errors="replace") if l.startswith('"'))]
if not rows:
    sys.exit("no ncu rows")
h = rows[0]
ki, vi = h.index("Kernel Name"), h.index("Metric Value")
tot, cnt = collections.Counter(), collections.Counter()
for r in rows[1:]:
    name = r[ki].split("(")[0][:90]
    tot[name] += float(r[vi].replace(",", "")) / 1e3  # ns -> us
    cnt[name] += 1
all_us = sum(tot.values())
print("kernels: %d launches, %.1f ms of kernel time" % (sum(cnt.values()), all_us / 1e3))
for name, us in tot.most_common(30):
    print("%9.1f us %5.1f%% %6d x %7.2f us  %s" % (us, 100 * us / all_us, cnt[name], us / cnt[name], name))
PY
    tail -3 /tmp/lasp_ncu.err >>"$log"
  fi
  FP4P_RESULT="see fp4_profile.log"
  cat "$log"
fi

# ---- 5c. precision comparison over seeds on the GPU, with PRECISION_SEEDS="1 2 3" ----
PREC_RESULT="not run"
if [ -n "${PRECISION_SEEDS:-}" ] && [ -n "$LASP_BIN" ]; then
  export SEEDS="$PRECISION_SEEDS" LASP_BIN PRECISION_DIR=/tmp/lasp-precision \
    LASP_CONFIG="$ROOT/configs/${PRECISION_CONFIG:-tiny.yaml}"
  timeout "$(left ${PRECISION_CAP_S:-240})" bash "$ROOT/scripts/compare_precision.sh" ${PRECISION_ARGS:-} \
    >"$OUT/precision.log" 2>&1
  rc=$?
  if ((rc != 0)); then  # cut by the cap: the table of the runs that finished
    SKIP_TRAIN=1 bash "$ROOT/scripts/compare_precision.sh" >>"$OUT/precision.log" 2>&1
  fi
  PREC_RESULT="rc=$rc (table in precision.log; runs' times there)"
  cp /tmp/lasp-precision/loss.png "$OUT/precision_loss.png" 2>/dev/null
  # The runs' metrics, to plot elsewhere when this machine has no matplotlib.
  (cd /tmp/lasp-precision && tar czf "$OUT/precision_metrics.tar.gz" ./*/metrics.jsonl ./*.log) 2>/dev/null
fi

# ---- 6. multi-GPU: the multi-rank tests on NCCL (device tensors) when there are 2+ GPUs ----
MPI_RESULT="not run"
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
if ((NGPU >= 2)) && [ -x "$BUILD/tests/lasp_mpi_tests" ]; then
  export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  timeout "$(left 120)" mpirun -np 2 --bind-to none "$BUILD/tests/lasp_mpi_tests" --gtest_color=no >"$OUT/mpi_tests.log" 2>&1
  MPI_RESULT="rc=$? $(grep -E '^\[mpi\]' "$OUT/mpi_tests.log" | tail -1)"
  grep -B3 -A12 -E "Failure" "$OUT/mpi_tests.log" | head -60 >>"$SUMMARY"
fi

# ---- summary ----
say ""
say "== summary ($(($(date +%s) - START)) s)"
say "build:      $BUILD_STATUS"
say "gpu tests:  $GPU_RESULT"
grep -E '^\[  FAILED  \] [A-Za-z]' "$OUT/gpu_tests.log" 2>/dev/null | sort -u | tee -a "$SUMMARY"
say "cpu tests:  $CPU_RESULT"
grep -E '^\[  FAILED  \] [A-Za-z]' "$OUT/cpu_tests.log" 2>/dev/null | sort -u | head -20 | tee -a "$SUMMARY"
say "training:   $TRAIN_RESULT"
say "tensorboard: ${TB_RESULT:-not run}"
say "fp4 profile: $FP4P_RESULT"
say "train.sh:   $TRAINSH_RESULT"
say "precision:  $PREC_RESULT"
[ -f "$OUT/precision.log" ] && grep -E '^\|' "$OUT/precision.log" | tee -a "$SUMMARY"
say "multi-gpu:  $MPI_RESULT"
say "lowp bench: $LOWP_RESULT"
say "ncu:        $NCU_RESULT"
say "sass:       $SASS_RESULT"
say "sdpa bench: $SDPA_RESULT"
say "benchmark:  $BENCH_RESULT"
if [ -f "$OUT/bench.log" ]; then
  sed -n '/^HBM bandwidth/p;/^GEMM/,$p' "$OUT/bench.log" | grep -v '^\[' | tee -a "$SUMMARY"
fi
