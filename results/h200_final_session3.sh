#!/usr/bin/env bash
# Session 3's final single-H200 check of the committed tree (run from a `git archive HEAD` copy):
# device_check.sh (build, every GPU test, linear-attention benchmark, 1B bf16 training + profile,
# scripts/train.sh on the GPU), then 1B fp8 and fp8 + FP8 LM head training with an fp8 profile.
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT=$OUT BUDGET_S=${BUDGET_S:-330} BENCH_ONLY=linear LOWP=0 SDPA=0 TRAIN_SH=1 \
  bash scripts/device_check.sh 2>&1 | sed -n '/== summary/,$p'
B=/tmp/lasp-build-gpu
for v in "fp8:--set precision.attention=fp8 --set precision.mlp=fp8" \
         "fp8head:--set precision.attention=fp8 --set precision.mlp=fp8 --set precision.lm_head=fp8"; do
  name=${v%%:*} args=${v#*:}
  echo "[t=$(( $(date +%s) - T0 ))s] 1B $name"
  # shellcheck disable=SC2086
  timeout 60 $B/lasp train configs/linear_llama3_1b.yaml --set train.steps=8 --set run.dir=/tmp/r-$name $args \
    2>&1 | grep -E '^step|rror' | tail -4
done
echo "[t=$(( $(date +%s) - T0 ))s] fp8 + fp8 head profile"
LASP_PROFILE=1 timeout 60 $B/lasp train configs/linear_llama3_1b.yaml --set train.steps=3 --set run.dir=/tmp/r-p \
  --set precision.attention=fp8 --set precision.mlp=fp8 --set precision.lm_head=fp8 2>&1 | sed -n '/^profile/,$p' | head -24
echo "[t=$(( $(date +%s) - T0 ))s] done"
