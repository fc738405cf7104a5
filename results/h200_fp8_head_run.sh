#!/bin/bash
# The one device call of the FP8 work (issue 8): build, GPU tests of the area, 1B training runs
# bf16 / fp8 / fp8 + fp8 LM head, one profiled fp8 run, the quantizer benchmark. Run from the
# worktree root on an nvidia-h200; logs under $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=$(pwd); B=/tmp/b-fp8
{ date; nvidia-smi --query-gpu=name --format=csv,noheader; } > "$OUT/00_info.txt"
(cmake -S . -B $B -DLASP_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a -DCMAKE_BUILD_TYPE=Release >/dev/null &&
 cmake --build $B -j 16 --target lasp lasp_gpu_tests) > "$OUT/01_build.txt" 2>&1 || { tail -40 "$OUT/01_build.txt"; exit 1; }
echo "build ok $(date +%T)"
cd $B
timeout 45 ./tests/lasp_gpu_tests --gtest_filter='LmHead*:CrossEntropy*:Quantiz*:ProjectionKernels*:ProjectionFp8*' > "$OUT/02_tests.txt" 2>&1
echo "tests rc=$? $(date +%T)"; grep -E "^\[  (PASSED|FAILED) |FAILED  \]|lm_head fp8" "$OUT/02_tests.txt" | head -30
for P in bf16 fp8 fp8head; do
  case $P in
    bf16) S="--set precision.attention=bf16 --set precision.mlp=bf16" ;;
    fp8) S="--set precision.attention=fp8 --set precision.mlp=fp8" ;;
    fp8head) S="--set precision.attention=fp8 --set precision.mlp=fp8 --set precision.lm_head=fp8" ;;
  esac
  timeout 40 ./lasp train $W/configs/linear_llama3_1b.yaml --set train.steps=6 --set run.dir=/tmp/r-$P $S > "$OUT/03_train_$P.txt" 2>&1
  echo "== $P rc=$? $(date +%T)"; grep "^step" "$OUT/03_train_$P.txt" | cut -c1-110
done
LASP_PROFILE=1 timeout 35 ./lasp train $W/configs/linear_llama3_1b.yaml --set train.steps=3 --set run.dir=/tmp/r-prof \
  --set precision.attention=fp8 --set precision.mlp=fp8 --set precision.lm_head=fp8 > "$OUT/04_profile.txt" 2>&1
echo "== profile rc=$? $(date +%T)"; sed -n '/profile (LASP/,$p' "$OUT/04_profile.txt" | head -24
LASP_BENCH_PROJECTION=1 timeout 20 ./tests/lasp_gpu_tests --gtest_filter='ProjectionBench*' > "$OUT/05_bench.txt" 2>&1
echo "== bench rc=$? $(date +%T)"; grep -E "x2048|x8192|->" "$OUT/05_bench.txt"
timeout 25 ./tests/lasp_gpu_tests --gtest_filter='ProjectionModel*:ProjectionFp4*' > "$OUT/06_tests_model.txt" 2>&1
echo "model tests rc=$? $(date +%T)"; grep -E "^\[  (PASSED|FAILED) |FAILED  \]" "$OUT/06_tests_model.txt" | head
