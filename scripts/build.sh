#!/usr/bin/env bash
# Configures and builds lasp into build/ (or $LASP_BUILD_DIR).
#   LASP_CUDA=AUTO|ON|OFF (default AUTO: the CUDA backend is built when nvcc is found)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${LASP_BUILD_DIR:-$root/build}
cuda=${LASP_CUDA:-AUTO}
jobs=${LASP_JOBS:-$(nproc)}
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLASP_CUDA="$cuda" >"$build.configure.log" 2>&1 || {
  cat "$build.configure.log"; exit 1; }
grep -E "^-- lasp:" "$build.configure.log" || true
cmake --build "$build" -j "$jobs" "$@"
