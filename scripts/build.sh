#!/usr/bin/env bash
# Configures and builds lasp into build/ (or $LASP_BUILD_DIR).
#   LASP_CUDA=AUTO|ON|OFF (default AUTO: the CUDA backend is built when nvcc is found)
#   LASP_CUDA_ARCHS="90a;100a"  CUDA targets (CMAKE_CUDA_ARCHITECTURES; default 90a = Hopper;
#                               add 100a for Blackwell, where FP4 GEMMs run natively)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${LASP_BUILD_DIR:-$root/build}
cuda=${LASP_CUDA:-AUTO}
jobs=${LASP_JOBS:-$(nproc)}
archs=()
[ -n "${LASP_CUDA_ARCHS:-}" ] && archs=(-DCMAKE_CUDA_ARCHITECTURES="$LASP_CUDA_ARCHS")
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLASP_CUDA="$cuda" "${archs[@]}" >"$build.configure.log" 2>&1 || {
  cat "$build.configure.log"; exit 1; }
grep -E "^-- lasp:" "$build.configure.log" || true
cmake --build "$build" -j "$jobs" "$@"
