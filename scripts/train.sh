#!/usr/bin/env bash
# Installs what is missing, builds lasp and trains the default small model on the built-in corpus.
# With NVIDIA GPUs (nvidia-smi and nvcc present) it trains on them, one rank per GPU up to
# LASP_RANKS (default 2); without, on CPU: two ranks under mpirun splitting every sequence with
# LASP-2 sequence parallelism (LASP_RANKS=1 for one process).
# Extra arguments go to `lasp train`, e.g. --set train.steps=50.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
ranks=${LASP_RANKS:-2}
gpus=0
if command -v nvidia-smi >/dev/null && { command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; }; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "$gpus" -gt 0 ]; then
  export LASP_CUDA=${LASP_CUDA:-ON} LASP_BUILD_DIR=${LASP_BUILD_DIR:-$root/build-train-gpu}
  [ "$ranks" -gt "$gpus" ] && ranks=$gpus   # NCCL takes one rank per GPU
  export NCCL_NVLS_ENABLE=0
else
  # The CPU run needs no CUDA kernels: skip compiling them.
  export LASP_CUDA=${LASP_CUDA:-OFF} LASP_BUILD_DIR=${LASP_BUILD_DIR:-$root/build-train}
fi
"$root/scripts/build.sh" --target lasp
config=${LASP_CONFIG:-$root/configs/tiny.yaml}
cd "$root"
if [ "$ranks" -gt 1 ] && command -v mpirun >/dev/null; then
  exec mpirun -np "$ranks" --oversubscribe "$LASP_BUILD_DIR/lasp" train "$config" \
    --set parallel.sp="$ranks" --set parallel.sp_method=lasp2 "$@"
fi
exec "$LASP_BUILD_DIR/lasp" train "$config" "$@"
