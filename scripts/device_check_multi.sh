#!/usr/bin/env bash
# One-call check for a machine with 2+ GPUs: builds, runs the multi-rank tests over NCCL (one GPU
# per rank), then scripts/reproduce_lasp2.sh for the 1B linear model (per-GPU lengths from
# MIN_PER_GPU, times FACTOR, up to MAX_PER_GPU) and a one-GPU baseline for the SP scaling efficiency.
# Logs, results/lasp2.csv and the tables go to $OUT (at most 8 files).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/device_out}
BUILD=${BUILD:-/tmp/lasp-build-multi}
NGPU=$(nvidia-smi -L | wc -l)
MIN_PER_GPU=${MIN_PER_GPU:-32768}
MAX_PER_GPU=${MAX_PER_GPU:-524288}
FACTOR=${FACTOR:-4}
METHODS=${METHODS:-lasp2,lasp1,ring}
MODELS=${MODELS:-linear}       # linear,hybrid
W1_BASELINE=${W1_BASELINE:-1}  # 0: skip the one-GPU baseline
MPI_TESTS=${MPI_TESTS:-1}      # 0: skip the multi-rank tests
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
S="$OUT/summary.txt"
echo "== device_check_multi: $NGPU GPUs, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" | tee "$S"
nvidia-smi topo -m 2>&1 | head -5 >>"$S"
if ! { cmake -S "$ROOT" -B "$BUILD" -DLASP_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a >"$OUT/build.log" 2>&1 &&
       cmake --build "$BUILD" -j 32 --target lasp lasp_mpi_tests >>"$OUT/build.log" 2>&1; }; then
  tail -30 "$OUT/build.log" | tee -a "$S"; exit 1
fi
echo "build: ok" | tee -a "$S"
if ((MPI_TESTS)); then
  timeout 180 mpirun -np "$NGPU" --bind-to none -x NCCL_NVLS_ENABLE "$BUILD/tests/lasp_mpi_tests" \
    --gtest_filter="${MPI_FILTER:-*Gpu*:*SpLinear*:*SpAttention*:*Comm*}" >"$OUT/mpi_tests.log" 2>&1
  echo "multi-rank tests on $NGPU GPUs: rc=$? $(grep -E 'rank\(s\)' "$OUT/mpi_tests.log" | tail -1)" | tee -a "$S"
  grep -E "FAILED|Failure" "$OUT/mpi_tests.log" | head -20 | tee -a "$S"
fi
# One-GPU baseline at the smallest per-GPU lengths (SP scaling efficiency = per-GPU tokens/s at W
# over W = 1 at the same per-GPU length).
((W1_BASELINE)) && for per in $MIN_PER_GPU $((MIN_PER_GPU * FACTOR)); do
  CUDA_VISIBLE_DEVICES=0 timeout 120 "$BUILD/lasp" bench sp --config "$ROOT/configs/linear_llama3_1b.yaml" \
    --methods lasp2 --lengths "$per" --steps 3 --out "/tmp/w1_$per" --set train.recompute=block \
    --set model.ce_chunk=8192 >"/tmp/w1_$per.log" 2>&1
  echo "W=1 per-GPU $per: $(sed -n '/^lasp2 /p' "/tmp/w1_$per.log")" | tee -a "$S"
done
LASP_BIN="$BUILD/lasp" timeout "${REPRO_LIMIT:-420}" "$ROOT/scripts/reproduce_lasp2.sh" --gpus "$NGPU" \
  --models "$MODELS" --methods "$METHODS" --min-per-gpu "$MIN_PER_GPU" --max-per-gpu "$MAX_PER_GPU" \
  --factor "$FACTOR" --steps 3 --time-limit 200 2>&1 | tee "$OUT/reproduce.log" | tail -40
cp "$ROOT/results/lasp2.csv" "$ROOT/results/lasp2_tables.md" "$OUT/" 2>/dev/null
cp "$ROOT"/results/throughput_*.png "$OUT/" 2>/dev/null
echo "== done" | tee -a "$S"
