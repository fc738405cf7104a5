#!/usr/bin/env bash
# Installs what is missing, builds lasp and runs every test CTest knows (CPU unit tests, the
# multi-rank tests under mpirun, and the GPU tests, which skip without a GPU).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
if [ "$(id -u)" -eq 0 ]; then  # Open MPI refuses root unless told
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export LASP_BUILD_DIR=${LASP_BUILD_DIR:-$root/build}
# Device code for Hopper and, where this nvcc can target it, Blackwell: the tests then also prove
# that every kernel compiles for sm_100a, where the FP4 GEMMs run natively (kernels/gemm_fp4.h).
if [ -z "${LASP_CUDA_ARCHS:-}" ]; then
  nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  if [ -x "$nvcc" ] && "$nvcc" --list-gpu-arch 2>/dev/null | grep -qx compute_100; then
    export LASP_CUDA_ARCHS="90a;100a"
  fi
fi
"$root/scripts/build.sh"
cd "$LASP_BUILD_DIR"
ctest --output-on-failure -j "${LASP_TEST_JOBS:-2}" --timeout 900 "$@"
